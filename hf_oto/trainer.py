"""`OTOTrainer`: a `transformers.Trainer` that trains once with HSPG over zero-invariant groups, then prunes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

from .callbacks import oto_sparsity_logs, unwrap_optimizer
from .distributed import check_distributed_support
from .output_dir import check_output_dir
from .run_lock import RunLock
from .training_args import OTOTrainingArguments
from .zig import ZIGSet, build_zigs


logger = logging.get_logger(__name__)

_DEFAULT_OPTIMS = ("adamw_torch", "adamw_torch_fused")


class OTOTrainer(Trainer):
    r"""
    A [`~transformers.Trainer`] that trains a model once with the HSPG optimizer over its zero-invariant groups
    (attention heads and FFN rows), logs the group sparsity, and slices the zero groups away into a slim model with the
    same outputs.

    Everything else is the usual `Trainer`: learning-rate schedule and warm-up, gradient accumulation, max grad norm,
    evaluation, checkpoints and `resume_from_checkpoint` (the HSPG state is saved in `optimizer.pt` and restored; the
    optimizer state of a plain `Trainer` checkpoint, or one saved for other `oto_families` / `oto_exclude`, is
    refused with a `ValueError` saying how to resume the weights alone, see [`~hf_oto.optim.HSPG.load_state_dict`]).
    Frozen parameters are never changed, and a group family with a frozen member is neither penalised nor pruned.
    HSPG replaces the optimizer `args.optim` would choose; it takes the Trainer's weight-decay/no-weight-decay parameter
    groups, `learning_rate`, `weight_decay`, `adam_beta1`, `adam_beta2` and `adam_epsilon`, and the `oto_*`
    arguments of [`OTOTrainingArguments`].

    Every log gets `oto/group_sparsity`, `oto/group_sparsity_heads`, `oto/group_sparsity_ffn`, `oto/zero_groups` and
    `oto/stage` (`0` = initialization, `1` = half-space), so they show in the progress output, in
    `trainer.state.log_history` and in TensorBoard, W&B, etc.

    Args:
        model ([`~transformers.PreTrainedModel`], *optional*):
            A model of a `model_type` that hf_oto supports (see `hf_oto.TRANSFORMER_LAYOUTS`); others raise a
            `ValueError` here, before any training. Either `model` or `model_init` is required.
        args ([`OTOTrainingArguments`], *optional*):
            The arguments; defaults to `OTOTrainingArguments(output_dir="trainer_output")`.
        *trainer_args, **trainer_kwargs:
            Everything else [`~transformers.Trainer`] takes (`train_dataset`, `eval_dataset`, `data_collator`,
            `processing_class`, `compute_metrics`, `callbacks`, ...).

    Attributes:
        zigs ([`ZIGSet`]): The zero-invariant groups trained for sparsity; `None` once the model is pruned.
        oto_init_steps (`int`): Initialization-stage steps of the current run, resolved when training starts.
        pruning_report: The report of [`OTOTrainer.prune`], `None` before.
        pruned_model_dir (`str`): The folder the slim model was last saved to by [`OTOTrainer.save_pruned_model`]
            (what [`OTOTrainer.push_to_hub`] uploads), `None` before.
        oto_card_kwargs (`dict`): Arguments of [`hf_oto.model_card.create_model_card`] (`datasets`, `license`,
            `metrics`, `has_onnx`, ...) used by every card this trainer writes; set them before saving.

    Pushing to the Hub: with `push_to_hub=True` the `Trainer` would create the repository at construction and push the
    full-size model at every save. `OTOTrainer` pushes nothing during training (unless `oto_push_checkpoints=True`,
    which keeps the `Trainer`'s `hub_strategy` semantics) and [`OTOTrainer.push_to_hub`] uploads the slim folder
    once, after pruning, with [`hf_oto.hub.push_pruned_model`].

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_oto import OTOTrainer, OTOTrainingArguments, load_pruned_model

    >>> config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                     intermediate_size=37, num_labels=2)
    >>> model = BertForSequenceClassification(config)
    >>> data = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 32, "labels": [0, 1] * 16})
    >>> args = OTOTrainingArguments(
    ...     "oto-out", max_steps=20, learning_rate=1e-2, oto_lambda=20.0, oto_init_steps=6, oto_max_group_sparsity=0.5
    ... )
    >>> trainer = OTOTrainer(model, args, train_dataset=data, eval_dataset=data)
    >>> trainer.train()
    >>> trainer.state.log_history[-1]["oto/group_sparsity"] > 0
    True
    >>> slim = trainer.prune()  # checks that outputs equal the group-sparse model's on an eval batch
    >>> trainer.save_pruned_model("oto-out/pruned")
    >>> reloaded = load_pruned_model("oto-out/pruned", auto_class=BertForSequenceClassification)
    >>> trainer.push_to_hub()  # doctest: +SKIP  (uploads oto-out/pruned, once)
    ```
    """

    _tag_names = ["hf_oto", "only-train-once", "structured-pruning"]

    def __init__(
        self,
        model: Union[PreTrainedModel, nn.Module, None] = None,
        args: Optional[OTOTrainingArguments] = None,
        *trainer_args: Any,
        **trainer_kwargs: Any,
    ):
        if args is None:
            args = OTOTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, OTOTrainingArguments):
            raise TypeError(
                f"OTOTrainer needs OTOTrainingArguments (with the oto_* knobs); got {type(args).__name__}. Build it "
                "with `OTOTrainingArguments(...)` or parse it with `HfArgumentParser(OTOTrainingArguments)`."
            )
        # Fail on unsupported models before the Trainer sets anything up. The ZIGSet reads the parameters by name, so
        # it stays valid when the Trainer moves the model to its device.
        zigs = build_zigs(model, **args.zig_kwargs()) if model is not None else None
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # FSDP or DeepSpeed switched on by the launcher (`accelerate launch --use_fsdp`, an accelerate config) rather
        # than by the arguments, which refuse them already.
        if self.is_deepspeed_enabled:
            check_distributed_support("DEEPSPEED")
        if self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False):
            check_distributed_support("FSDP")
        check_distributed_support(self.accelerator.distributed_type)
        if zigs is None or zigs.model is not self.model:
            zigs = build_zigs(self.model, **args.zig_kwargs())
        self.zigs: Optional[ZIGSet] = zigs
        if getattr(self, "model_accepts_loss_kwargs", False) and not loss_uses_num_items_in_batch(self.model):
            # transformers 5 gives every model's forward `**kwargs`, and the Trainer then takes the loss as already
            # normalised by `num_items_in_batch`: it skips the division by the accumulation steps and, under DDP,
            # multiplies it by the number of processes. A head that computes a mean loss and drops the argument
            # (e.g. BertForSequenceClassification) would train on a gradient `accumulation x processes` too large,
            # and clipping and HSPG would see it: treat it as transformers 4 did.
            self.model_accepts_loss_kwargs = False
        self.oto_group_kinds: list[str] = list(zigs.num_groups_by_kind())
        self.oto_init_steps: Optional[int] = None
        self.pruning_report = None
        self.pruned_model_dir: Optional[str] = None
        self.oto_card_kwargs: dict[str, Any] = {}
        self._oto_num_training_steps: Optional[int] = None
        if self.optimizer is not None and not hasattr(unwrap_optimizer(self.optimizer), "stage"):
            logger.warning(
                f"OTOTrainer was given a {type(self.optimizer).__name__} optimizer instead of HSPG: it will not "
                "produce zero groups. Leave `optimizers` unset to train with HSPG."
            )
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim not in _DEFAULT_OPTIMS:
            logger.warning(f"OTOTrainer trains with HSPG; `optim={optim}` is ignored (see `oto_variant`).")
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        logger.info(f"OTOTrainer: {self.zigs!r}")

    # ------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------
    @property
    def is_pruned(self) -> bool:
        """Whether [`OTOTrainer.prune`] has sliced the model."""
        return self.pruning_report is not None

    def train(
        self,
        resume_from_checkpoint: Union[str, bool, None] = None,
        trial: Any = None,
        ignore_keys_for_eval: Optional[list[str]] = None,
        **kwargs: Any,
    ):
        """Trains as the `Trainer` does, after checking the output folder and while holding its lock.

        Before any step, [`hf_oto.output_dir.check_output_dir`] refuses an `output_dir` that holds anything but this
        run's resumable state (checkpoints of another model or run, a saved model, other files), unless
        `overwrite_output_dir=True`; and [`hf_oto.run_lock.RunLock`] makes this the only run writing into it (a second
        run on the same folder refuses to start). The main process does both (under DDP the others get its verdict);
        the lock is released when training ends or fails.
        """
        lock = self._claim_output_dir(resume_from_checkpoint, check=trial is None)
        try:
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        finally:
            if lock is not None:
                lock.release()

    def _claim_output_dir(
        self, resume_from_checkpoint: Union[str, bool, None], check: bool = True
    ) -> Optional[RunLock]:
        """Checks `args.output_dir` and takes its lock on the main process; the other processes raise its error."""
        error: Optional[Exception] = None
        lock = None
        if self.is_world_process_zero():
            try:
                if check:  # hyper-parameter search trials write into run-<N> subfolders of the same output_dir
                    check_output_dir(
                        self.args.output_dir,
                        overwrite=getattr(self.args, "overwrite_output_dir", False),
                        resume_from_checkpoint=resume_from_checkpoint,
                        model=self.model,
                    )
                lock = RunLock(self.args.output_dir).acquire()
            except (ValueError, RuntimeError) as raised:
                error = raised
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            verdict = [f"{type(error).__name__}: {error}" if error is not None else None]
            torch.distributed.broadcast_object_list(verdict, src=0)
            if error is None and verdict[0] is not None:
                raise RuntimeError(f"The main process refused to train in {self.args.output_dir!r}: {verdict[0]}")
        if error is not None:
            raise error
        return lock

    # ------------------------------------------------------------------------------------------------------------
    # Optimizer
    # ------------------------------------------------------------------------------------------------------------
    def create_optimizer_and_scheduler(self, num_training_steps: int):
        # The total number of optimizer steps is known here (and not in `create_optimizer`); keep it to resolve
        # `oto_init_fraction`.
        self._oto_num_training_steps = num_training_steps
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self) -> torch.optim.Optimizer:
        """Creates the HSPG optimizer over the Trainer's weight-decay/no-weight-decay parameter groups.

        The initialization stage lasts `args.oto_init_steps` optimizer steps, or `args.oto_init_fraction` of the total
        steps of the run (see [`OTOTrainingArguments.resolve_oto_init_steps`]).
        """
        if self.optimizer is not None:
            return self.optimizer
        if self.is_pruned:
            raise RuntimeError(
                "The model was already pruned by `OTOTrainer.prune()`; OTO trains once. Train the slim model with a "
                "plain `Trainer` if you want to fine-tune it."
            )
        from .optim import HSPG

        if self.zigs is None or self.zigs.model is not self.model:
            # `model_init` (hyper-parameter search) made a new model: rebuild its groups.
            self.zigs = build_zigs(self.model, **self.args.zig_kwargs())
        max_steps = self._oto_num_training_steps if self._oto_num_training_steps is not None else self.args.max_steps
        self.oto_init_steps = self.args.resolve_oto_init_steps(max(int(max_steps), 0))

        groups = hspg_param_groups(self.model, self.args.weight_decay, self.get_decay_parameter_names(self.model))
        self.optimizer = HSPG(
            groups,
            self.zigs,
            lr=self.args.learning_rate,
            init_steps=self.oto_init_steps,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            weight_decay=self.args.weight_decay,
            **self.args.hspg_kwargs(max_steps=max(int(max_steps), 0)),
        )
        if self.args.oto_mode == "target":
            schedule = self.optimizer.schedule
            # FLOPs of a text model are counted at oto_cost_seq_length tokens; a conv net's on one image
            tokens = any(family.kind != "channels" for family in self.zigs.families)
            at = f" at {self.args.oto_cost_seq_length} tokens" if tokens else ""
            logger.info(
                f"HSPG target mode ({self.args.oto_variant}) over {len(self.zigs)} groups: "
                f"{self.optimizer.target.describe()}{at}; groups selected at steps {schedule.start} to "
                f"{schedule.end - schedule.period} and exactly zero by step {schedule.end} of {max_steps}."
            )
        else:
            logger.info(
                f"HSPG paper mode ({self.args.oto_variant}, lambda={self.args.oto_lambda}, epsilon="
                f"{self.args.oto_epsilon}) over {len(self.zigs)} groups; initialization stage for {self.oto_init_steps} "
                f"of {max_steps} steps."
            )
        return self.optimizer

    # ------------------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Adds the `oto/*` sparsity metrics to `logs`, then logs as the `Trainer` does."""
        if self.zigs is not None and not self.is_pruned:
            logs = {**logs, **oto_sparsity_logs(self.zigs, self.optimizer)}
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------
    # Pruning and saving
    # ------------------------------------------------------------------------------------------------------------
    def _pruning_check_batch(self) -> dict[str, Any]:
        if self.eval_dataset is not None:
            dataloader = self.get_eval_dataloader()
        elif self.train_dataset is not None:
            dataloader = self.get_train_dataloader()
        else:
            raise ValueError(
                "OTOTrainer.prune() checks the slim model's outputs on a batch of the eval (or train) dataset, and "
                "the trainer has neither: pass `inputs=` (a dict of model inputs)."
            )
        return next(iter(dataloader))

    def prune(
        self,
        inputs: Optional[Mapping[str, Any]] = None,
        *,
        seq_length: Optional[int] = None,
        atol: Optional[float] = None,
    ) -> nn.Module:
        """Slices the zero groups out of the trained model and checks that its outputs are unchanged.

        The check runs the group-sparse model and the slim model (both in eval mode) on `inputs`, by default the
        first batch of the eval dataloader (or of the train dataloader without an eval dataset), and raises if any
        floating-point output differs by more than `atol`. After pruning, `trainer.model` is the slim model,
        `trainer.pruning_report` holds the report and the trainer no longer trains (OTO trains once).

        Args:
            inputs (`Mapping[str, Any]`, *optional*):
                Model inputs to check the outputs on.
            seq_length (`int`, *optional*):
                Sequence length at which the report counts FLOPs; defaults to 128, or the model's
                `max_position_embeddings` when smaller.
            atol (`float`, *optional*):
                Largest allowed absolute difference of the outputs; `1e-4` for float32 models, `1e-2` otherwise.

        Returns:
            `nn.Module`: the slim model.

        Example:

        ```python
        >>> trainer.train()
        >>> slim = trainer.prune()
        >>> trainer.pruning_report.to_dict()["params_after"] < trainer.pruning_report.to_dict()["params_before"]
        True
        ```
        """
        if self.is_pruned:
            logger.warning("The model is already pruned; returning it.")
            return self.model
        model = self.model
        if seq_length is None:
            seq_length = 128  # clamped to the model's max_position_embeddings where it counts FLOPs
        if atol is None:
            atol = default_pruning_atol(model)
        batch = self._prepare_inputs(dict(inputs if inputs is not None else self._pruning_check_batch()))
        zero_groups = self.zigs.num_zero_groups()
        slim, report, difference = prune_and_check(model, self.zigs, batch, seq_length=seq_length, atol=atol)
        self.model = slim
        self.model_wrapped = slim
        self.pruning_report = report
        self.zigs = None
        # The optimizer and scheduler hold the dense parameters; OTO does not train after pruning.
        self.optimizer = None
        self.lr_scheduler = None
        logger.info(f"Pruned {zero_groups} zero groups; max abs output difference {difference:.3g} <= {atol:g}.")
        return slim

    def finish(
        self,
        pruned_dir: Optional[str] = None,
        *,
        export_onnx: bool = False,
        benchmark_speedup: bool = False,
        push_to_hub: Optional[bool] = None,
        results: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Everything after `train()` in one call, the same step the training scripts run
        ([`hf_oto.run_outputs.finish_oto_run`]): prune, check the outputs, measure once, evaluate the slim model (when
        the trainer has an eval dataset), save it with its card, optionally export it to ONNX and measure its speedup,
        write `all_results.json`, optionally push.

        Args:
            pruned_dir (`str`, *optional*): Where the slim model goes; defaults to `<output_dir>/pruned`.
            export_onnx (`bool`, *optional*, defaults to `False`): Export to `<pruned_dir>/onnx` (the `onnx` extra).
            benchmark_speedup (`bool`, *optional*, defaults to `False`): Measure the ONNX Runtime speedup too.
            push_to_hub (`bool`, *optional*): Upload the slim folder once at the end; defaults to `args.push_to_hub`.
            results (`dict`, *optional*): Figures to include in `all_results.json` (e.g. the train metrics).
            kwargs: More arguments of [`~hf_oto.run_outputs.finish_oto_run`] (`evaluate`, `check_inputs`,
                `seq_length`, `card_kwargs`, `overwrite`, ...).

        Returns:
            `dict`: the results, also written to `<output_dir>/all_results.json`.

        Example:

        ```python
        >>> trainer.train()
        >>> results = trainer.finish(export_onnx=True)
        >>> results["flops_ratio"], results["eval_accuracy"]  # doctest: +SKIP
        ```
        """
        from .run_outputs import OTORunOutputArguments, finish_oto_run

        if self.is_pruned:
            raise ValueError("The model is already pruned: `finish()` prunes it itself; call it once after training.")
        output_args = OTORunOutputArguments(export_onnx=export_onnx, benchmark_speedup=benchmark_speedup)
        kwargs.setdefault("do_eval", self.eval_dataset is not None)
        kwargs.setdefault("tokenizer", self.processing_class)
        return finish_oto_run(
            self,
            dict(results or {}),
            output_args,
            pruned_dir=pruned_dir or os.path.join(self.args.output_dir, "pruned"),
            push_to_hub=self.args.push_to_hub if push_to_hub is None else push_to_hub,
            **kwargs,
        )

    def save_pruned_model(self, output_dir: Optional[str] = None, *, overwrite: bool = False) -> str:
        """Writes the pruned model in the Hub format (config with the kept heads and FFN sizes, safetensors weights,
        the processing class and a README.md model card) with `hf_oto.modeling.save_pruned_model`.

        Args:
            output_dir (`str`, *optional*):
                The folder; defaults to `args.output_dir`.
            overwrite (`bool`, *optional*, defaults to `False`):
                Replace a non-empty folder: the whole folder is replaced atomically (files that are not part of the
                saved model go too, see [`hf_oto.modeling.save_pruned_model`]). For `args.output_dir` itself only the
                model files are replaced (old weights, shards and indexes deleted); checkpoints and logs stay.

        Returns:
            `str`: the folder.

        Example:

        ```python
        >>> trainer.prune()
        >>> trainer.save_pruned_model("slim-bert")
        >>> model = load_pruned_model("slim-bert", auto_class=BertForSequenceClassification)
        ```
        """
        if not self.is_pruned:
            raise ValueError("No pruned model to save: call `trainer.prune()` after training first.")
        from .modeling import save_pruned_model

        directory = output_dir if output_dir is not None else self.args.output_dir
        into_output_dir = os.path.abspath(directory) == os.path.abspath(self.args.output_dir)
        if not into_output_dir:
            self.pruned_model_dir = directory
        if not self.args.should_save:
            return directory

        def write_card(staging: Path) -> None:
            self.write_oto_model_card(str(staging))

        if overwrite and into_output_dir:
            self._save_pruned_into_output_dir(write_card)
        else:
            save_pruned_model(
                self.model, directory, tokenizer=self.processing_class, overwrite=overwrite, write_extra=write_card
            )
        return directory

    def _save_pruned_into_output_dir(self, write_card: Any) -> None:
        """The slim model into `args.output_dir`, which also holds the run's checkpoints and logs: written complete
        into a temporary sibling folder first, then its files replace those of the same names, after the weights
        files of any earlier save (weights, shard indexes and shards) are deleted so that none wins at load time."""
        from .modeling import save_pruned_model

        directory = Path(self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{directory.name}.tmp-", dir=directory.absolute().parent) as tmp:
            staging = Path(tmp) / "model"
            save_pruned_model(self.model, staging, tokenizer=self.processing_class, write_extra=write_card)
            _remove_dense_weights(str(directory))
            for entry in sorted(staging.iterdir()):
                target = directory / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """Saves the dense model as the `Trainer` does, or the slim model with [`OTOTrainer.save_pruned_model`] once
        the model is pruned. Without `oto_push_checkpoints`, it never pushes (see [`OTOTrainer.push_to_hub`])."""
        if not self.is_pruned:
            # The Trainer pushes the model saved outside its own calls; OTOTrainer pushes the slim model only.
            return super().save_model(output_dir, _internal_call or not self.args.oto_push_checkpoints)
        directory = output_dir if output_dir is not None else self.args.output_dir
        self.save_pruned_model(directory, overwrite=True)
        if self.args.should_save:
            torch.save(self.args, os.path.join(directory, TRAINING_ARGS_NAME))

    # ------------------------------------------------------------------------------------------------------------
    # Hub
    # ------------------------------------------------------------------------------------------------------------
    def init_hf_repo(self, token: Optional[str] = None, **kwargs: Any) -> None:
        """Creates the Hub repository at construction only with `oto_push_checkpoints=True` (the `Trainer`'s
        behaviour, to push checkpoints); otherwise [`OTOTrainer.push_to_hub`] creates it when it uploads. Other
        arguments (`private` in transformers 5) go to `Trainer.init_hf_repo`."""
        if self.args.oto_push_checkpoints:
            return super().init_hf_repo(token=token, **kwargs)
        self.push_in_progress = None
        return None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer's push at each save uploads the full-size model: only when asked for.
        if self.args.oto_push_checkpoints:
            super()._push_from_checkpoint(checkpoint_folder)

    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """Uploads the slim model folder, once, to `args.hub_model_id` (default: the name of `args.output_dir`).

        The folder is the one [`OTOTrainer.save_pruned_model`] last wrote (else the slim model is saved into
        `<output_dir>/pruned` first): weights, `config.json` with the layout, the processing class, the card and its
        plot, and `onnx/` if exported. Checkpoints, logs and the output folder's other files are not uploaded. The
        upload is [`hf_oto.hub.push_pruned_model`] (`create_repo(..., exist_ok=True)` then `upload_folder`), from the
        main process, with `args.hub_token` and `args.hub_private_repo` unless `token` is given.

        Before pruning this raises a `ValueError`, unless `oto_push_checkpoints=True`: then it pushes the full-size
        model as `Trainer.push_to_hub` does.

        Args:
            commit_message (`str`, *optional*, defaults to `"End of training"`): The commit message.
            blocking (`bool`, *optional*, defaults to `True`): Wait for the upload; else return a `Future`.
            token (`str`, *optional*): A token with write access (default: `args.hub_token`).
            revision (`str`, *optional*): Branch to commit to (default: `args.hub_revision`).
            kwargs: Model-card arguments of `Trainer.create_model_card` (`license`, `language`, `tags`,
                `finetuned_from`, `dataset`, ...): the card is written again with them.

        Returns:
            The `CommitInfo` of the upload on the main process, `None` on the others.

        Example:

        ```python
        >>> trainer.prune()
        >>> trainer.save_pruned_model("bert-sst2-oto/slim")
        >>> trainer.push_to_hub()  # uploads bert-sst2-oto/slim, once
        ```
        """
        from .hub import push_pruned_model

        if not self.is_pruned:
            if self.args.oto_push_checkpoints:
                return super().push_to_hub(commit_message, blocking, token, revision, **kwargs)
            raise ValueError(
                "OTOTrainer.push_to_hub() uploads the slim model: call `trainer.prune()` first (after training). To "
                "push the full-size model as the Trainer does, set `oto_push_checkpoints=True`."
            )
        folder = self.pruned_model_dir or self.save_pruned_model(os.path.join(self.args.output_dir, "pruned"))
        card_kwargs = {
            "license": kwargs.get("license"),
            "language": kwargs.get("language"),
            "model_name": kwargs.get("model_name"),
            "base_model": kwargs.get("finetuned_from"),
            "tags": kwargs.get("tags"),
            "datasets": kwargs.get("dataset", kwargs.get("dataset_tags")),
        }
        card_kwargs = {
            key: [value] if key in ("tags", "datasets") and isinstance(value, str) else value
            for key, value in card_kwargs.items()
            if value is not None
        }
        if not self.is_world_process_zero():
            return None
        if card_kwargs:
            self.write_oto_model_card(folder, **card_kwargs)
        self._finish_current_push()
        return push_pruned_model(
            folder,
            self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
            token=token if token is not None else self.args.hub_token,
            private=self.args.hub_private_repo,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message or "Upload OTO-pruned model",
            blocking=blocking,
        )

    def create_model_card(
        self,
        language: Optional[str] = None,
        license: Optional[str] = None,
        tags: Union[str, list[str], None] = None,
        model_name: Optional[str] = None,
        finetuned_from: Optional[str] = None,
        tasks: Union[str, list[str], None] = None,
        dataset_tags: Union[str, list[str], None] = None,
        dataset: Union[str, list[str], None] = None,
        dataset_args: Union[str, list[str], None] = None,
    ) -> None:
        """The `Trainer`'s model card in `args.output_dir` before pruning; the OTO card of the pruned model (see
        [`OTOTrainer.write_oto_model_card`]) after. Arguments are those of `Trainer.create_model_card`."""
        if not self.is_pruned:
            return super().create_model_card(
                language=language,
                license=license,
                tags=tags,
                model_name=model_name,
                finetuned_from=finetuned_from,
                tasks=tasks,
                dataset_tags=dataset_tags,
                dataset=dataset,
                dataset_args=dataset_args,
            )
        if not self.is_world_process_zero():
            return None
        datasets = dataset if dataset is not None else dataset_tags
        self.write_oto_model_card(
            self.args.output_dir,
            model_name=model_name,
            base_model=finetuned_from,
            datasets=[datasets] if isinstance(datasets, str) else datasets,
            license=license,
            language=language,
            tags=[tags] if isinstance(tags, str) else tags,
        )
        return None

    def write_oto_model_card(self, directory: str, model_name: Optional[str] = None, **card_kwargs: Any) -> str:
        """Writes the README.md model card (and its layout plot) of the pruned model into `directory` with
        [`hf_oto.model_card.write_model_card`]: sizes before and after, kept heads and FFN rows per layer, the OTO
        hyper-parameters of this run and its latest evaluation metrics.

        Args:
            directory (`str`): The folder of the pruned model.
            model_name (`str`, *optional*): Title of the card; defaults to the name of `args.hub_model_id`, else the
                base model and the task (see [`hf_oto.model_card.card_title`]).
            card_kwargs: More arguments of [`hf_oto.model_card.create_model_card`] (`base_model`, `datasets`,
                `license`, `language`, `tags`, `metrics`, `speedup`, `has_onnx`, ...); `None` values are dropped.
                They are kept in `trainer.oto_card_kwargs`, so later cards of this trainer keep them.

        Returns:
            `str`: the path of the card.
        """
        from .model_card import create_model_card, write_model_card

        if not self.is_pruned:
            raise ValueError("No pruned model to describe: call `trainer.prune()` after training first.")
        config = getattr(self.model, "config", None)
        name_or_path = getattr(config, "_name_or_path", "") or ""
        if model_name is not None:
            card_kwargs["model_name"] = model_name
        self.oto_card_kwargs.update({key: value for key, value in card_kwargs.items() if value is not None})
        card_kwargs = dict(self.oto_card_kwargs)
        kwargs: dict[str, Any] = {
            "repo_id": self.args.hub_model_id,
            "base_model": name_or_path if name_or_path and not os.path.exists(name_or_path) else None,
            "auto_class": auto_class_name(self.model),
            "hyperparameters": self.oto_hyperparameters(),
            "metrics": self._latest_eval_metrics() or None,
            "tags": self._tag_names,
        }
        for key, value in card_kwargs.items():
            if value is not None:
                kwargs[key] = [*self._tag_names, *value] if key == "tags" else value
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        try:
            path = write_model_card(directory, self.pruning_report, **kwargs)
        except ImportError as error:  # the layout plot needs matplotlib
            logger.warning(f"Writing the model card without its layout plot ({error}).")
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "README.md")
            create_model_card(self.pruning_report, **kwargs).save(path)
        return str(path)

    def oto_hyperparameters(self) -> dict[str, Any]:
        """The OTO arguments of this run with the resolved initialization stage, the learning rate and total steps."""
        return {
            **self.args.oto_hyperparameters(),
            "oto_families": self.args.oto_families or self.oto_group_kinds,
            "oto_init_steps_resolved": self.oto_init_steps,
            "learning_rate": self.args.learning_rate,
            "lr_scheduler_type": str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)),
            "total_steps": self._oto_num_training_steps,
        }

    def _latest_eval_metrics(self) -> dict[str, float]:
        for entry in reversed(self.state.log_history):
            metrics = {
                key: float(value)
                for key, value in entry.items()
                if key.startswith("eval_")
                and isinstance(value, (int, float))
                and not key.endswith(("_runtime", "_per_second"))
            }
            if metrics:
                return metrics
        return {}


def loss_uses_num_items_in_batch(model: nn.Module) -> bool:
    """Whether `model`'s forward normalises its loss by the `num_items_in_batch` the `Trainer` passes it.

    A model class that states it (`accepts_loss_kwargs`) is believed; otherwise the forward's source must name
    `num_items_in_batch` or pass its `**kwargs` to `self.loss_function` (as transformers' causal-LM heads do). A
    forward whose source cannot be read is assumed to use it (the `Trainer`'s own assumption).
    """
    import inspect
    import re

    model = getattr(model, "module", model)  # a DDP wrapper
    stated = getattr(type(model), "accepts_loss_kwargs", None)
    if isinstance(stated, bool):
        return stated
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True
    return (
        "num_items_in_batch" in source
        or re.search(r"loss_function\((?:[^()]|\([^()]*\))*\*\*kwargs", source) is not None
    )


def hspg_param_groups(
    model: nn.Module, weight_decay: float, decay_parameter_names: Optional[list[str]] = None
) -> list[dict[str, Any]]:
    """The trainable parameters of `model` in the `Trainer`'s two param groups: with `weight_decay`, and without it
    (biases and norm weights, by the `Trainer`'s rule unless `decay_parameter_names` is given).

    Example:

    ```python
    >>> groups = hspg_param_groups(model, weight_decay=0.01)
    >>> optimizer = HSPG(groups, build_zigs(model), lr=2e-5, weight_decay=0.01)
    ```
    """
    if decay_parameter_names is None:
        # The Trainer's rule (`Trainer.get_decay_parameter_names` reads nothing from the instance).
        decay_parameter_names = Trainer.get_decay_parameter_names(None, model)
    decay = set(decay_parameter_names)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def default_pruning_atol(model: nn.Module) -> float:
    """Largest output difference [`prune_and_check`] allows: `1e-4` for float32 models, `1e-2` otherwise."""
    return 1e-4 if next(model.parameters()).dtype == torch.float32 else 1e-2


def prune_and_check(
    model: nn.Module,
    zigs: ZIGSet,
    inputs: Mapping[str, Any],
    *,
    seq_length: int = 128,
    atol: Optional[float] = None,
) -> tuple[nn.Module, Any, float]:
    """Slices the zero groups of `zigs` out of `model` (in place) and checks, on `inputs`, that the slim model gives
    the group-sparse model's outputs (both in eval mode; the training mode is restored afterwards).

    Args:
        model (`nn.Module`): The trained, group-sparse model.
        zigs ([`ZIGSet`]): Its zero-invariant groups.
        inputs (`Mapping[str, Any]`): A batch of model inputs, on the model's device.
        seq_length (`int`, *optional*, defaults to 128): Sequence length at which the report counts FLOPs.
        atol (`float`, *optional*): Largest allowed absolute output difference (see [`default_pruning_atol`]).

    Returns:
        `tuple`: the slim model, the [`~hf_oto.pruning.PruningReport`] and the largest absolute output difference.

    Example:

    ```python
    >>> slim, report, difference = prune_and_check(model, zigs, tokenizer(["a test"], return_tensors="pt"))
    ```
    """
    from .report import prune_and_measure

    if atol is None:
        atol = default_pruning_atol(model)
    batch = dict(inputs)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = model(**batch)
    slim, report = prune_and_measure(model, zigs, seq_length=seq_length, inplace=True)
    slim.eval()
    with torch.no_grad():
        outputs = slim(**batch)
    difference = _max_abs_difference(reference, outputs)
    if difference > atol:
        raise RuntimeError(
            f"The pruned model's outputs differ from the group-sparse model's by up to {difference:.3g} "
            f"(allowed: {atol:g}) on a batch of {len(next(iter(batch.values())))} examples. The groups were not "
            "zero-invariant: please report this with the model type and the OTO arguments."
        )
    if was_training:
        slim.train()
    return slim, report, difference


def auto_class_name(model: nn.Module) -> str:
    """`"AutoModelForSequenceClassification"` for `BertForSequenceClassification`, `"AutoModel"` for `BertModel`."""
    name = type(model).__name__
    return f"AutoModelFor{name.split('For', 1)[1]}" if "For" in name else "AutoModel"


def _remove_dense_weights(directory: str) -> None:
    """Deletes the weight files a dense `save_model` may have left in the Trainer's own output folder (sharded
    indexes take precedence over `model.safetensors` when loading), so that the folder holds the slim model only."""
    if not os.path.isdir(directory):
        return
    stale = [WEIGHTS_NAME, SAFE_WEIGHTS_NAME]
    for index_name in (WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_INDEX_NAME):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as handle:
                stale.extend(sorted(set(json.load(handle).get("weight_map", {}).values())))
            stale.append(index_name)
    for name in stale:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(directory):
            os.remove(path)
            logger.info(f"Removed the dense weights file {path} before saving the pruned model.")


def _floating_tensors(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() else []
    if isinstance(outputs, Mapping):
        values = outputs.values()
    elif isinstance(outputs, (tuple, list)):
        values = outputs
    else:
        return []
    return [tensor for value in values for tensor in _floating_tensors(value)]


def _max_abs_difference(reference: Any, outputs: Any) -> float:
    """Largest absolute difference between the floating-point tensors of two model outputs (of the same structure).

    A NaN or infinite value in either output is a failure (`RuntimeError`), never a difference of 0: `max(0.0, nan)`
    is 0.0 in Python, so a comparison of maxima would pass a model that outputs NaN.
    """
    expected, actual = _floating_tensors(reference), _floating_tensors(outputs)
    if len(expected) != len(actual) or not expected:
        raise RuntimeError(
            f"The pruned model returns {len(actual)} floating-point outputs, the group-sparse model {len(expected)}."
        )
    difference = 0.0
    for index, (left, right) in enumerate(zip(expected, actual)):
        if left.shape != right.shape:
            raise RuntimeError(f"Output shapes differ after pruning: {tuple(left.shape)} vs {tuple(right.shape)}.")
        for tensor, whose, hint in (
            (left, "group-sparse", "training diverged (lower the learning rate or lambda) or the weights hold NaN"),
            (right, "pruned", "pruning was not exact: please report this with the model type and the OTO arguments"),
        ):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise RuntimeError(
                    f"Output {index} of the {whose} model holds {bad} NaN or infinite values of {tensor.numel()} on "
                    f"the check batch, so the pruned model cannot be checked: {hint}."
                )
        difference = max(difference, float((left.float() - right.float()).abs().max()))
    return difference
