#!/usr/bin/env python
"""Train once and prune with OTO on an image classification task (conv channels as zero-invariant groups).

Trains an image classifier with [`OTOTrainer`] (HSPG over the channel groups that `torch.fx` finds: conv filters
with their batch norms, tied across residual adds), slices the zero channels away, evaluates the slim model and
reports top-1 accuracy, FLOPs and parameters of the slim model relative to the full one (as in the OTO paper's
Tables 1-2), the channels kept per layer (the paper's "Architecture" column), the pruned model folder with its
model card and `all_results.json`. With `--dense_baseline` it trains the same model with the same recipe without OTO
(plain `Trainer`, the base optimizer of `--oto_variant`) for the baseline row.

Models: `--architecture vgg16_bn | resnet50 | resnet18` builds the CIFAR-layout network of `hf_oto.models` from
scratch; `--model_name_or_path` loads any transformers image classifier made of convolutions (e.g. a ResNet).

Data: a `datasets` image dataset (`--dataset_name cifar10`, needs the hub), local image folders
(`--train_dir`/`--validation_dir`, one sub-folder per class), or an MNIST-format IDX folder (`--idx_dir`; offline:
Fashion-MNIST from the Debian package `dataset-fashion-mnist`).

Usage:

```bash
# offline: VGG16-BN on Fashion-MNIST (apt-get install dataset-fashion-mnist); the recipe of benchmarks/README.md
python scripts/run_image_classification_oto.py --architecture vgg16_bn --idx_dir /usr/share/datasets/fashion-mnist \
    --output_dir outputs/vgg16bn-fmnist-oto --do_train --do_eval --num_train_epochs 2 --max_train_samples 20000 \
    --per_device_train_batch_size 128 --learning_rate 0.05 --weight_decay 5e-4 --oto_variant sgd \
    --oto_mode paper --oto_lambda 0.02 --oto_epsilon 0.3 --oto_init_fraction 0.3 --oto_channel_penalty norm \
    --oto_max_group_sparsity 0.6 --oto_max_family_sparsity 0.8
# the same in the target mode, to a quarter of the FLOPs
python scripts/run_image_classification_oto.py --architecture vgg16_bn --idx_dir /usr/share/datasets/fashion-mnist \
    --output_dir outputs/vgg16bn-fmnist-oto-target --do_train --do_eval --num_train_epochs 2 --max_train_samples 20000 \
    --per_device_train_batch_size 128 --learning_rate 0.05 --weight_decay 5e-4 --oto_variant sgd --oto_target_flops 0.25

# CIFAR-10 from the hub
python scripts/run_image_classification_oto.py --architecture resnet50 --dataset_name cifar10 \
    --output_dir outputs/resnet50-cifar10-oto --do_train --do_eval --num_train_epochs 100 --oto_variant sgd
```
"""

from __future__ import annotations

import logging as std_logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForImageClassification,
    EvalPrediction,
    PreTrainedModel,
    Trainer,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from hf_oto import OTOTrainer, OTOTrainingArguments, count_flops, count_parameters
from hf_oto.data.images import ImagePreprocessor, channel_statistics, load_idx_dataset
from hf_oto.image_processing import OTOImageProcessor
from hf_oto.models import CifarConvNetConfig, CifarConvNetForImageClassification
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


logger = logging.get_logger("hf_oto.run_image_classification_oto")

ARCHITECTURES = {
    "vgg16_bn": CifarConvNetConfig.vgg16_bn,
    "resnet50": CifarConvNetConfig.resnet50,
    "resnet18": CifarConvNetConfig.resnet18,
}
IMAGE_COLUMNS = ("image", "img", "pixel_values")
"""Image columns tried, in order, when `--image_column_name` is not given."""


@dataclass
class ImageModelArguments(ModelArguments):
    """The shared [`ModelArguments`] with a second way in: `--architecture` builds a network from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Or load a transformers image classifier (folder or Hub id)."}
    )
    architecture: str | None = field(
        default=None,
        metadata={"help": f"Build a CIFAR-layout network from scratch: one of {list(ARCHITECTURES)}."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Input size (default: the model config's image_size, else 32)."}
    )
    width_multiplier: float = field(
        default=1.0,
        metadata={
            "help": "With --architecture: multiply every convolution's width by this (e.g. 0.5 with "
            "--dense_baseline: the uniformly thinner network at about a quarter of the FLOPs, the classic baseline "
            "of a pruned one)."
        },
    )

    def __post_init__(self):
        if (self.architecture is None) == (self.model_name_or_path is None):
            raise ValueError(
                f"Pass exactly one of --architecture ({', '.join(ARCHITECTURES)}) or --model_name_or_path."
            )
        if self.tokenizer_name is not None:
            raise ValueError("--tokenizer_name is for text models: an image classifier takes no tokenizer.")
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            raise ValueError(f"--architecture {self.architecture!r} is unknown; choose one of {list(ARCHITECTURES)}.")
        if self.width_multiplier <= 0:
            raise ValueError(f"--width_multiplier must be positive (e.g. 0.5 for half); got {self.width_multiplier}.")
        if self.width_multiplier != 1.0 and self.architecture is None:
            raise ValueError(
                "--width_multiplier scales a network built with --architecture; a checkpoint given with "
                "--model_name_or_path keeps its widths (drop --width_multiplier)."
            )
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"--image_size must be at least 8; got {self.image_size}.")


@dataclass
class DataArguments(OTORunOutputArguments):
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` name, e.g. cifar10 (needs the hub)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Local image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local validation image folder."})
    idx_dir: str | None = field(
        default=None,
        metadata={
            "help": "MNIST-format IDX folder, e.g. /usr/share/datasets/fashion-mnist (its test split validates)."
        },
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": f"Column of the images (default: the first of {list(IMAGE_COLUMNS)})."}
    )
    label_column_name: str = field(default="label", metadata={"help": "Column of the integer class labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the (shuffled) training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    augment: bool = field(default=True, metadata={"help": "Random padded crops and flips of the training images."})
    dense_baseline: bool = field(
        default=False,
        metadata={"help": "Train without OTO (plain Trainer, the base optimizer of --oto_variant) for a baseline."},
    )

    def __post_init__(self):
        sources = [self.dataset_name, self.train_dir or self.validation_dir, self.idx_dir]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "Pass exactly one data source: --dataset_name (hub), --train_dir/--validation_dir (image folders) or "
                "--idx_dir (MNIST-format files; offline Fashion-MNIST: `apt-get install dataset-fashion-mnist`, then "
                "--idx_dir /usr/share/datasets/fashion-mnist)."
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive number; got {value}.")


def load_raw_datasets(data_args: DataArguments, cache_dir: str | None) -> DatasetDict:
    """`train` and `validation` splits from the hub, image folders or an IDX folder (whose test split validates)."""
    if data_args.idx_dir is not None:
        raw = load_idx_dataset(data_args.idx_dir)
        return DatasetDict({"train": raw["train"], "validation": raw["test"]})
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        if "validation" not in raw and "test" in raw:
            raw["validation"] = raw.pop("test")
        return raw
    splits = {}
    for split, directory in (("train", data_args.train_dir), ("validation", data_args.validation_dir)):
        if directory is None:
            continue
        if not os.path.isdir(directory):
            raise ValueError(f"The {split} image folder {directory!r} does not exist.")
        splits[split] = load_dataset("imagefolder", data_dir=directory, split="train", cache_dir=cache_dir)
    return DatasetDict(splits)


def resolve_image_column(data_args: DataArguments, dataset: Dataset) -> str:
    if data_args.image_column_name is not None:
        if data_args.image_column_name not in dataset.column_names:
            raise ValueError(
                f"The data has no column {data_args.image_column_name!r} (--image_column_name); its columns are: "
                f"{', '.join(dataset.column_names)}."
            )
        return data_args.image_column_name
    for name in IMAGE_COLUMNS:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"No --image_column_name given and the data has none of {list(IMAGE_COLUMNS)}; its columns are: "
        f"{', '.join(dataset.column_names)}."
    )


def label_names(dataset: Dataset, label_column: str) -> list[str]:
    """Class names of a `ClassLabel` column, else `"0"`, `"1"`, ... up to the largest label."""
    if label_column not in dataset.column_names:
        raise ValueError(
            f"The data has no label column {label_column!r} (--label_column_name); its columns are: "
            f"{', '.join(dataset.column_names)}."
        )
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    labels = np.asarray(dataset[label_column])
    if labels.dtype.kind not in "iu" or labels.min() < 0:
        raise ValueError(f"The label column {label_column!r} must hold class indices 0, 1, ...; got {labels[:5]}.")
    return [str(i) for i in range(int(labels.max()) + 1)]


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == np.asarray(prediction.label_ids)).mean())}


def build_model(model_args: ImageModelArguments, names: list[str], num_channels: int) -> PreTrainedModel:
    id2label = dict(enumerate(names))
    label2id = {name: index for index, name in id2label.items()}
    if model_args.architecture is not None:
        config = ARCHITECTURES[model_args.architecture](
            num_labels=len(names),
            num_channels=num_channels,
            image_size=model_args.image_size or 32,
            id2label=id2label,
            label2id=label2id,
        )
        if model_args.width_multiplier != 1.0:
            config = config.scaled(model_args.width_multiplier)
        return CifarConvNetForImageClassification(config)
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(names),
        id2label=id2label,
        label2id=label2id,
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    if model_args.image_size is not None:
        model.config.image_size = model_args.image_size
    return model


def parse_arguments(argv: list[str] | None = None) -> tuple:
    """Parses the arguments from the command line, or from a single JSON file."""
    return parse_script_arguments((ImageModelArguments, DataArguments, OTOTrainingArguments), argv)


def run(
    model_args: ImageModelArguments, data_args: DataArguments, training_args: OTOTrainingArguments
) -> tuple[dict, Trainer]:
    """Trains, prunes (unless `--dense_baseline`) and evaluates; returns the results and the trainer."""
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    training_args.remove_unused_columns = False  # the transform needs the raw image column
    model_dir = (
        os.path.join(training_args.output_dir, "dense")
        if data_args.dense_baseline
        else data_args.pruned_model_dir or os.path.join(training_args.output_dir, "pruned")
    )
    # Before any work: another run's checkpoints, model or files in the folders, or a run still using them.
    check_run_dirs(
        training_args.output_dir,
        model_dir,
        overwrite=getattr(training_args, "overwrite_output_dir", False),
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        require_hspg=not data_args.dense_baseline,
    )
    if data_args.dense_baseline and training_args.push_to_hub:
        raise ValueError(
            "--dense_baseline trains a full-size model for comparison and --push_to_hub pushes slim models: drop "
            "--push_to_hub (push the baseline folder <output_dir>/dense yourself if you need it on the Hub)."
        )
    with output_dir_lock(training_args.output_dir, is_main_process=training_args.process_index == 0):
        return train_prune_and_save(model_args, data_args, training_args, model_dir)


def train_prune_and_save(
    model_args: ImageModelArguments, data_args: DataArguments, training_args: OTOTrainingArguments, model_dir: str
) -> tuple[dict, Trainer]:
    """The run, once its folders are checked and locked; the model goes to `model_dir`."""
    raw = load_raw_datasets(data_args, model_args.cache_dir)
    if training_args.do_train and "train" not in raw:
        raise ValueError("--do_train needs a training split: pass --train_dir (or a dataset with a train split).")
    if training_args.do_eval and "validation" not in raw:
        raise ValueError("--do_eval needs a validation split: pass --validation_dir (or a dataset with a test split).")
    reference_split = raw["train"] if "train" in raw else raw["validation"]
    image_column = resolve_image_column(data_args, reference_split)
    names = label_names(reference_split, data_args.label_column_name)
    first = np.asarray(reference_split[0][image_column])
    num_channels = 1 if first.ndim == 2 else 3

    model = build_model(model_args, names, num_channels)
    num_channels = model.config.num_channels
    image_size = getattr(model.config, "image_size", None) or 32
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    mean, std = channel_statistics(reference_split, image_column, num_channels)
    logger.info(
        f"{len(names)} classes; images as {num_channels} x {image_size} x {image_size}; mean {mean}, std {std}"
    )

    splits: dict[str, Dataset] = {}
    if "train" in raw:
        train = raw["train"].shuffle(seed=training_args.seed)
        if data_args.max_train_samples is not None:
            train = train.select(range(min(data_args.max_train_samples, len(train))))
        splits["train"] = train.with_transform(
            ImagePreprocessor(
                image_column, data_args.label_column_name, image_size, num_channels, mean, std, data_args.augment
            )
        )
    if "validation" in raw:
        validation = raw["validation"]
        if data_args.max_eval_samples is not None:
            validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
        splits["validation"] = validation.with_transform(
            ImagePreprocessor(image_column, data_args.label_column_name, image_size, num_channels, mean, std)
        )

    trainer_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=splits.get("train") if training_args.do_train else None,
        eval_dataset=splits.get("validation"),
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
    )
    # Saved with the model, so that the slim model runs in pipeline("image-classification").
    processor = OTOImageProcessor(image_size=image_size, num_channels=num_channels, image_mean=mean, image_std=std)
    if data_args.dense_baseline:
        trainer = Trainer(**trainer_kwargs, optimizer_cls_and_kwargs=dense_optimizer(training_args))
    else:
        trainer = OTOTrainer(**trainer_kwargs, processing_class=processor)
    results: dict = {"labels": names, "preprocessing": {"image_size": image_size, "mean": mean, "std": std}}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update({k if k.startswith("train") else f"train_{k}": v for k, v in train_result.metrics.items()})
        results["train_samples"] = len(splits["train"])
    if data_args.dense_baseline:
        results["dense_params"] = count_parameters(trainer.model)
        results["dense_flops"] = count_flops(trainer.model)
        if training_args.do_eval:
            results.update(trainer.evaluate())
            results["eval_samples"] = len(splits["validation"])
        trainer.save_model(model_dir)
        trainer.save_metrics("all", results)
        return results, trainer

    check_inputs = None
    if trainer.eval_dataset is None and trainer.train_dataset is None:
        dataset = splits.get("validation", splits.get("train"))
        check_inputs = default_data_collator([dataset[i] for i in range(min(8, len(dataset)))])

    def evaluate(trainer: OTOTrainer) -> dict:
        metrics = trainer.evaluate(eval_dataset=splits["validation"])
        return {**metrics, "eval_samples": len(splits["validation"])}

    finish_oto_run(
        trainer,
        results,
        data_args,
        pruned_dir=model_dir,
        do_eval=training_args.do_eval,
        evaluate=evaluate,
        check_inputs=check_inputs,
        tokenizer=processor,
        overwrite=getattr(training_args, "overwrite_output_dir", False),
        card_kwargs=card_metadata(
            dataset_name=data_args.dataset_name,
            dataset_config=data_args.dataset_config_name,
            license=data_args.license,
        ),
        push_to_hub=training_args.push_to_hub,
    )
    logger.info(f"OTO architecture (kept channels per family): {results['architecture']}")
    return results, trainer


def dense_optimizer(training_args: OTOTrainingArguments) -> tuple[type[torch.optim.Optimizer], dict]:
    """The base optimizer of HSPG without the group-lasso term, for the dense baseline: `torch.optim.SGD` with the
    OTO momentum for `oto_variant="sgd"`, `torch.optim.AdamW` with the run's betas and epsilon for `"adamw"`, both
    at the run's learning rate (the Trainer adds the weight decay with its no-decay groups, and the schedule)."""
    if training_args.oto_variant == "sgd":
        return torch.optim.SGD, {"lr": training_args.learning_rate, "momentum": training_args.oto_momentum}
    betas = (training_args.adam_beta1, training_args.adam_beta2)
    return torch.optim.AdamW, {"lr": training_args.learning_rate, "betas": betas, "eps": training_args.adam_epsilon}


def main(argv: list[str] | None = None) -> dict:
    """Parses the arguments (command line, or a single JSON file) and runs; returns the results."""
    results, _ = run(*parse_arguments(argv))
    return results


if __name__ == "__main__":
    try:
        main()
    except OnnxExportError as error:  # the slim model and all_results.json are saved: the message says where
        raise SystemExit(f"ERROR: {error}") from None
