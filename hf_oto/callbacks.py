"""Sparsity logging for OTO runs: the `oto/*` metrics and a `TrainerCallback` that adds them to the Trainer's logs."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .zig import SUPPORTED_FAMILIES, ZIGSet


logger = logging.get_logger(__name__)

STAGE_IDS = {"initialization": 0, "half_space": 1}
"""Numeric code of each HSPG stage in the logs (integrations such as TensorBoard only take numbers)."""


def unwrap_optimizer(optimizer: Any) -> Any:
    """Returns the innermost optimizer of wrappers such as Accelerate's `AcceleratedOptimizer` (attribute
    `optimizer`), or `None` when `optimizer` is `None`."""
    seen = set()
    while optimizer is not None and hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def oto_sparsity_logs(zigs: ZIGSet, optimizer: Optional[Any] = None) -> dict[str, float]:
    """The `oto/*` metrics of the current weights: numbers only, so that every reporting integration accepts them.

    Args:
        zigs ([`ZIGSet`]):
            The zero-invariant groups being trained.
        optimizer (`torch.optim.Optimizer`, *optional*):
            The HSPG optimizer, possibly wrapped (e.g. by Accelerate). When it has a `stage` property, the stage is
            logged as `oto/stage` (`0` = initialization, `1` = half-space).

    Returns:
        `dict[str, float]`: `oto/group_sparsity` (fraction of zero groups), `oto/group_sparsity_<kind>` for
        `heads` and `ffn` (only the kinds present), `oto/zero_groups` (count) and `oto/stage`; with HSPG's target
        mode also `oto/flops_kept` and `oto/params_kept` (fractions of the dense model's cost once the groups selected
        so far are removed).

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto import build_zigs
    >>> from hf_oto.callbacks import oto_sparsity_logs

    >>> zigs = build_zigs(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)))
    >>> oto_sparsity_logs(zigs)["oto/group_sparsity"]
    0.0
    ```
    """
    total_groups: dict[str, int] = defaultdict(int)
    zero_groups: dict[str, int] = defaultdict(int)
    for family, mask in zip(zigs.families, zigs.family_zero_masks().values()):
        total_groups[family.kind] += family.num_groups
        zero_groups[family.kind] += int(mask.sum())
    total, zeros = sum(total_groups.values()), sum(zero_groups.values())
    logs: dict[str, float] = {"oto/group_sparsity": zeros / total if total else 0.0}
    for kind in SUPPORTED_FAMILIES:
        if total_groups.get(kind):
            logs[f"oto/group_sparsity_{kind}"] = zero_groups[kind] / total_groups[kind]
    logs["oto/zero_groups"] = zeros
    stage = getattr(unwrap_optimizer(optimizer), "stage", None)
    if stage is not None:
        if stage not in STAGE_IDS:
            logger.warning_once(f"Unknown HSPG stage {stage!r}; expected one of {list(STAGE_IDS)}. Not logged.")
        else:
            logs["oto/stage"] = STAGE_IDS[stage]
    kept_fraction = getattr(unwrap_optimizer(optimizer), "kept_fraction", None)
    kept = kept_fraction() if callable(kept_fraction) else None
    if kept:  # target mode: the cost the model keeps once the groups selected so far are gone
        logs["oto/flops_kept"] = kept["flops"]
        logs["oto/params_kept"] = kept["params"]
    return logs


class OTOSparsityCallback(TrainerCallback):
    """Adds the `oto/*` sparsity metrics (see [`oto_sparsity_logs`]) to every log of a plain `Trainer` that trains
    with [`HSPG`] (passed through `Trainer(optimizers=(hspg, scheduler))`).

    [`OTOTrainer`] does not need it: it adds the metrics in its `log` override. Callbacks see the logs after the
    Trainer has stored them in `state.log_history` and in the order they were added, so this callback also updates
    the stored entry, and must come before the reporting callbacks (TensorBoard, progress bar) for them to show the
    metrics: add it with [`OTOSparsityCallback.install`].

    Args:
        zigs ([`ZIGSet`]): The zero-invariant groups being trained.

    Example:

    ```python
    >>> from transformers import Trainer
    >>> from hf_oto import build_zigs
    >>> from hf_oto.optim import HSPG
    >>> from hf_oto.callbacks import OTOSparsityCallback

    >>> zigs = build_zigs(model)
    >>> trainer = Trainer(model, args, train_dataset=dataset, optimizers=(HSPG(model.parameters(), zigs), None))
    >>> OTOSparsityCallback.install(trainer, zigs)
    >>> trainer.train()  # every log now holds oto/group_sparsity, oto/zero_groups, oto/stage, ...
    ```
    """

    def __init__(self, zigs: ZIGSet):
        self.zigs = zigs

    @classmethod
    def install(cls, trainer: Any, zigs: ZIGSet) -> OTOSparsityCallback:
        """Creates the callback and puts it first in `trainer`'s callbacks, before the reporting integrations."""
        callback = cls(zigs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Optional[dict[str, float]] = None,
        optimizer: Optional[Any] = None,
        **kwargs,
    ):
        if logs is None or any(key.startswith("oto/") for key in logs):
            return
        metrics = oto_sparsity_logs(self.zigs, optimizer)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
