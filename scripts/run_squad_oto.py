#!/usr/bin/env python
"""Train once and prune with OTO on SQuAD v1.1 (extractive question answering).

Fine-tunes a question-answering model with [`OTOTrainer`] (HSPG over attention heads and FFN rows), slices the zero
groups away, evaluates the slim model (exact match / F1, computed offline) and writes the pruned model folder with its
model card and `all_results.json` (metrics, group sparsity, params and FLOPs of the slim model).

Usage:

```bash
# with the Hugging Face hub
python scripts/run_squad_oto.py --model_name_or_path bert-base-uncased --dataset_name squad \
    --output_dir outputs/bert-squad-oto --do_train --do_eval --per_device_train_batch_size 32 \
    --learning_rate 3e-5 --num_train_epochs 2 --max_seq_length 384 --doc_stride 128 \
    --oto_target_flops 0.5          # the default: half the FLOPs at 128 tokens (target mode)
# the paper's HSPG instead: --oto_mode paper --oto_lambda 100 --oto_init_fraction 0.3 --oto_max_group_sparsity 0.5

# offline, with local SQuAD-format JSON files (the official v1.1 layout or flat JSON lines)
python scripts/run_squad_oto.py --model_name_or_path path/to/model --train_file train-v1.1.json \
    --validation_file dev-v1.1.json --output_dir outputs/squad-oto --do_train --do_eval --max_train_samples 2000

# all arguments from a JSON file
python scripts/run_squad_oto.py args.json
```
"""

from __future__ import annotations

import logging as std_logging
import os
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from hf_oto import OTOTrainingArguments
from hf_oto.output_dir import check_run_dirs
from hf_oto.run_lock import output_dir_lock
from hf_oto.run_outputs import (
    OnnxExportError,
    OTORunOutputArguments,
    card_metadata,
    finish_oto_run,
    parse_script_arguments,
)
from oto_example_args import ModelArguments
from trainer_qa import QuestionAnsweringOTOTrainer
from utils_qa import check_answerable, prepare_eval_features, prepare_train_features, read_squad_file


logger = logging.get_logger("hf_oto.run_squad_oto")


@dataclass
class DataTrainingArguments(OTORunOutputArguments):
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name, e.g. squad (needs the hub)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local SQuAD-format training file (JSON/JSONL)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local SQuAD-format validation file."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Overlap, in tokens, between the windows of a context."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates combined per window."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Pass --dataset_name (e.g. squad) or local --train_file/--validation_file.")
        if self.dataset_name is not None and (self.train_file or self.validation_file):
            raise ValueError("Pass either --dataset_name or --train_file/--validation_file, not both.")
        if self.doc_stride >= self.max_seq_length:
            raise ValueError(
                f"--doc_stride ({self.doc_stride}) must be smaller than --max_seq_length ({self.max_seq_length})."
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive number of examples; got {value}.")


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> DatasetDict:
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        for split, dataset in raw.items():  # SQuAD v2 (e.g. squad_v2): refused before training, not at evaluation
            check_answerable(dataset["answers"], f"{data_args.dataset_name} ({split} split)")
        return raw
    splits = {}
    for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file)):
        if path is not None:
            splits[split] = Dataset.from_list(read_squad_file(path))
    return DatasetDict(splits)


def parse_arguments(argv: list[str] | None = None) -> tuple:
    """Parses the arguments from the command line, or from a single JSON file."""
    return parse_script_arguments((ModelArguments, DataTrainingArguments, OTOTrainingArguments), argv)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(argv)
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    pruned_dir = data_args.pruned_model_dir or os.path.join(training_args.output_dir, "pruned")
    # Before any work: another run's checkpoints, model or files in the folders, or a run still using them.
    check_run_dirs(
        training_args.output_dir,
        pruned_dir,
        overwrite=getattr(training_args, "overwrite_output_dir", False),
        resume_from_checkpoint=training_args.resume_from_checkpoint,
    )
    with output_dir_lock(training_args.output_dir, is_main_process=training_args.process_index == 0):
        return train_prune_and_save(model_args, data_args, training_args, pruned_dir)


def train_prune_and_save(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: OTOTrainingArguments, pruned_dir: str
) -> dict:
    """The run, once its folders are checked and locked."""
    raw = load_raw_datasets(data_args, model_args.cache_dir)
    if training_args.do_train and "train" not in raw:
        raise ValueError("--do_train needs a training split: pass --train_file (or a dataset with a train split).")
    if training_args.do_eval and "validation" not in raw:
        raise ValueError("--do_eval needs a validation split: pass --validation_file.")

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
    )
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError("This script needs a fast tokenizer (for offset mappings); the model's tokenizer is slow.")
    model = AutoModelForQuestionAnswering.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def featurize(split: str, max_samples: int | None, prepare, desc: str):
        examples = raw[split]
        if max_samples is not None:
            examples = examples.select(range(min(max_samples, len(examples))))
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            features = examples.map(
                prepare,
                fn_kwargs={
                    "tokenizer": tokenizer,
                    "max_seq_length": max_seq_length,
                    "doc_stride": data_args.doc_stride,
                },
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=examples.column_names,
                desc=desc,
            )
        if len(features) == 0:
            raise ValueError(f"The {split} split is empty after filtering and tokenization.")
        return examples, features

    train_dataset = eval_examples = eval_dataset = None
    if training_args.do_train:
        _, train_dataset = featurize(
            "train", data_args.max_train_samples, prepare_train_features, "Tokenizing the training set"
        )
    if training_args.do_eval:
        eval_examples, eval_dataset = featurize(
            "validation", data_args.max_eval_samples, prepare_eval_features, "Tokenizing the validation set"
        )

    trainer = QuestionAnsweringOTOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        eval_examples=eval_examples,
        n_best_size=data_args.n_best_size,
        max_answer_length=data_args.max_answer_length,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    results: dict = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(
            {
                f"train_{key}" if not key.startswith("train") else key: value
                for key, value in train_result.metrics.items()
            }
        )

    check_inputs = None
    if eval_dataset is not None:
        check_inputs = default_data_collator(
            [
                {
                    key: eval_dataset[i][key]
                    for key in ("input_ids", "attention_mask", "token_type_ids")
                    if key in eval_dataset.column_names
                }
                for i in range(min(8, len(eval_dataset)))
            ]
        )

    def evaluate(trainer: QuestionAnsweringOTOTrainer) -> dict:
        return {**trainer.evaluate(), "eval_samples": len(eval_examples)}

    finish_oto_run(
        trainer,
        results,
        data_args,
        pruned_dir=pruned_dir,
        do_eval=training_args.do_eval,
        evaluate=evaluate,
        result_metric_keys=("eval_exact_match", "eval_f1", "eval_samples"),
        check_inputs=check_inputs,
        seq_length=data_args.flops_seq_length or max_seq_length,
        tokenizer=tokenizer,
        overwrite=getattr(training_args, "overwrite_output_dir", False),
        sparsity_by_family=False,
        card_kwargs=card_metadata(
            dataset_name=data_args.dataset_name,
            dataset_config=data_args.dataset_config_name,
            license=data_args.license,
        ),
        push_to_hub=training_args.push_to_hub,
    )
    return results


if __name__ == "__main__":
    try:
        main()
    except OnnxExportError as error:  # the slim model and all_results.json are saved: the message says where
        raise SystemExit(f"ERROR: {error}") from None
