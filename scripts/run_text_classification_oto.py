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
    --oto_target_flops 0.5 --oto_max_kind_sparsity heads=0.75   # half the FLOPs, at most 3/4 of the heads

# sentence pairs (MRPC)
python scripts/run_text_classification_oto.py --model_name_or_path bert-base-uncased \
    --dataset_name glue --dataset_config_name mrpc --text_column_name sentence1 --text_pair_column_name sentence2 \
    --output_dir outputs/bert-mrpc-oto --do_train --do_eval --num_train_epochs 5

# offline, with local CSV/TSV/JSON/JSONL files (string or integer labels)
python scripts/run_text_classification_oto.py --model_name_or_path path/to/model \
    --train_file train.csv --validation_file dev.csv --test_file test.csv \
    --text_column_name review --label_column_name sentiment \
    --output_dir outputs/reviews-oto --do_train --do_eval --do_predict --max_train_samples 2000

# push the slim model (weights, layout, tokenizer, card) to the Hub at the end, once
python scripts/run_text_classification_oto.py ... --push_to_hub --hub_model_id me/bert-sst2-oto --license apache-2.0

# all arguments from a JSON file
python scripts/run_text_classification_oto.py args.json
```
"""

from __future__ import annotations

import logging as std_logging
import os
from pathlib import Path

import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from hf_oto import OTOTrainer, OTOTrainingArguments
from hf_oto.output_dir import check_run_dirs
from hf_oto.run_lock import output_dir_lock
from hf_oto.run_outputs import (
    OnnxExportError,
    card_metadata,
    finish_oto_run,
    parse_script_arguments,
)
from oto_example_args import ModelArguments
from utils_text_classification import (  # noqa: F401  (build_label_list, label_names: the script's API)
    DataTrainingArguments,
    build_label_list,
    compute_metrics,
    label_names,
    load_text_classification_splits,
    tokenize_splits,
)


logger = logging.get_logger("hf_oto.run_text_classification_oto")


def parse_arguments(argv: list[str] | None = None) -> tuple:
    """Parses the arguments from the command line, or from a single JSON file."""
    return parse_script_arguments((ModelArguments, DataTrainingArguments, OTOTrainingArguments), argv)


def run(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: OTOTrainingArguments
) -> tuple[dict, OTOTrainer]:
    """Trains, prunes and evaluates; returns the results (also written to `all_results.json`) and the trainer, whose
    `model` is the slim model."""
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    pruned_dir = data_args.pruned_model_dir or os.path.join(training_args.output_dir, "pruned")
    overwrite = getattr(training_args, "overwrite_output_dir", False)
    # Before any work: another run's checkpoints, model or files in the folders, or a run still using them.
    check_run_dirs(
        training_args.output_dir,
        pruned_dir,
        overwrite=overwrite,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
    )
    with output_dir_lock(training_args.output_dir, is_main_process=training_args.process_index == 0):
        return train_prune_and_save(model_args, data_args, training_args, pruned_dir)


def train_prune_and_save(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: OTOTrainingArguments, pruned_dir: str
) -> tuple[dict, OTOTrainer]:
    """The run, once its folders are checked and locked."""
    # Data checks first: everything here fails in seconds, before the model is loaded or trained.
    data = load_text_classification_splits(
        data_args, model_args.cache_dir, do_eval=training_args.do_eval, do_predict=training_args.do_predict
    )
    label_list, id2label = data.label_list, data.id2label

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
    features, max_seq_length = tokenize_splits(
        data, data_args, tokenizer, main_process_first=training_args.main_process_first
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
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(
            {
                f"train_{key}" if not key.startswith("train") else key: value
                for key, value in train_result.metrics.items()
            }
        )
        results["train_samples"] = len(features["train"])

    # Checks the slim model's outputs on the first eval batch (or training batch without --do_eval).
    check_inputs = None
    if trainer.eval_dataset is None and trainer.train_dataset is None:
        check_inputs = trainer.data_collator([features["train"][i] for i in range(min(8, len(features["train"])))])

    def evaluate(trainer: OTOTrainer) -> dict:
        metrics = trainer.evaluate(eval_dataset=features["validation"])
        return {**metrics, "eval_samples": len(features["validation"])}

    def predict(trainer: OTOTrainer, results: dict) -> None:
        if not training_args.do_predict:
            return
        predictions = trainer.predict(features["test"], metric_key_prefix="predict").predictions
        predictions = np.argmax(predictions[0] if isinstance(predictions, tuple) else predictions, axis=-1)
        results["predict_samples"] = len(features["test"])
        if trainer.is_world_process_zero():
            Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(os.path.join(training_args.output_dir, "predict_results.txt"), "w") as handle:
                handle.write("index\tprediction\n")
                handle.writelines(f"{index}\t{id2label[int(label)]}\n" for index, label in enumerate(predictions))

    finish_oto_run(
        trainer,
        results,
        data_args,
        pruned_dir=pruned_dir,
        do_eval=training_args.do_eval,
        evaluate=evaluate,
        extra_steps=predict,
        check_inputs=check_inputs,
        seq_length=data_args.flops_seq_length or max_seq_length,
        tokenizer=tokenizer,
        overwrite=getattr(training_args, "overwrite_output_dir", False),
        card_kwargs=card_metadata(
            dataset_name=data_args.dataset_name,
            dataset_config=data_args.dataset_config_name,
            license=data_args.license,
        ),
        push_to_hub=training_args.push_to_hub,
    )
    return results, trainer


def main(argv: list[str] | None = None) -> dict:
    """Parses the arguments (command line, or a single JSON file) and runs; returns the results."""
    results, _ = run(*parse_arguments(argv))
    return results


if __name__ == "__main__":
    try:
        main()
    except OnnxExportError as error:  # the slim model and all_results.json are saved: the message says where
        raise SystemExit(f"ERROR: {error}") from None
