#!/usr/bin/env python
"""Train once and prune with OTO on a text classification task, with `accelerate.Accelerator` and no `Trainer`.

The same job as `run_text_classification_oto.py` (same data arguments and checks, same outputs: the pruned folder with
its model card and `all_results.json`), written as a plain training loop so that every step is in view: Accelerate
prepares the model, HSPG, the dataloaders and the learning-rate schedule; gradient accumulation goes through
`accelerator.accumulate`, mixed precision through `--mixed_precision` (bf16 on CPUs and recent GPUs, fp16 with loss
scaling on GPUs), checkpoints through `accelerator.save_state`/`load_state`. Pruning, evaluation of the slim model
and saving happen on the main process only.

Checkpoints go to `<output_dir>/checkpoints/step_<N>` every `--checkpointing_steps` optimizer steps and at the end.
Each is written under a temporary name and renamed once complete, so a job killed at any moment (even while
saving) resumes with `--resume_from_checkpoint latest` from its last complete checkpoint, and ends with the same
weights and zero groups as a run that was never interrupted (the data order, dropout RNG, HSPG state, schedule and
gradient-accumulation phase are all restored).

Usage:

```bash
# one process (CPU or one GPU), local files
python scripts/run_text_classification_oto_no_trainer.py --model_name_or_path path/to/model \
    --train_file train.csv --validation_file dev.csv --text_column_name sentence --label_column_name label \
    --output_dir outputs/oto-no-trainer --do_eval --per_device_train_batch_size 32 --learning_rate 2e-5 \
    --num_train_epochs 3 --oto_target_flops 0.5 --checkpointing_steps 500

# data parallel on 8 GPUs (DDP), bf16, global batch 8 x 16 x 2
accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 \
    scripts/run_text_classification_oto_no_trainer.py --model_name_or_path bert-base-uncased \
    --dataset_name glue --dataset_config_name sst2 --text_column_name sentence --output_dir outputs/sst2-oto \
    --do_eval --per_device_train_batch_size 16 --gradient_accumulation_steps 2 --checkpointing_steps 1000

# data parallel on 2 CPU processes (gloo): the same command without GPUs
accelerate launch --multi_gpu --num_processes 2 scripts/run_text_classification_oto_no_trainer.py ...

# a progress bar, TensorBoard logs, and the slim model pushed to the Hub at the end (once)
python scripts/run_text_classification_oto_no_trainer.py ... --report_to tensorboard --push_to_hub \
    --hub_model_id me/sst2-oto --license apache-2.0

# resume a killed job from its last complete checkpoint (same arguments)
python scripts/run_text_classification_oto_no_trainer.py ... --resume_from_checkpoint latest
```

FSDP and DeepSpeed are refused (see `hf_oto.distributed`): HSPG needs whole parameters on every rank.
"""

from __future__ import annotations

import copy
import json
import logging as std_logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import send_to_device
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    SchedulerType,
    default_data_collator,
    get_scheduler,
    set_seed,
)
from transformers.utils import logging

from hf_oto import HSPG, ZIGSet, build_zigs, save_pruned_model
from hf_oto.callbacks import oto_sparsity_logs, unwrap_optimizer
from hf_oto.distributed import check_distributed_support
from hf_oto.flops import clamp_flops_seq_length
from hf_oto.hub import push_pruned_model
from hf_oto.model_card import write_model_card
from hf_oto.output_dir import check_run_dirs
from hf_oto.run_lock import output_dir_lock
from hf_oto.run_outputs import (
    OnnxExportError,
    card_metadata,
    eval_metrics,
    finish_run_outputs,
    parse_script_arguments,
    pruning_results,
    relative_path,
    sparsity_results,
)
from hf_oto.trainer import auto_class_name, hspg_param_groups, prune_and_check
from hf_oto.training_args import OTOArguments
from oto_example_args import ModelArguments
from utils_text_classification import (
    DataTrainingArguments,
    TextClassificationSplits,
    compute_metrics,
    load_text_classification_splits,
    tokenize_splits,
)


logger = logging.get_logger("hf_oto.run_text_classification_oto_no_trainer")

CHECKPOINTS = "checkpoints"
"""Subfolder of `--output_dir` holding the checkpoints `step_<N>`."""
PARTIAL_PREFIX = ".partial-"
"""Prefix of a checkpoint being written; renamed to `step_<N>` once complete."""
PROGRESS_FILE = "training_progress.json"
"""The loop's [`TrainingProgress`] in a checkpoint, as JSON. Not `accelerator.register_for_checkpointing`: Accelerate
pickles registered objects to `custom_checkpoint_<i>.pkl` and `load_state` unpickles them with `weights_only=False`,
which runs whatever code a planted file holds."""


@dataclass
class LoopArguments:
    """The training loop: batch sizes, optimizer settings, schedule, precision, checkpoints and outputs."""

    output_dir: str = field(metadata={"help": "Where checkpoints, the slim model and all_results.json go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output folder that holds checkpoints or a slim model of another run."},
    )
    do_eval: bool = field(default=False, metadata={"help": "Evaluate the slim model on the validation split."})
    do_predict: bool = field(default=False, metadata={"help": "Write the slim model's predictions on the test split."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation batch size."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of HSPG."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (not on biases and norm weights)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (oto_variant adamw)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (oto_variant adamw)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon (oto_variant adamw)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 switches clipping off."})
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs, unless --max_steps is given."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps of the run; overrides --num_train_epochs."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr_scheduler_type: SchedulerType = field(default="linear", metadata={"help": "Learning-rate schedule."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up optimizer steps of the schedule."})
    seed: int = field(default=42, metadata={"help": "Seed of the model head, data order and dropout."})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "Mixed precision: bf16 (CPUs and recent GPUs) or fp16 (GPUs, with loss scaling: overflowing steps "
            "are skipped). Default: the launcher's (`accelerate launch --mixed_precision`, `accelerate config`), "
            "else no.",
            "choices": ["no", "fp16", "bf16"],
        },
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a checkpoint every N optimizer steps (and at the end)."}
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the last N checkpoints (default: all)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'latest' for the last complete one in <output_dir>/checkpoints."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss, learning rate and sparsity every N steps."})
    use_cpu: bool = field(
        default=False,
        metadata={"help": "Train on CPUs even if a GPU is available (chosen by itself on a machine without GPUs)."},
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Experiment trackers for the logs, through accelerate's `log_with`: none, all, or a comma-separated "
            "list such as tensorboard,wandb (logs go under <output_dir>)."
        },
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar (there is one on the main process)."})
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Push the slim folder (weights, layout, tokenizer, card) to the Hub once, at the end."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "The repository to push to (default: the name of --output_dir)."}
    )
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repository private."})
    hub_token: str | None = field(
        default=None, metadata={"help": "A token with write access (default: the one `huggingface-cli login` stored)."}
    )

    def __post_init__(self):
        self.lr_scheduler_type = SchedulerType(self.lr_scheduler_type)
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "logging_steps",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer; got {getattr(self, name)}.")
        for name in ("checkpointing_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive integer (or unset); got {value}.")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"--max_steps must be a positive number of steps (or -1 for epochs); got {self.max_steps}."
            )


@dataclass
class TrainingProgress:
    """Where the loop is; saved in every checkpoint as JSON ([`PROGRESS_FILE`]), never pickled."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def save(self, checkpoint: Path) -> None:
        """Writes the progress to `<checkpoint>/training_progress.json`."""
        (checkpoint / PROGRESS_FILE).write_text(json.dumps(self.state_dict(), indent=2) + "\n", encoding="utf-8")

    def load(self, checkpoint: Path) -> None:
        """Reads `<checkpoint>/training_progress.json` (JSON only: no code runs), checking its fields and types."""
        path = checkpoint / PROGRESS_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot read the training progress {str(path)!r} ({error}); resume from another checkpoint."
            ) from error
        fields = self.state_dict()
        if (
            not isinstance(state, dict)
            or set(state) != set(fields)
            or not all(
                isinstance(state[key], type(value)) and not isinstance(state[key], bool)
                for key, value in fields.items()
            )
        ):
            raise ValueError(
                f"{str(path)!r} is not the training progress of this script: expected the fields "
                f"{ {key: type(value).__name__ for key, value in fields.items()} }, got {state!r}."
            )
        self.load_state_dict(state)


def parse_arguments(argv: list[str] | None = None) -> tuple:
    """Parses the arguments from the command line, or from a single JSON file."""
    return parse_script_arguments((ModelArguments, DataTrainingArguments, OTOArguments, LoopArguments), argv)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints `step_<N>` under `<output_dir>/checkpoints`, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and path.name.startswith("step_")]
    return sorted((path for path in found if path.name[5:].isdigit()), key=lambda path: int(path.name[5:]))


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str) -> Path:
    """The folder to resume from: `latest` is the last complete checkpoint of `output_dir`."""
    if resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {os.path.join(output_dir, CHECKPOINTS)!r}"
                ". Drop the flag to start a new run."
            )
        return refuse_pickled_state(checkpoints[-1])
    path = Path(resume_from_checkpoint)
    if not (path / PROGRESS_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint of this script (expected a "
            f"folder <output_dir>/{CHECKPOINTS}/step_<N> with {PROGRESS_FILE}), or 'latest'."
        )
    return refuse_pickled_state(path)


def refuse_pickled_state(checkpoint: Path) -> Path:
    """Refuses a checkpoint holding `custom_checkpoint_*.pkl`: this script never writes one, and Accelerate's
    `load_state` would unpickle it with `weights_only=False`, running any code it holds."""
    planted = sorted(path.name for path in checkpoint.glob("custom_checkpoint_*.pkl"))
    if planted:
        raise ValueError(
            f"The checkpoint {str(checkpoint)!r} holds {planted}, which this script never writes (its progress is in "
            f"{PROGRESS_FILE}). Accelerate's `load_state` would unpickle it with `weights_only=False`, which runs any "
            "code it holds, so it is not loaded. Resume from a checkpoint written by this script, or delete the file "
            "if you know where it comes from (checkpoints of hf_oto versions that pickled the progress cannot be "
            "resumed)."
        )
    return checkpoint


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, progress: TrainingProgress, total_limit: int | None
) -> Path:
    """`accelerator.save_state` (and the progress as JSON) into a temporary folder, renamed to `step_<step>` once
    every process has written its part: a job killed while saving leaves the previous checkpoints intact."""
    step = progress.completed_steps
    folder = Path(output_dir) / CHECKPOINTS
    final, partial = folder / f"step_{step}", folder / f"{PARTIAL_PREFIX}step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        progress.save(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if total_limit is not None:
            for old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info(f"Saved checkpoint {final}.")
    accelerator.wait_for_everyone()
    return final


def evaluate(model: torch.nn.Module, dataloader: DataLoader) -> dict[str, float]:
    """Loss and metrics of `model` over `dataloader` (one process, on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels, losses = [], [], []
    with torch.no_grad():
        for batch in dataloader:
            outputs = model(**send_to_device(batch, device))
            losses.append(float(outputs.loss) * len(batch["labels"]))
            logits.append(outputs.logits.float().cpu().numpy())
            labels.append(batch["labels"].numpy())
    metrics = compute_metrics(EvalPrediction(predictions=np.concatenate(logits), label_ids=np.concatenate(labels)))
    metrics["loss"] = sum(losses) / sum(len(batch) for batch in labels)
    return {f"eval_{key}": value for key, value in metrics.items()}


def run(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    oto_args: OTOArguments,
    loop_args: LoopArguments,
) -> dict[str, Any]:
    """Trains with HSPG under Accelerate, prunes, evaluates and saves; returns the results (written to
    `all_results.json` by the main process)."""
    # Accelerate sets up multi-process CPU training only when told to run on the CPU; without it, each process
    # launched on a machine without GPUs would train alone.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=loop_args.use_cpu or not has_accelerator,
        gradient_accumulation_steps=loop_args.gradient_accumulation_steps,
        mixed_precision=loop_args.mixed_precision,
        # The data order of epoch e depends only on the seed and e: the same on every rank, and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=None if loop_args.report_to == "none" else loop_args.report_to.split(","),
        project_dir=loop_args.output_dir,
    )
    check_distributed_support(accelerator.distributed_type)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(
            f"The launcher started {launched} processes but Accelerate set up {accelerator.num_processes}: they would "
            "train independently. On CPUs pass --use_cpu; otherwise check the accelerate config (`accelerate env`)."
        )
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    if accelerator.is_main_process:
        logging.set_verbosity_info()
    else:
        logging.set_verbosity_error()
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        logger.warning("fp16 mixed precision needs a GPU with loss scaling; training in float32 here (try bf16).")
    logger.info(f"{accelerator.state}")

    pruned_dir = data_args.pruned_model_dir or os.path.join(loop_args.output_dir, "pruned")
    # Before any work: another run's checkpoints, model or files in the folders, or a run still using them. This
    # script's resumable state is its `checkpoints/` folder.
    check_run_dirs(
        loop_args.output_dir,
        pruned_dir,
        overwrite=loop_args.overwrite_output_dir,
        resume_from_checkpoint=loop_args.resume_from_checkpoint,
        run_entries=(CHECKPOINTS,),
    )
    with output_dir_lock(loop_args.output_dir, is_main_process=accelerator.is_main_process):
        return train_prune_and_save(accelerator, model_args, data_args, oto_args, loop_args, pruned_dir)


def train_prune_and_save(
    accelerator: Accelerator,
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    oto_args: OTOArguments,
    loop_args: LoopArguments,
    pruned_dir: str,
) -> dict[str, Any]:
    """The run, once its folders are checked and (on the main process) locked."""
    checkpoint = (
        resolve_checkpoint(loop_args.resume_from_checkpoint, loop_args.output_dir)
        if loop_args.resume_from_checkpoint
        else None
    )
    if accelerator.is_main_process:
        checkpoints = Path(loop_args.output_dir) / CHECKPOINTS
        if loop_args.overwrite_output_dir and checkpoint is None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        for partial in checkpoints.glob(f"{PARTIAL_PREFIX}*") if checkpoints.is_dir() else []:
            shutil.rmtree(partial, ignore_errors=True)  # left by a job killed while saving
    accelerator.wait_for_everyone()
    set_seed(loop_args.seed)

    data = load_text_classification_splits(
        data_args, model_args.cache_dir, do_eval=loop_args.do_eval, do_predict=loop_args.do_predict
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(data.label_list),
        id2label=data.id2label,
        label2id={name: index for index, name in data.id2label.items()},
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    zigs = build_zigs(model, **oto_args.zig_kwargs())
    logger.info(f"{zigs!r}")
    features, max_seq_length = tokenize_splits(
        data, data_args, tokenizer, main_process_first=lambda desc: accelerator.main_process_first()
    )
    collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer)
    train_dataloader = DataLoader(
        features["train"],
        shuffle=True,
        collate_fn=collator,
        batch_size=loop_args.per_device_train_batch_size,
        # Its own generator, so that creating an epoch's iterator never draws from the global RNG (dropout's).
        generator=torch.Generator().manual_seed(loop_args.seed),
    )
    train_dataloader = accelerator.prepare(train_dataloader)

    steps_per_epoch = math.ceil(len(train_dataloader) / loop_args.gradient_accumulation_steps)
    max_steps = loop_args.max_steps if loop_args.max_steps > 0 else loop_args.num_train_epochs * steps_per_epoch
    init_steps = oto_args.resolve_oto_init_steps(max_steps)
    optimizer = HSPG(
        hspg_param_groups(model, loop_args.weight_decay),
        zigs,
        lr=loop_args.learning_rate,
        init_steps=init_steps,
        betas=(loop_args.adam_beta1, loop_args.adam_beta2),
        eps=loop_args.adam_epsilon,
        weight_decay=loop_args.weight_decay,
        **oto_args.hspg_kwargs(max_steps=max_steps),
    )
    # Accelerate steps a prepared scheduler once per process at each optimizer step (it assumes the per-process
    # batch is a slice of a larger one): the schedule is laid out in those units.
    lr_scheduler = get_scheduler(
        loop_args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=loop_args.warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    progress = TrainingProgress()
    if checkpoint is not None:
        accelerator.load_state(str(refuse_pickled_state(checkpoint)))
        progress.load(checkpoint)
        logger.info(
            f"Resumed from {checkpoint} at step {progress.completed_steps} (HSPG stage "
            f"{unwrap_optimizer(optimizer).stage}, "
            f"{zigs.num_zero_groups()} zero groups)."
        )

    logger.info(
        f"Training for {max_steps} optimizer steps ({steps_per_epoch} per epoch; HSPG initialization stage: "
        f"{init_steps} steps), {accelerator.num_processes} process(es) x {loop_args.per_device_train_batch_size} "
        f"examples x {loop_args.gradient_accumulation_steps} accumulation steps, mixed precision "
        f"{accelerator.mixed_precision}."
    )
    if loop_args.report_to != "none":
        accelerator.init_trackers(
            "hf_oto_text_classification_no_trainer", config=tracker_config(model_args, data_args, oto_args, loop_args)
        )
    progress_bar = tqdm(
        total=max_steps,
        initial=progress.completed_steps,
        disable=loop_args.disable_tqdm or not accelerator.is_local_main_process,
        desc="Training",
    )
    model.train()
    hspg = unwrap_optimizer(optimizer)
    step_loss, step_batches = torch.zeros((), device=accelerator.device), 0
    window_loss, window_batches = 0.0, 0
    while progress.completed_steps < max_steps:
        train_dataloader.set_epoch(progress.epoch)
        epoch_loader = (
            accelerator.skip_first_batches(train_dataloader, progress.batches_in_epoch)
            if progress.batches_in_epoch
            else train_dataloader
        )
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and loop_args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), loop_args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            step_loss += loss.detach().float()
            step_batches += 1
            if not accelerator.sync_gradients:
                continue
            progress.completed_steps += 1
            progress_bar.update(1)
            step = progress.completed_steps
            # This process's losses (reduced over the processes at logging steps and at the end only).
            progress.loss_sum += float(step_loss)
            progress.loss_count += step_batches
            window_loss, window_batches = window_loss + float(step_loss), window_batches + step_batches
            step_loss.zero_()
            step_batches = 0
            if step % loop_args.logging_steps == 0 or step == max_steps:
                window = torch.tensor([window_loss, window_batches], device=accelerator.device, dtype=torch.float64)
                window = accelerator.reduce(window, reduction="sum")
                logs = {"loss": float(window[0] / window[1]), "learning_rate": lr_scheduler.get_last_lr()[0]}
                logs.update(oto_sparsity_logs(zigs, hspg))
                logger.info(f"step {step}/{max_steps}: {logs}")
                progress_bar.set_postfix(loss=f"{logs['loss']:.4g}")
                if loop_args.report_to != "none":
                    accelerator.log(logs, step=step)
                window_loss, window_batches = 0.0, 0
            if loop_args.checkpointing_steps and step % loop_args.checkpointing_steps == 0 and step < max_steps:
                save_checkpoint(accelerator, loop_args.output_dir, progress, loop_args.checkpoints_total_limit)
            if step >= max_steps:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    progress_bar.close()
    if loop_args.checkpointing_steps:
        save_checkpoint(accelerator, loop_args.output_dir, progress, loop_args.checkpoints_total_limit)

    totals = torch.tensor([progress.loss_sum, progress.loss_count], device=accelerator.device, dtype=torch.float64)
    totals = accelerator.reduce(totals, reduction="sum")
    results: dict[str, Any] = {
        "labels": [str(label) for label in data.label_list],
        "train_loss": float(totals[0] / totals[1].clamp(min=1)),
        "train_steps": progress.completed_steps,
        "train_samples": len(features["train"]),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "oto_init_steps_resolved": init_steps,
        "skipped_steps": hspg.skipped_steps,
        "resumed_from": relative_path(checkpoint, loop_args.output_dir) if checkpoint is not None else None,
        **sparsity_results(zigs),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_outputs(
            accelerator.unwrap_model(model, keep_fp32_wrapper=False),
            zigs,
            results,
            features,
            collator,
            tokenizer,
            data,
            model_args,
            data_args,
            oto_args,
            loop_args,
            pruned_dir=pruned_dir,
            max_seq_length=max_seq_length,
            total_steps=max_steps,
        )
        if loop_args.push_to_hub:  # the slim folder, once
            push_pruned_model(
                pruned_dir,
                loop_args.hub_model_id or Path(loop_args.output_dir).absolute().name,
                token=loop_args.hub_token,
                private=loop_args.hub_private_repo,
                commit_message="End of training",
            )
    accelerator.wait_for_everyone()
    # Release the DDP wrapper (its reducer holds the process group) before the process group is destroyed: a gloo
    # group destroyed under a live reducer can hang in its destructor at exit.
    model = optimizer = lr_scheduler = train_dataloader = epoch_loader = None
    accelerator.free_memory()
    accelerator.end_training()
    return results


def write_outputs(
    model: torch.nn.Module,
    zigs: ZIGSet,
    results: dict[str, Any],
    features: dict[str, Dataset],
    collator: Callable[[list[dict]], dict[str, torch.Tensor]],
    tokenizer: Any,
    data: TextClassificationSplits,
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    oto_args: OTOArguments,
    loop_args: LoopArguments,
    *,
    pruned_dir: str,
    max_seq_length: int,
    total_steps: int,
) -> None:
    """Main process: prune (checking the slim model's outputs), evaluate and predict with the slim model, save it
    with its card, and write `all_results.json`."""
    seq_length = clamp_flops_seq_length(model, data_args.flops_seq_length or max_seq_length)
    check_split = features["validation"] if "validation" in features else features["train"]
    device = next(model.parameters()).device
    check_batch = send_to_device(collator([check_split[i] for i in range(min(8, len(check_split)))]), device)
    # The full-size group-sparse model, kept only to measure the slim model's speedup against it.
    dense_reference = copy.deepcopy(model).eval() if data_args.benchmark_speedup else None
    slim, report, difference = prune_and_check(model, zigs, check_batch, seq_length=seq_length)
    logger.info(f"Pruned {results['zero_groups']} zero groups; max abs output difference {difference:.3g}.")
    results.update(pruning_results(report))  # parameters and FLOPs, counted once before and once after

    def loader(split: str) -> DataLoader:
        return DataLoader(features[split], collate_fn=collator, batch_size=loop_args.per_device_eval_batch_size)

    if loop_args.do_eval:
        results.update(evaluate(slim, loader("validation")))
        results["eval_samples"] = len(features["validation"])
    if loop_args.do_predict:
        slim.eval()
        with torch.no_grad():
            predictions = [slim(**send_to_device(batch, device)).logits.argmax(-1).cpu() for batch in loader("test")]
        predictions = torch.cat(predictions).tolist()
        results["predict_samples"] = len(predictions)
        Path(loop_args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(os.path.join(loop_args.output_dir, "predict_results.txt"), "w") as handle:
            handle.write("index\tprediction\n")
            handle.writelines(f"{index}\t{data.id2label[label]}\n" for index, label in enumerate(predictions))

    save_pruned_model(slim, pruned_dir, tokenizer=tokenizer, overwrite=loop_args.overwrite_output_dir)
    card_kwargs = {
        **card_metadata(
            dataset_name=data_args.dataset_name,
            dataset_config=data_args.dataset_config_name,
            license=data_args.license,
        ),
        "repo_id": loop_args.hub_model_id,
        "auto_class": auto_class_name(slim),
        "hyperparameters": {
            **oto_args.oto_hyperparameters(),
            "oto_families": oto_args.oto_families or list(zigs.num_groups_by_kind()),
            "oto_init_steps_resolved": results["oto_init_steps_resolved"],
            "learning_rate": loop_args.learning_rate,
            "lr_scheduler_type": loop_args.lr_scheduler_type.value,
            "total_steps": total_steps,
            "num_processes": results["num_processes"],
        },
        "metrics": eval_metrics(results) or None,
    }
    name_or_path = model_args.model_name_or_path
    if not os.path.exists(name_or_path):
        card_kwargs["base_model"] = name_or_path

    def write_card(directory: str, **extra: Any) -> None:
        write_model_card(directory, report, **card_kwargs, **extra)

    write_card(pruned_dir)
    finish_run_outputs(
        slim,
        results,
        pruned_dir=pruned_dir,
        output_dir=loop_args.output_dir,
        write_card=write_card,
        tokenizer=tokenizer,
        export_onnx=data_args.export_onnx,
        dense_reference=dense_reference,
        benchmark_batch_size=data_args.benchmark_batch_size,
        benchmark_repeats=data_args.benchmark_repeats,
        seq_length=seq_length,
    )


def tracker_config(*dataclasses: Any) -> dict[str, Any]:
    """The run's arguments as the flat dict of numbers, strings and booleans that trackers accept."""
    config: dict[str, Any] = {}
    for arguments in dataclasses:
        for key, value in asdict(arguments).items():
            if key == "hub_token":
                continue
            value = getattr(value, "value", value)
            if isinstance(value, (int, float, str, bool)):
                config[key] = value
    return config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses the arguments (command line, or a single JSON file) and runs; returns the results."""
    return run(*parse_arguments(argv))


if __name__ == "__main__":
    try:
        main()
    except OnnxExportError as error:  # the slim model and all_results.json are saved: the message says where
        raise SystemExit(f"ERROR: {error}") from None
