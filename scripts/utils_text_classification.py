"""Text classification data for the OTO example scripts: data arguments, local files or a `datasets` name, label
checks, tokenization and metrics. Shared by `run_text_classification_oto.py` (the `Trainer`) and
`run_text_classification_oto_no_trainer.py` (Accelerate), so both accept the same data and fail the same way on bad
data, before any model is loaded. A sibling of the scripts, imported as `import utils_text_classification` (a
script's folder is on `sys.path` when it runs as `python scripts/<script>.py`).

Labels may be strings or integers: the label set is the sorted set of the training labels (with the class names of a
`ClassLabel` column, as in GLUE). CSV/TSV cells are read as written (a class named `None`, `NA` or `null` is a class,
not a missing value). A validation label that training never saw is an error, and so is an empty label (naming its
row). Rows with a missing or empty text are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from transformers import EvalPrediction
from transformers.utils import logging

from hf_oto.run_outputs import OTORunOutputArguments


logger = logging.get_logger("hf_oto.utils_text_classification")

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
"""Local file extension → `datasets` builder."""
DEFAULT_TEXT_COLUMNS = ("text", "sentence")
"""Text columns tried, in order, when `--text_column_name` is not given."""


@dataclass
class DataTrainingArguments(OTORunOutputArguments):
    """The data of a text classification job (a `datasets` name or local files) and its output options."""

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
        kwargs: dict[str, Any] = {}
        if file_format(path) == "csv":
            # Cells as written: pandas would read `None`, `NA`, `null`, `nan`, ... as missing values (a class lost).
            kwargs["na_filter"] = False
            if Path(path).suffix.lower() == ".tsv":
                kwargs["delimiter"] = "\t"
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


def _is_empty(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and value != value)
    )


def clean_split(
    split: str,
    dataset: Dataset,
    columns: list[str],
    max_samples: int | None,
    num_proc: int | None,
    label_column: str | None = None,
) -> Dataset:
    """Refuses empty labels (naming the rows), drops the rows whose text is missing or empty, truncates to
    `max_samples`, and refuses an empty result.

    Args:
        split (`str`): The split's name, for messages.
        dataset (`Dataset`): The raw split.
        columns (`list[str]`): The text (and label) columns a row needs.
        max_samples (`int`, *optional*): Keep at most this many rows.
        num_proc (`int`, *optional*): Processes for the filter.
        label_column (`str`, *optional*): The label column; an empty label cell is a `ValueError`, not a dropped row.
    """
    if label_column is not None:
        empty = [index for index, label in enumerate(dataset[label_column]) if _is_empty(label)]
        if empty:
            raise ValueError(
                f"The {split} data has {len(empty)} rows with an empty {label_column!r} label: rows {empty[:10]} "
                f"(0-based data rows; in a CSV/TSV file with a header, row i is line i + 2). Fill in their labels or "
                "remove those rows."
            )
    texts = [column for column in columns if column != label_column]
    before = len(dataset)
    dataset = dataset.filter(
        lambda row: not any(_is_empty(row[column]) for column in texts),
        num_proc=num_proc,
        desc=f"Dropping {split} rows with a missing text",
    )
    if len(dataset) < before:
        logger.warning(f"Dropped {before - len(dataset)} {split} rows with a missing or empty {' or '.join(texts)}.")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(
            f"The {split} split is empty after dropping rows with a missing {' or '.join(texts)}"
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


@dataclass
class TextClassificationSplits:
    """The cleaned splits of a text classification job and its labels (see [`load_text_classification_splits`])."""

    splits: dict[str, Dataset]
    label_list: list
    id2label: dict[int, str]
    text_column: str

    @property
    def label_to_id(self) -> dict:
        return {label: index for index, label in enumerate(self.label_list)}


def load_text_classification_splits(
    data_args: DataTrainingArguments, cache_dir: str | None, *, do_eval: bool, do_predict: bool
) -> TextClassificationSplits:
    """Loads, checks and cleans the splits a run needs (`train`, plus `validation` with `do_eval` and `test` with
    `do_predict`) and derives the label set; fails in seconds on bad data, before any model is loaded.

    Example:

    ```python
    >>> data = load_text_classification_splits(data_args, None, do_eval=True, do_predict=False)
    >>> data.id2label
    {0: 'negative', 1: 'positive'}
    ```
    """
    raw = load_raw_datasets(data_args, cache_dir)
    if "train" not in raw:
        raise ValueError(
            "The label set comes from the training data: pass --train_file (or a dataset with a train split)."
        )
    if do_eval and "validation" not in raw:
        raise ValueError("--do_eval needs a validation split: pass --validation_file.")
    if do_predict and "test" not in raw:
        raise ValueError("--do_predict needs a test split: pass --test_file.")
    text_column = resolve_text_column(data_args, raw)
    label_column = data_args.label_column_name
    text_columns = {"text_column_name": text_column}
    if data_args.text_pair_column_name is not None:
        text_columns["text_pair_column_name"] = data_args.text_pair_column_name
    labelled = {**text_columns, "label_column_name": label_column}

    splits: dict[str, Dataset] = {}
    plan = [("train", labelled, data_args.max_train_samples)]
    if do_eval:
        plan.append(("validation", labelled, data_args.max_eval_samples))
    if do_predict:
        plan.append(("test", text_columns, data_args.max_predict_samples))
    for split, required, max_samples in plan:
        check_columns(split, raw[split], required)
        splits[split] = clean_split(
            split,
            raw[split],
            list(required.values()),
            max_samples,
            data_args.preprocessing_num_workers,
            label_column if "label_column_name" in required else None,
        )
    label_list = build_label_list(splits["train"], label_column)
    if len(label_list) < 2:
        raise ValueError(f"The training data has a single label {label_list}; classification needs at least two.")
    label_to_id = {label: index for index, label in enumerate(label_list)}
    if "validation" in splits:
        check_labels("validation", splits["validation"], label_column, label_to_id)
    id2label = dict(enumerate(label_names(splits["train"], label_column, label_list)))
    logger.info(f"{len(label_list)} labels: {id2label}")
    return TextClassificationSplits(splits, label_list, id2label, text_column)


def tokenize_splits(
    data: TextClassificationSplits,
    data_args: DataTrainingArguments,
    tokenizer: Any,
    *,
    main_process_first: Callable[..., AbstractContextManager] | None = None,
) -> tuple[dict[str, Dataset], int]:
    """Tokenizes every split (labels to ids; the test split loses its labels: it is only predicted).

    Args:
        data ([`TextClassificationSplits`]): The cleaned splits.
        data_args ([`DataTrainingArguments`]): Sequence length, padding and workers.
        tokenizer: The tokenizer.
        main_process_first (`Callable`, *optional*): A context manager factory taking `desc=`, e.g.
            `training_args.main_process_first` or `accelerator.main_process_first` (ignores `desc`), so that the
            main process fills the `datasets` cache first.

    Returns:
        `tuple`: the tokenized splits and the sequence length used (`max_seq_length`, at most the tokenizer's).
    """
    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"--max_seq_length {data_args.max_seq_length} is longer than the tokenizer's maximum "
            f"({tokenizer.model_max_length}); using {tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False
    label_column, text_column, label_to_id = data_args.label_column_name, data.text_column, data.label_to_id

    def tokenize(batch):
        pairs = batch[data_args.text_pair_column_name] if data_args.text_pair_column_name else None
        encoded = tokenizer(batch[text_column], pairs, padding=padding, max_length=max_seq_length, truncation=True)
        if label_column in batch:
            encoded["labels"] = [label_to_id[_label_key(label)] for label in batch[label_column]]
        return encoded

    features: dict[str, Dataset] = {}
    for split, dataset in data.splits.items():
        if split == "test" and label_column in dataset.column_names:
            dataset = dataset.remove_columns(label_column)  # test labels may be unseen or missing: predict only
        context = main_process_first(desc=f"{split} dataset map pre-processing") if main_process_first else None
        with context or nullcontext():
            features[split] = dataset.map(
                tokenize,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                desc=f"Tokenizing the {split} set",
            )
    return features, max_seq_length
