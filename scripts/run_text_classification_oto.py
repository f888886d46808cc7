#!/usr/bin/env python
"""Train once and prune with OTO on a text classification task (single sentences or sentence pairs).

Fine-tunes a sequence-classification model with [`OTOTrainer`] (HSPG over attention heads and FFN rows), slices the
zero groups away, evaluates the slim model (accuracy, and F1 of the second label for two classes, computed offline),
writes its test-set predictions, the pruned model folder with its model card and `all_results.json` (metrics, group
sparsity, params and FLOPs of the dense and the slim model).

Labels may be strings or integers: the label set is the sorted set of the training labels, written into the model
config as `label2id`/`id2label` (with the class names of a `ClassLabel` column, as in GLUE). A validation label that
training never saw is an error. Rows with a missing or empty text or label are dropped.

Usage:

```bash
# with the Hugging Face hub (SST-2 from GLUE)
python scripts/run_text_classification_oto.py --model_name_or_path bert-base-uncased \
    --dataset_name glue --dataset_config_name sst2 --text_column_name sentence \
    --output_dir outputs/bert-sst2-oto --do_train --do_eval --per_device_train_batch_size 32 \
    --learning_rate 2e-5 --num_train_epochs 3 --max_seq_length 128 \
    --oto_lambda 1e-3 --oto_init_fraction 0.3 --oto_max_group_sparsity 0.5

# sentence pairs (MRPC)
python scripts/run_text_classification_oto.py --model_name_or_path bert-base-uncased \
    --dataset_name glue --dataset_config_name mrpc --text_column_name sentence1 --text_pair_column_name sentence2 \
    --output_dir outputs/bert-mrpc-oto --do_train --do_eval --num_train_epochs 5

# offline, with local CSV/TSV/JSON/JSONL files (string or integer labels)
python scripts/run_text_classification_oto.py --model_name_or_path path/to/model \
    --train_file train.csv --validation_file dev.csv --test_file test.csv \
    --text_column_name review --label_column_name sentiment \
    --output_dir outputs/reviews-oto --do_train --do_eval --do_predict --max_train_samples 2000

# all arguments from a JSON file
python scripts/run_text_classification_oto.py args.json
```
"""

from __future__ import annotations

import copy
import logging as std_logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from hf_oto import OTOTrainer, OTOTrainingArguments, count_flops, count_parameters
from hf_oto.run_outputs import OTORunOutputArguments, write_run_outputs


logger = logging.get_logger("hf_oto.run_text_classification_oto")

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
"""Local file extension → `datasets` builder."""
DEFAULT_TEXT_COLUMNS = ("text", "sentence")
"""Text columns tried, in order, when `--text_column_name` is not given."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Path to a pretrained model folder or a Hub model id."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads and datasets are stored."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Load a checkpoint whose classification head has another number of labels (re-initialised)."
        },
    )


@dataclass
class DataTrainingArguments(OTORunOutputArguments):
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name, e.g. glue (needs the hub)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration, e.g. sst2."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.csv, .tsv, .json, .jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file (same formats)."})
    test_file: str | None = field(
        default=None, metadata={"help": "Local test file (same formats; labels not needed) for --do_predict."}
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": f"Column of the text (default: the first of {list(DEFAULT_TEXT_COLUMNS)})."}
    )
    text_pair_column_name: str | None = field(
        default=None, metadata={"help": "Column of the second text, for sentence-pair tasks."}
    )
    label_column_name: str = field(default="label", metadata={"help": "Column of the labels (strings or integers)."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example; longer ones are truncated."})
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every example to max_seq_length (default: pad each batch to its longest example)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self):
        files = {"train_file": self.train_file, "validation_file": self.validation_file, "test_file": self.test_file}
        if self.dataset_name is None and not any(files.values()):
            raise ValueError("Pass --dataset_name (e.g. glue) or local --train_file/--validation_file/--test_file.")
        if self.dataset_name is not None and any(files.values()):
            raise ValueError(
                "Pass either --dataset_name or local --train_file/--validation_file/--test_file, not both."
            )
        for name, path in files.items():
            if path is not None and file_format(path) is None:
                raise ValueError(
                    f"--{name} {path!r} has an unknown extension {Path(path).suffix!r}; use one of "
                    f"{', '.join(sorted(FILE_FORMATS))}."
                )
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive number; got {value}.")


def file_format(path: str) -> str | None:
    """The `datasets` builder of a local file, from its extension (`None` when unknown)."""
    return FILE_FORMATS.get(Path(path).suffix.lower())


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> DatasetDict:
    """The raw splits: from the hub with `--dataset_name`, else from the local files (each file on its own, so they
    may have different formats)."""
    if data_args.dataset_name is not None:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    splits = {}
    for split, path in (
        ("train", data_args.train_file),
        ("validation", data_args.validation_file),
        ("test", data_args.test_file),
    ):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ValueError(f"The {split} file {path!r} does not exist.")
        kwargs = {"delimiter": "\t"} if Path(path).suffix.lower() == ".tsv" else {}
        splits[split] = load_dataset(
            file_format(path), data_files={split: path}, split=split, cache_dir=cache_dir, **kwargs
        )
    return DatasetDict(splits)


def resolve_text_column(data_args: DataTrainingArguments, raw: DatasetDict) -> str:
    if data_args.text_column_name is not None:
        return data_args.text_column_name
    columns = next(iter(raw.values())).column_names
    for name in DEFAULT_TEXT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"No --text_column_name given and the data has none of the default text columns {list(DEFAULT_TEXT_COLUMNS)}"
        f"; its columns are: {', '.join(columns)}."
    )


def check_columns(split: str, dataset: Dataset, required: dict[str, str]) -> None:
    """Raises a `ValueError` naming the available columns when one of `required` (option → column) is missing."""
    for option, column in required.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"The {split} data has no column {column!r} (--{option}); its columns are: "
                f"{', '.join(dataset.column_names)}."
            )


def clean_split(
    split: str, dataset: Dataset, columns: list[str], max_samples: int | None, num_proc: int | None
) -> Dataset:
    """Drops the rows whose text or label is missing, truncates to `max_samples`, and refuses an empty result."""
    before = len(dataset)
    dataset = dataset.filter(
        lambda row: all(row[c] is not None and (not isinstance(row[c], str) or row[c].strip()) for c in columns),
        num_proc=num_proc,
        desc=f"Dropping {split} rows with a missing text or label",
    )
    if len(dataset) < before:
        logger.warning(f"Dropped {before - len(dataset)} {split} rows with a missing or empty {' or '.join(columns)}.")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(
            f"The {split} split is empty after dropping rows with a missing {' or '.join(columns)}"
            + (f" and keeping the first {max_samples}" if max_samples is not None else "")
            + f" ({before} rows before)."
        )
    return dataset


def build_label_list(train: Dataset, label_column: str) -> list:
    """The sorted set of training labels; floats that are not whole numbers (regression targets) are refused."""
    labels = set(train[label_column])
    if any(isinstance(label, float) and not float(label).is_integer() for label in labels):
        raise ValueError(
            f"The label column {label_column!r} holds non-integer numbers (e.g. {sorted(labels)[:3]}): this script "
            "does classification, not regression."
        )
    labels = {int(label) if isinstance(label, float) else label for label in labels}
    try:
        return sorted(labels)
    except TypeError:  # mixed strings and numbers
        return sorted(labels, key=str)


def label_names(dataset: Dataset, label_column: str, label_list: list) -> list[str]:
    """The names of the labels in the model config: the class names of a `ClassLabel` column (hub datasets such as
    GLUE), else the labels themselves as strings."""
    feature = dataset.features.get(label_column)
    if isinstance(feature, ClassLabel):
        return [feature.int2str(int(label)) for label in label_list]
    return [str(label) for label in label_list]


def check_labels(split: str, dataset: Dataset, label_column: str, label_to_id: dict) -> None:
    """Raises a `ValueError` listing the labels of `dataset` that training never saw."""
    unseen = {label for label in dataset[label_column] if _label_key(label) not in label_to_id}
    if unseen:
        raise ValueError(
            f"The {split} data has labels that the training data never has: {sorted(map(str, unseen))}; the "
            f"training labels are: {[str(label) for label in label_to_id]}."
        )


def _label_key(label):
    return int(label) if isinstance(label, float) and float(label).is_integer() else label


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy, plus precision/recall/F1 of label id 1 when there are two classes (numpy only, no hub)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.argmax(logits, axis=-1)
    references = np.asarray(prediction.label_ids)
    metrics = {"accuracy": float((predicted == references).mean())}
    if logits.shape[-1] == 2:
        true_positives = float(((predicted == 1) & (references == 1)).sum())
        precision = true_positives / max(float((predicted == 1).sum()), 1.0)
        recall = true_positives / max(float((references == 1).sum()), 1.0)
        metrics["f1"] = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return metrics


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, OTOTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def run(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: OTOTrainingArguments
) -> tuple[dict, OTOTrainer]:
    """Trains, prunes and evaluates; returns the results (also written to `all_results.json`) and the trainer, whose
    `model` is the slim model."""
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    # Data checks first: everything here fails in seconds, before the model is loaded or trained.
    raw = load_raw_datasets(data_args, model_args.cache_dir)
    if "train" not in raw:
        raise ValueError(
            "The label set comes from the training data: pass --train_file (or a dataset with a train split)."
        )
    if training_args.do_eval and "validation" not in raw:
        raise ValueError("--do_eval needs a validation split: pass --validation_file.")
    if training_args.do_predict and "test" not in raw:
        raise ValueError("--do_predict needs a test split: pass --test_file.")
    text_column = resolve_text_column(data_args, raw)
    label_column = data_args.label_column_name
    text_columns = {"text_column_name": text_column}
    if data_args.text_pair_column_name is not None:
        text_columns["text_pair_column_name"] = data_args.text_pair_column_name
    labelled = {**text_columns, "label_column_name": label_column}

    splits: dict[str, Dataset] = {}
    plan = [("train", labelled, data_args.max_train_samples)]
    if training_args.do_eval:
        plan.append(("validation", labelled, data_args.max_eval_samples))
    if training_args.do_predict:
        plan.append(("test", text_columns, data_args.max_predict_samples))
    for split, required, max_samples in plan:
        check_columns(split, raw[split], required)
        splits[split] = clean_split(
            split, raw[split], list(required.values()), max_samples, data_args.preprocessing_num_workers
        )
    label_list = build_label_list(splits["train"], label_column)
    if len(label_list) < 2:
        raise ValueError(f"The training data has a single label {label_list}; classification needs at least two.")
    label_to_id = {label: index for index, label in enumerate(label_list)}
    if "validation" in splits:
        check_labels("validation", splits["validation"], label_column, label_to_id)
    id2label = dict(enumerate(label_names(splits["train"], label_column, label_list)))
    logger.info(f"{len(label_list)} labels: {id2label}")

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(label_list),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"--max_seq_length {data_args.max_seq_length} is longer than the tokenizer's maximum "
            f"({tokenizer.model_max_length}); using {tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize(batch):
        pairs = batch[data_args.text_pair_column_name] if data_args.text_pair_column_name else None
        encoded = tokenizer(batch[text_column], pairs, padding=padding, max_length=max_seq_length, truncation=True)
        if label_column in batch:
            encoded["labels"] = [label_to_id[_label_key(label)] for label in batch[label_column]]
        return encoded

    features: dict[str, Dataset] = {}
    for split, dataset in splits.items():
        if split == "test" and label_column in dataset.column_names:
            dataset = dataset.remove_columns(label_column)  # test labels may be unseen or missing: predict only
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            features[split] = dataset.map(
                tokenize,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                desc=f"Tokenizing the {split} set",
            )

    trainer = OTOTrainer(
        model=model,
        args=training_args,
        train_dataset=features["train"] if training_args.do_train else None,
        eval_dataset=features.get("validation"),
        data_collator=default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    results: dict = {"labels": [str(label) for label in label_list]}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        results.update(
            {
                f"train_{key}" if not key.startswith("train") else key: value
                for key, value in train_result.metrics.items()
            }
        )
        results["train_samples"] = len(features["train"])

    zigs = trainer.zigs
    results["group_sparsity"] = zigs.group_sparsity()
    results.update({f"group_sparsity_{kind}": value for kind, value in zigs.sparsity_by_kind().items()})
    results["group_sparsity_by_family"] = zigs.sparsity_by_family()
    results["zero_groups"] = zigs.num_zero_groups()
    results["num_groups"] = len(zigs)
    flops_seq_length = data_args.flops_seq_length or max_seq_length
    results["dense_params"] = count_parameters(trainer.model)
    results["dense_flops"] = count_flops(trainer.model, seq_length=flops_seq_length)

    # Checks the slim model's outputs on the first eval batch (or training batch without --do_eval).
    check_inputs = None
    if trainer.eval_dataset is None and trainer.train_dataset is None:
        check_inputs = trainer.data_collator([features["train"][i] for i in range(min(8, len(features["train"])))])
    # The full-size group-sparse model, kept only to measure the slim model's speedup against it.
    dense_reference = copy.deepcopy(trainer.model).eval() if data_args.benchmark_speedup else None
    slim = trainer.prune(inputs=check_inputs, seq_length=flops_seq_length)
    results["params"] = count_parameters(slim)
    results["flops"] = count_flops(slim, seq_length=flops_seq_length)
    results["params_ratio"] = results["params"] / results["dense_params"]
    results["flops_ratio"] = results["flops"] / results["dense_flops"]

    if training_args.do_eval:  # the SLIM model (trainer.model after prune)
        metrics = trainer.evaluate(eval_dataset=features["validation"])
        results.update(metrics)
        results["eval_samples"] = len(features["validation"])

    if training_args.do_predict:
        predictions = trainer.predict(features["test"], metric_key_prefix="predict").predictions
        predictions = np.argmax(predictions[0] if isinstance(predictions, tuple) else predictions, axis=-1)
        results["predict_samples"] = len(features["test"])
        if trainer.is_world_process_zero():
            Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(os.path.join(training_args.output_dir, "predict_results.txt"), "w") as handle:
                handle.write("index\tprediction\n")
                handle.writelines(f"{index}\t{id2label[int(label)]}\n" for index, label in enumerate(predictions))

    write_run_outputs(
        trainer,
        results,
        pruned_dir=data_args.pruned_model_dir or os.path.join(training_args.output_dir, "pruned"),
        overwrite=training_args.overwrite_output_dir,
        tokenizer=tokenizer,
        export_onnx=data_args.export_onnx,
        dense_reference=dense_reference,
        benchmark_batch_size=data_args.benchmark_batch_size,
        benchmark_repeats=data_args.benchmark_repeats,
        seq_length=flops_seq_length,
    )
    return results, trainer


def main(argv: list[str] | None = None) -> dict:
    """Parses the arguments (command line, or a single JSON file) and runs; returns the results."""
    results, _ = run(*parse_arguments(argv))
    return results


if __name__ == "__main__":
    main()
