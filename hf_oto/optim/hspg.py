"""Half-Space Stochastic Projected Gradient (HSPG), the optimizer of "Only Train Once" (Chen et al., NeurIPS 2021).

HSPG minimises `f(x) + lmbda * sum_g ||x_g||_2` over the zero-invariant groups (ZIGs) of a model. It runs in two
stages (Algorithm 2 of the paper):

1. **Initialization stage** (the first `init_steps` calls of `step()`): stochastic subgradient steps, i.e. the base
   direction of `f` (SGD with momentum or AdamW) plus `lmbda * x_g / ||x_g||` on every penalised group.
2. **Half-space stage**: the same trial point `x~ = x - lr * d`, followed by the half-space projection (eq. 6): a
   non-zero group whose trial point leaves the half-space `x~_g^T x_g >= epsilon * ||x_g||^2` is set to exactly zero,
   and groups that are zero stay zero for the rest of training.

This module is the orchestration, written once for every base direction and both modes: the ZIG membership of the
parameters, the stages, the sparsity bounds, the group-lasso penalty, the half-space test and projection, and the
zeroing of dropped groups in the parameters and the optimizer state. The base direction `d` of `f` (SGD with momentum,
AdamW, or any direction registered by name) comes from `hf_oto.optim.directions`; the per-group views, norms and
budgets from `hf_oto.optim.group_ops`; the target mode's saliency, selection and ramps from `hf_oto.optim.target`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from transformers.utils import logging

from .._checks import require_finite
from ..costs import GroupCosts
from ..zig.groups import ZIGSet
from .directions import BaseDirection, Batch, Block, get_direction, state_keys
from .group_ops import Blocks, grouped, sparsity_budget, squared_norms
from .target import MODES, PruningTarget, Schedule, TargetSelection


logger = logging.get_logger(__name__)

INITIALIZATION = "initialization"
HALF_SPACE = "half_space"


# Elements per block and per intra-op thread of the fused pass over a penalised parameter (1 MB of float32 per thread):
# the blocks of its operands stay in the CPU caches between the successive operations on them, so each tensor is
# streamed from memory about once per step (2**16-2**20 measured on BERT-base with one thread, 2**18 the fastest;
# smaller blocks pay more per-op overhead, which grows with the number of threads).
_BLOCK = 1 << 18


@dataclass
class _Member:
    """Working record of one penalised parameter during one `step()` (never stored beyond it)."""

    param: torch.Tensor
    family: int
    dim: int
    num_groups: int
    group: dict[str, Any]
    squared_norm: torch.Tensor  # [num_groups], ||x_{m,g}||^2 at x_k
    live: torch.Tensor | None = None  # family with zero groups kept at zero: [num_groups] 1 (non-zero) / 0 (zero)
    d_dot_x: torch.Tensor | None = None  # [num_groups], d_{m,g}^T x_{m,g} at x_k (half-space stage only)


class HSPG(Optimizer):
    r"""Half-Space Stochastic Projected Gradient over the zero-invariant groups of a model.

    Minimises `f(x) + lmbda * sum_g ||x_g||_2`, where the sum runs over the groups of `zigs` and `x_g` gathers the
    `g`-th slice of every penalised member of a family (dependents are not penalised and, like every parameter
    outside the ZIGs, receive the plain base step).

    **Modes.** `mode="paper"` (the default) is the method of the paper, described below. `mode="target"` keeps the
    zero-invariant groups, the one training run and the exact zeros of the projection, but chooses the groups by the
    loss and by their cost, to a FLOPs or parameter `target` ([`PruningTarget`]): from `init_steps` on, at
    `pruning_periods` evenly spaced steps over `pruning_steps` steps, the groups with the smallest accumulated Taylor
    saliency per unit of FLOPs are selected and each is shrunk to exactly zero over one period, whatever its size;
    the other groups get no penalty (`lmbda` is not used) and train on. See `hf_oto.optim.target` for the details.

    **Stages** (paper mode). While `step_count < init_steps` HSPG takes subgradient steps (`d = base + lmbda * x_g / ||x_g||`,
    the subgradient of a zero group taken as 0); it never sets a group to zero by itself. From then on every step is
    a half-space step: with the trial point `x~ = x - lr * d`, each non-zero group with
    `x~_g^T x_g < epsilon * ||x_g||^2` (the sums run over all members of the family, each with the `lr` of its own
    param group) is set to exactly zero, and groups that are zero stay exactly zero (their rows of the momentum /
    Adam moments are zeroed too, so nothing can resurrect them).

    **Base directions.**

    - `variant="sgd"`: `torch.optim.SGD` semantics: `nu = grad + weight_decay * x + lmbda * zeta`,
      `buf = momentum * buf + nu` (`buf = nu` on the first step), `d = buf`, or `nu + momentum * buf` with
      `nesterov=True`.
    - `variant="adamw"`: Adam moments of the gradient of `f` only (bias-corrected), with the weight decay *and the
      group-lasso subgradient applied decoupled*: `x <- x - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * x +
      lmbda * zeta)`. Adam's normalisation would otherwise rescale the penalty by the inverse gradient magnitude;
      decoupled, `lmbda` means the same thing whatever the scale of the loss, and `lmbda=0` with no half-space step is
      exactly `torch.optim.AdamW`.

    Each is a [`~hf_oto.optim.directions.BaseDirection`] registered under its name; another one is added by writing
    one subclass and decorating it with [`~hf_oto.optim.directions.register_direction`] (see that module).

    **Missing gradients.** Parameters whose `grad` is `None` are skipped, as in torch. A family none of whose
    members has a gradient is skipped entirely (it keeps its values, and its zero groups stay zero); a penalised
    member without gradient whose family-mates have one is updated with a zero gradient of `f` (so it still feels
    the penalty and takes part in the half-space test).

    **Non-finite gradients.** With `skip_nonfinite=True` (the default) HSPG first checks that every gradient is
    finite (one read of the gradients and one host sync per step: about 4% of an AdamW step, a quarter of an SGD-momentum
    step of BERT-base on one CPU thread; `benchmarks/README.md`). If one holds an `inf`
    or a `NaN`, the whole step is skipped with a warning: parameters, moments, zero groups and the step count stay
    exactly as they were (a NaN would otherwise reach the group norms and, through the moments, every later step),
    and `skipped_steps` counts it, as `torch.amp.GradScaler` skips a step on an fp16 overflow. The `Trainer` and
    Accelerate do not see this skip (they do see the `GradScaler`'s): their learning-rate schedule still advances.

    **Frozen parameters** (`requires_grad=False`) are never changed, even with a gradient left on them. A family with
    a frozen member cannot be zeroed exactly, so while a member is frozen its family is neither penalised, selected
    nor projected (logged once per change, with the family names); its trainable members take the plain base step.
    A frozen member left out of `params` (as the `Trainer` leaves frozen parameters out) keeps its family out for the
    optimizer's lifetime. To prune a frozen layer's groups, unfreeze it; to silence the message, `exclude=` it.

    **Low precision.** The Adam moments of float16 / bfloat16 parameters are kept in float32 and their AdamW step is
    computed in float32, then rounded to the parameter's dtype once: in float16, `eps = 1e-8` rounds to 0 and the
    second moment of small gradients underflows, so `torch.optim.AdamW` turns a float16 model into NaN in one step
    (its fused variant into weights of thousands) and HSPG's zero groups would be `0 / 0`. Mixed precision
    (`torch.autocast`, `bf16=True` / `fp16=True` in the `Trainer`) keeps float32 parameters and needs none of this.

    **Non-finite hyper-parameters** (NaN or inf `lr`, `lmbda`, `weight_decay`, `eps`, ...) are refused with a
    `ValueError` at construction and, if a scheduler or your code writes one into a param group later, by `step()`
    before anything is updated.

    **Data parallel.** Under DDP every rank holds the whole parameters and the same all-reduced gradients, so every
    rank takes the identical step and zeroes the identical groups. Sharded parameters (FSDP, DeepSpeed ZeRO) are
    refused: a group norm computed on one rank's shard is not the group's norm.

    **State.** Everything lives in `self.state[p]` (`"step"`, `"momentum_buffer"` or `"exp_avg"`/`"exp_avg_sq"`)
    and in the param groups: `"step_count"` (number of steps taken), `"skipped_steps"` (steps skipped for
    non-finite gradients) and the ZIG membership of every parameter as
    lists parallel to `group["params"]`: `"zig_family"` (family index, `-1` outside the ZIGs), `"zig_dim"` and
    `"zig_num_groups"`. Membership is computed once at construction by matching tensors, so the optimizer survives
    Accelerate swapping the parameter objects and `state_dict()` / `load_state_dict()` resumes the identical
    trajectory. `load_state_dict()` takes the membership and the settings from the optimizer as constructed and only
    the trajectory (per-parameter state, step counters, `lr`) from the checkpoint; it refuses the state of another
    optimizer or of other groups (see [`HSPG.load_state_dict`]). Parameter groups added later with
    `add_param_group` are treated as outside the ZIGs.

    Args:
        params (`Iterable`):
            Parameters or param-group dicts, as every torch optimizer accepts them (e.g. the Trainer's groups with
            and without weight decay). Every penalised member of `zigs` must be in it.
        zigs ([`ZIGSet`]):
            The zero-invariant groups, e.g. from [`build_zigs`].
        lr (`float`, *optional*, defaults to 1e-3):
            Learning rate; read from each param group at every step, so any LR scheduler works.
        lmbda (`float`, *optional*, defaults to 1e-3):
            Weight of the group-lasso term. A param group may override it (e.g. `0` to exempt its members).
        epsilon (`float`, *optional*, defaults to 0.0):
            Aggressiveness of the half-space projection, in `[0, 1)`; larger zeros more groups.
        init_steps (`int`, *optional*, defaults to 0):
            Number of `step()` calls of the initialization stage. Optimizer-wide.
        variant (`str`, *optional*, defaults to `"adamw"`):
            Base direction: `"adamw"`, `"sgd"`, or the name of another registered
            [`~hf_oto.optim.directions.BaseDirection`].
        momentum (`float`, *optional*, defaults to 0.9):
            Momentum of the `"sgd"` variant, in `[0, 1)`.
        nesterov (`bool`, *optional*, defaults to `False`):
            Nesterov momentum for the `"sgd"` variant.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`):
            Adam coefficients of the `"adamw"` variant, each in `[0, 1)`.
        eps (`float`, *optional*, defaults to 1e-8):
            Adam's denominator term.
        weight_decay (`float`, *optional*, defaults to 0.0):
            L2 penalty added to the gradient (`"sgd"`) or decoupled weight decay (`"adamw"`).
        max_group_sparsity (`float`, *optional*):
            Upper bound in `(0, 1]` on the fraction of zero groups over the whole ZIGSet. When a half-space step would
            exceed it, only the groups with the smallest `x~_g^T x_g / ||x_g||^2` (ranked globally) are zeroed. Once
            the zero groups fill the bound, the group-lasso term is switched off: it could zero nothing more and would
            only bias the kept groups, which then train on `f` alone (zero groups stay zero). Optimizer-wide.
        max_family_sparsity (`float`, *optional*):
            Upper bound in `(0, 1]` on the fraction of each family's groups that HSPG may zero (e.g. `0.9`: every
            layer keeps at least a tenth of its channels, heads or FFN rows). Within a family, the groups with the
            smallest `x~_g^T x_g / ||x_g||^2` go first; once a family is full, the penalty on it is switched off, as
            for `max_group_sparsity`. Guards against a whole layer going to zero (which leaves a convolutional network
            with a constant output). Optimizer-wide.
        skip_nonfinite (`bool`, *optional*, defaults to `True`):
            Skip (with a warning) every step whose gradients hold an `inf` or a `NaN`, instead of letting them into the
            parameters, moments and group norms. Optimizer-wide.
        mode (`str`, *optional*, defaults to `"paper"`):
            `"paper"` (group-lasso subgradient + half-space projection, as in the paper) or `"target"` (loss- and
            cost-aware selection to `target`; needs `pruning_steps`).
        target ([`PruningTarget`], *optional*):
            Target mode: what to prune to (FLOPs and/or parameter fraction, per-kind caps, per-family floor). Defaults
            to `PruningTarget()`, i.e. 50% of the FLOPs.
        pruning_steps (`int`, *optional*):
            Target mode: length in steps of the pruning window that starts at `init_steps`; every selected group is
            exactly zero at `init_steps + pruning_steps` (rounded down to whole periods).
        pruning_periods (`int`, *optional*, defaults to 8):
            Target mode: number of selections in the pruning window (each group ramps to zero over one period).
        group_costs ([`~hf_oto.costs.GroupCosts`], *optional*):
            Target mode: the costs of the groups; measured on `zigs.model` at `cost_seq_length` tokens when not given.
        cost_seq_length (`int`, *optional*, defaults to 128):
            Target mode: the sequence length at which FLOPs are counted (the pruning report's default).

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_oto import build_zigs
    >>> from hf_oto.optim import HSPG

    >>> config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    >>> model = BertForSequenceClassification(config)
    >>> optimizer = HSPG(model.parameters(), build_zigs(model), lr=1e-3, lmbda=1e-2, init_steps=100)
    >>> inputs = {"input_ids": torch.randint(0, 100, (2, 8)), "labels": torch.tensor([0, 1])}
    >>> model(**inputs).loss.backward()
    >>> optimizer.step()
    >>> optimizer.stage, optimizer.step_count
    ('initialization', 1)
    ```
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        zigs: ZIGSet,
        lr: float = 1e-3,
        *,
        lmbda: float = 1e-3,
        epsilon: float = 0.0,
        init_steps: int = 0,
        variant: str = "adamw",
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_group_sparsity: float | None = None,
        skip_nonfinite: bool = True,
        max_family_sparsity: float | None = None,
        mode: str = "paper",
        target: PruningTarget | None = None,
        pruning_steps: int | None = None,
        pruning_periods: int = 8,
        group_costs: GroupCosts | None = None,
        cost_seq_length: int = 128,
    ):
        if not isinstance(zigs, ZIGSet):
            raise ValueError(
                f"`zigs` must be a ZIGSet (e.g. from `hf_oto.build_zigs(model)`); got {type(zigs).__name__}."
            )
        get_direction(variant)  # an unknown variant is refused here
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; choose one of {MODES}.")
        if not isinstance(init_steps, int) or isinstance(init_steps, bool) or init_steps < 0:
            raise ValueError(
                f"init_steps must be a non-negative integer (number of step() calls); got {init_steps!r}."
            )
        if max_family_sparsity is not None and not 0.0 < max_family_sparsity <= 1.0:
            raise ValueError(
                f"max_family_sparsity must be in (0, 1] (a fraction of each family's groups) or None; got "
                f"{max_family_sparsity}."
            )
        if max_group_sparsity is not None and not 0.0 < max_group_sparsity <= 1.0:
            raise ValueError(
                f"max_group_sparsity must be in (0, 1] (a fraction of the groups) or None; got {max_group_sparsity}."
            )
        defaults = dict(
            lr=lr,
            lmbda=lmbda,
            epsilon=epsilon,
            init_steps=init_steps,
            variant=variant,
            momentum=momentum,
            nesterov=nesterov,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            max_group_sparsity=max_group_sparsity,
            max_family_sparsity=max_family_sparsity,
            skip_nonfinite=bool(skip_nonfinite),
            mode=mode,
        )
        _validate_hyperparameters(defaults, where="")
        param_groups = _materialise(params)
        super().__init__(param_groups, defaults)
        for index, group in enumerate(self.param_groups):
            _validate_hyperparameters(group, where=f" (param group {index})")
            for key in _OPTIMIZER_WIDE:
                if group[key] != defaults[key]:
                    raise ValueError(
                        f"{key} is optimizer-wide: param group {index} sets {key}={group[key]!r} but the optimizer "
                        f"uses {defaults[key]!r}. Pass it to HSPG(...) instead of a param group."
                    )
        self.zigs = zigs
        self._assign_zig_membership(zigs)
        self.mode = mode
        self.target: PruningTarget | None = None
        self._selection: TargetSelection | None = None
        if mode == "target":
            self._set_up_target_mode(target, pruning_steps, pruning_periods, group_costs, cost_seq_length)
        elif target is not None or pruning_steps is not None or group_costs is not None:
            raise ValueError(
                '`target`, `pruning_steps` and `group_costs` belong to the target mode; pass `mode="target"` to use '
                "them (the paper mode prunes through `lmbda` and the sparsity bounds)."
            )

    def _set_up_target_mode(
        self,
        target: PruningTarget | None,
        pruning_steps: int | None,
        pruning_periods: int,
        group_costs: GroupCosts | None,
        cost_seq_length: int,
    ) -> None:
        if self.param_groups[0]["max_group_sparsity"] is not None:
            raise ValueError(
                "max_group_sparsity counts groups, not cost, and belongs to the paper mode; in the target mode state "
                "what to keep with `target=PruningTarget(flops=..., params=...)`."
            )
        if target is None:
            target = PruningTarget()
        if not isinstance(target, PruningTarget):
            raise ValueError(f"`target` must be a PruningTarget; got {type(target).__name__}.")
        if isinstance(pruning_periods, bool) or not isinstance(pruning_periods, int) or pruning_periods < 1:
            raise ValueError(f"pruning_periods must be an integer >= 1; got {pruning_periods!r}.")
        if (
            pruning_steps is None
            or isinstance(pruning_steps, bool)
            or not isinstance(pruning_steps, int)
            or pruning_steps < pruning_periods
        ):
            raise ValueError(
                f"The target mode needs `pruning_steps`, an integer >= pruning_periods ({pruning_periods}): the number "
                f"of steps, from init_steps on, over which groups are selected and ramped to zero; got {pruning_steps!r}."
            )
        if group_costs is None:
            group_costs = GroupCosts.measure(self.zigs, seq_length=cost_seq_length)
        schedule = Schedule(start=self.init_steps, period=pruning_steps // pruning_periods, periods=pruning_periods)
        self.target = target
        self._selection = TargetSelection(self, self.zigs, target, schedule, group_costs)
        logger.info(
            f"HSPG target mode: {target.describe()}; {pruning_periods} selections every {schedule.period} steps from "
            f"step {schedule.start}, every selected group exactly zero by step {schedule.end}."
        )

    # ------------------------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        count = len(group["params"])
        group.setdefault("zig_family", [-1] * count)
        group.setdefault("zig_dim", [-1] * count)
        group.setdefault("zig_num_groups", [0] * count)
        group.setdefault("step_count", max((g.get("step_count", 0) for g in self.param_groups), default=0))
        group.setdefault("skipped_steps", max((g.get("skipped_steps", 0) for g in self.param_groups), default=0))

    def _positions(self) -> dict[int, tuple[int, int]]:
        """The position `(param group, index)` of every parameter, by tensor identity (at construction only)."""
        return {
            id(param): (group_index, param_index)
            for group_index, group in enumerate(self.param_groups)
            for param_index, param in enumerate(group["params"])
        }

    def _assign_zig_membership(self, zigs: ZIGSet) -> None:
        """Writes the ZIG membership of every parameter into the param groups (`zig_family`, `zig_dim`,
        `zig_num_groups`) and keeps, per family, the positions and dims of its members (`_family_members`, in the
        order of the ZIGSet, empty for a family kept out by a frozen member left out of `params`)."""
        position = self._positions()
        missing = []
        frozen_out: set[int] = set()
        self._family_members: list[list[tuple[tuple[int, int], int]]] = [[] for _ in zigs.families]
        for family_index, family in enumerate(zigs.families):
            for member in family.members:
                param = zigs.parameter(member.param_name)
                _check_not_sharded(param, member.param_name)
                if id(param) not in position:
                    if param.requires_grad:
                        missing.append(member.param_name)
                    else:  # frozen and left out of `params` (as the Trainer does): the family cannot be zeroed
                        frozen_out.add(family_index)
                    continue
                group_index, param_index = position[id(param)]
                self._family_members[family_index].append(((group_index, param_index), member.dim))
                group = self.param_groups[group_index]
                group["zig_family"][param_index] = family_index
                group["zig_dim"][param_index] = member.dim
                group["zig_num_groups"][param_index] = family.num_groups
        # The other members of such a family train as parameters outside the ZIGs.
        for group in self.param_groups:
            for param_index, family_index in enumerate(group["zig_family"]):
                if family_index in frozen_out:
                    group["zig_family"][param_index], group["zig_dim"][param_index] = -1, -1
                    group["zig_num_groups"][param_index] = 0
        for family_index in frozen_out:
            self._family_members[family_index] = []
        self._frozen_out = frozen_out
        present_frozen = {
            family
            for group in self.param_groups
            for param, family in zip(group["params"], group["zig_family"])
            if family >= 0 and not param.requires_grad
        }
        self._logged_frozen: frozenset[int] = frozenset()
        self._log_frozen(frozen_out | present_frozen)
        if missing:
            shown = ", ".join(repr(name) for name in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(
                f"The ZIGSet penalises trainable parameters that are not in `params`: {shown}{more}. Pass all the "
                "model's trainable parameters to HSPG (e.g. `model.parameters()` or the Trainer's param groups), "
                "freeze these (`requires_grad=False`), or build the ZIGSet with `exclude=` so that it leaves them out."
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            count = len(group["params"])
            group.setdefault("lmbda", 1e-3)
            group.setdefault("epsilon", 0.0)
            group.setdefault("init_steps", 0)
            group.setdefault("variant", "adamw")
            group.setdefault("momentum", 0.9)
            group.setdefault("nesterov", False)
            group.setdefault("betas", (0.9, 0.999))
            group.setdefault("eps", 1e-8)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("max_group_sparsity", None)
            group.setdefault("max_family_sparsity", None)
            group.setdefault("skip_nonfinite", True)
            group.setdefault("mode", "paper")
            group.setdefault("zig_family", [-1] * count)
            group.setdefault("zig_dim", [-1] * count)
            group.setdefault("zig_num_groups", [0] * count)
            group.setdefault("step_count", 0)
            group.setdefault("skipped_steps", 0)

    # ------------------------------------------------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the trajectory of a checkpoint of this optimizer, for the zero-invariant groups of this run.

        `torch.optim.Optimizer.load_state_dict` would replace every param-group key with the checkpoint's, including
        the ZIG membership; HSPG splits them:

        - **From this run** (the optimizer as constructed): the ZIG membership of every parameter (`zig_family`,
          `zig_dim`, `zig_num_groups`), `mode`, `variant` and every other HSPG setting (`lmbda`, `epsilon`,
          `weight_decay`, `betas`, `eps`, `momentum`, `nesterov`, `init_steps`, the sparsity bounds,
          `skip_nonfinite`), so that what is penalised, projected and pruned is what this run's arguments say. A
          setting whose value differs from the checkpoint's is logged.
        - **From the checkpoint**: the per-parameter state (`exp_avg`, `exp_avg_sq`, `momentum_buffer`, `step`, the
          target mode's saliency and ramps; each tensor in the dtype it was saved in, so float32 moments of float16
          parameters stay float32), the step counters `step_count` and `skipped_steps`, the learning rate
          `lr` and the keys HSPG does not own (`initial_lr` and whatever else a scheduler keeps in the groups). The
          learning rate belongs to the trajectory: a scheduler writes it into the groups at each of its steps and, on
          resume (`Trainer`, `Accelerator.load_state`), restores only its own counters, so the first step after
          resuming must use the checkpoint's `lr` (as with any torch optimizer).

        Args:
            state_dict (`dict`):
                A state dict returned by `HSPG.state_dict()`.

        Raises:
            `ValueError`: if `state_dict` was saved by another optimizer (e.g. the `AdamW` of a plain `Trainer`
            checkpoint), or for other zero-invariant groups (other `oto_families`/`oto_exclude`, another model),
            another `mode` or `variant`, or other parameters (number per param group, shapes). Loading it would either
            train without the groups of this run or restore state that does not belong to them; the message says how
            to start the optimizer fresh instead.
        """
        self._check_loadable(state_dict)
        owned = set(self.defaults) | set(_MEMBERSHIP) | set(_COUNTERS)
        ours = [
            {key: group[key] for key in owned if key in group and key not in _FROM_CHECKPOINT}
            for group in self.param_groups
        ]
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype; HSPG's state keeps the dtype it was saved
        # with (float32 Adam moments of float16 / bfloat16 parameters, the target mode's integer ramp starts).
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for saved_id, param in zip(saved["params"], group["params"]):
                state = self.state.get(param, {})
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if (
                        key != "step"
                        and isinstance(value, torch.Tensor)
                        and key in state
                        and state[key].dtype != value.dtype
                    ):
                        state[key] = value.to(device=param.device, copy=True)
        changed: dict[str, tuple[Any, Any]] = {}
        for group, constructed in zip(self.param_groups, ours):
            for key, value in constructed.items():
                if key not in _MEMBERSHIP and group.get(key) != value:
                    changed.setdefault(key, (group.get(key), value))
                group[key] = value
        if changed:
            listed = ", ".join(f"{key}={new!r} (checkpoint: {old!r})" for key, (old, new) in sorted(changed.items()))
            logger.warning(f"HSPG resumes with this run's settings, which differ from the checkpoint's: {listed}.")

    def _check_loadable(self, state_dict: Any) -> None:
        """Raises a `ValueError` naming the difference if `state_dict` is not HSPG state for this run's ZIGs."""
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if not isinstance(saved_groups, list) or not isinstance(state_dict.get("state"), Mapping):
            raise ValueError(
                f"HSPG.load_state_dict expects the dict of `optimizer.state_dict()`; got {type(state_dict).__name__}."
            )
        if not saved_groups or any(
            not isinstance(group, Mapping) or "zig_family" not in group for group in saved_groups
        ):
            raise ValueError(
                f"The checkpoint's optimizer state was saved by {_describe_optimizer(saved_groups)}, not HSPG: it has "
                "no zero-invariant groups, and resuming from it would train this run without them. " + _START_FRESH
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"The checkpoint's optimizer state has {len(saved_groups)} param groups, this HSPG has "
                f"{len(self.param_groups)} (e.g. weight decay switched on or off, or another model). " + _START_FRESH
            )
        names = {id(param): name for name, param in self.zigs.model.named_parameters()}
        for key in _STRUCTURAL:
            saved = saved_groups[0].get(key)
            if saved is not None and saved != self.param_groups[0][key]:
                raise ValueError(
                    f"The checkpoint's optimizer state was saved with {key}={saved!r}; this run uses "
                    f"{key}={self.param_groups[0][key]!r}, under which that state means something else. Resume with "
                    f"{key}={saved!r}, or: " + _START_FRESH
                )
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"Param group {index} of the checkpoint's optimizer state has {len(saved['params'])} parameters, "
                    f"this HSPG's has {len(group['params'])} (another model, or other parameters frozen). "
                    + _START_FRESH
                )
            for position, param in enumerate(group["params"]):
                theirs = tuple(saved[key][position] for key in _MEMBERSHIP)
                mine = tuple(group[key][position] for key in _MEMBERSHIP)
                name = names.get(id(param), f"parameter {position} of param group {index}")
                if theirs != mine:
                    raise ValueError(
                        f"The checkpoint's optimizer state was saved for other zero-invariant groups: {name!r} is "
                        f"{self._describe_membership(theirs, 'checkpoint')} in it, and "
                        f"{self._describe_membership(mine, 'run')} in this run (other `oto_families`/`oto_exclude` "
                        "or `families`/`exclude` of `build_zigs`, other frozen parameters, or another model). Resume "
                        "with the groups of the checkpoint, or: " + _START_FRESH
                    )
                state = state_dict["state"].get(saved["params"][position], {})
                for key in state_keys():
                    value = state.get(key)
                    if isinstance(value, torch.Tensor) and value.shape != param.shape:
                        raise ValueError(
                            f"The checkpoint's optimizer state holds a {key} of shape {tuple(value.shape)} for "
                            f"{name!r}, of shape {tuple(param.shape)} in this run: it was saved for another model. "
                            + _START_FRESH
                        )

    def _describe_membership(self, membership: tuple[int, int, int], where: str) -> str:
        family, dim, num_groups = membership
        if family < 0:
            return "outside the zero-invariant groups"
        known = where == "run" and family < len(self.zigs.families)
        label = f"family {family} ({self.zigs.families[family].name!r})" if known else f"family {family}"
        return f"a member of {label}, split along dim {dim} into {num_groups} groups"

    # ------------------------------------------------------------------------------------------------------------
    # Read-only helpers
    # ------------------------------------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Number of `step()` calls so far (restored by `load_state_dict`)."""
        return max(group["step_count"] for group in self.param_groups)

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because a gradient was not finite (restored by `load_state_dict`)."""
        return max(group.get("skipped_steps", 0) for group in self.param_groups)

    @property
    def init_steps(self) -> int:
        return self.param_groups[0]["init_steps"]

    @property
    def stage(self) -> str:
        """`"initialization"` or `"half_space"`: the stage the *next* `step()` runs."""
        return HALF_SPACE if self.step_count >= self.init_steps else INITIALIZATION

    def group_sparsity(self) -> float:
        """Fraction of the ZIGSet's groups that are exactly zero now."""
        return self.zigs.group_sparsity()

    @property
    def schedule(self) -> Schedule | None:
        """Target mode: when groups are scored, selected and ramped; `None` in the paper mode."""
        return self._selection.schedule if self._selection is not None else None

    @torch.no_grad()
    def kept_fraction(self) -> dict[str, float] | None:
        """Target mode: `{"flops": ..., "params": ...}`, the fractions of the dense model's cost kept once the groups
        selected so far are removed; `None` in the paper mode."""
        if self._selection is None:
            return None
        norms = {index: norm.square() for index, norm in enumerate(self.zigs.family_norms())}
        return self._selection.kept_fraction(norms)

    # ------------------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Performs one HSPG step.

        Args:
            closure (`Callable`, *optional*):
                Re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        count = self.step_count
        for index, group in enumerate(self.param_groups):
            # A scheduler or the user may have written a NaN into a group since the last step: refuse it before
            # anything is touched rather than write NaN into every parameter.
            _validate_hyperparameters(group, where=f" of param group {index} at step {count} (nothing was updated)")
        if self.param_groups[0]["skip_nonfinite"] and self._skip_nonfinite(count):
            return loss
        half_space = count >= self.init_steps
        if half_space and count == self.init_steps:
            logger.info(
                f"HSPG: half-space stage starts at step {count} (group sparsity so far: {self._sparsity():.3f})."
            )

        # Families with at least one gradient take part in this step, unless a member is frozen: a frozen parameter
        # is never changed, so its family can be neither shrunk nor zeroed (its other members take the plain step).
        active: set[int] = set()
        frozen: set[int] = set()
        for group in self.param_groups:
            for param, family in zip(group["params"], group["zig_family"]):
                if family < 0:
                    continue
                if not param.requires_grad:
                    frozen.add(family)
                elif param.grad is not None:
                    active.add(family)
        active -= frozen
        if frozen | self._frozen_out != self._logged_frozen:
            self._log_frozen(frozen | self._frozen_out)

        # Phase 0: group norms at x_k, batched per parameter and accumulated per family.
        members, all_members, family_squared, family_size = self._members(active, frozen)
        if self._selection is not None:
            # Target mode: the groups are chosen by the selection (on its schedule) and get no penalty.
            self._select_on_schedule(count, family_squared, frozen)
            inverse_norm = {family: torch.zeros_like(squared) for family, squared in family_squared.items()}
            keep_zero, half_space = True, False
        else:
            inverse_norm = self._inverse_norms(family_squared, family_size)
            keep_zero = half_space

        # In the half-space stage (and in the target mode) the groups that are zero at x_k stay zero: one host sync
        # tells which families have any, and only their members mask those rows (of the direction and of the
        # optimizer state) in the fused pass below.
        if keep_zero:
            self._mark_live(members, family_squared)

        # Phase A: the update x <- x - lr * d. Parameters outside the ZIGs take the base direction's own step; each
        # penalised member is updated in one fused pass over blocks of its groups, which also yields d_g^T x_g at x_k.
        self._base_step(members, inverse_norm, half_space)

        # Phase B: the projection. Paper mode: the half-space test per family, from the norms and dot products at
        # x_k; target mode: the ramps. The rows of the newly dropped groups are then set to zero in the parameters
        # and in the optimizer state.
        drop: dict[int, torch.Tensor] = {}
        if self._selection is not None:
            drop = self._selection.ramp(count, frozen)
        elif half_space and members:
            drop = self._half_space_drop(members, family_squared, family_size)
        if drop:
            self._zero_dropped(all_members, drop, family_size)

        for group in self.param_groups:
            group["step_count"] = count + 1
        return loss

    def _members(
        self, active: set[int], frozen: set[int]
    ) -> tuple[list[_Member], list[_Member], dict[int, torch.Tensor], dict[int, int]]:
        """The penalised members of the `active` families and of every family not `frozen`, with the squared group
        norms of every family at x_k and its number of groups."""
        members: list[_Member] = []
        all_members: list[_Member] = []
        family_squared: dict[int, torch.Tensor] = {}
        family_size: dict[int, int] = {}
        for group in self.param_groups:
            for param, family, dim, num_groups in zip(
                group["params"], group["zig_family"], group["zig_dim"], group["zig_num_groups"]
            ):
                if family < 0:
                    continue
                _check_not_sharded(param, f"a member of family {family}")
                squared = squared_norms(param.detach(), dim, num_groups)
                family_squared[family] = squared if family not in family_squared else family_squared[family] + squared
                family_size[family] = num_groups
                if family in frozen:
                    continue
                record = _Member(param, family, dim, num_groups, group, squared)
                all_members.append(record)
                if family in active:
                    members.append(record)
        return members, all_members, family_squared, family_size

    def _inverse_norms(
        self, family_squared: dict[int, torch.Tensor], family_size: dict[int, int]
    ) -> dict[int, torch.Tensor]:
        """Per family, `1 / ||x_g||` (0 for a zero group): the group-lasso subgradient is `lmbda * x_g / ||x_g||`.

        All zeros once the sparsity bounds are filled (`max_group_sparsity` for every family, `max_family_sparsity`
        for a full family): no further group may be zeroed, so the penalty could only shrink the kept groups; it is
        switched off and they train on f alone (zero groups still stay zero)."""
        if self._bound_reached(family_squared, family_size):
            return {family: torch.zeros_like(squared) for family, squared in family_squared.items()}
        full = self._full_families(family_squared, family_size)
        return {
            family: torch.zeros_like(squared)
            if family in full
            else torch.where(squared > 0, squared.rsqrt(), torch.zeros_like(squared))
            for family, squared in family_squared.items()
        }

    def _select_on_schedule(self, count: int, family_squared: dict[int, torch.Tensor], frozen: set[int]) -> None:
        """Target mode, before the base step of step `count`: selects groups and accumulates saliency on schedule."""
        schedule = self._selection.schedule
        index = schedule.selection_index(count)
        if index is not None:
            self._selection.select(count, index, family_squared, frozen)
        if schedule.scoring(count):
            self._selection.accumulate_saliency()

    @staticmethod
    def _mark_live(members: list[_Member], family_squared: dict[int, torch.Tensor]) -> None:
        """Gives the members of every family that has zero groups at x_k its `live` mask (1 non-zero, 0 zero), so
        that the fused pass keeps those rows, and their optimizer state, at zero. One host sync."""
        if not members:
            return
        families = sorted({member.family for member in members})
        any_zero = torch.stack([(family_squared[f] == 0).any() for f in families]).tolist()
        live = {f: family_squared[f] > 0 for f, flag in zip(families, any_zero) if flag}
        for member in members:
            if member.family in live:
                member.live = live[member.family].to(member.param.dtype)

    def _base_step(self, members: list[_Member], inverse_norm: dict[int, torch.Tensor], half_space: bool) -> None:
        """x <- x - lr * d for every param group, with the base direction of its variant."""
        by_param = {id(member.param): member for member in members}  # local to this call
        for group in self.param_groups:
            params, grads, records = self._gather(group, by_param)
            if not params:
                continue
            direction = get_direction(group["variant"])
            states = [self.state[param] for param in params]
            batch = Batch(group, params, grads, states, [record is not None for record in records])
            contexts = direction.prepare(batch)
            plain = [i for i, record in enumerate(records) if record is None]
            if plain:
                direction.plain_step(batch.subset(plain), [contexts[i] for i in plain])
            for i, record in enumerate(records):
                if record is not None:
                    self._member_step(
                        record, direction, grads[i], states[i], contexts[i], inverse_norm[record.family], half_space
                    )

    def _skip_nonfinite(self, count: int) -> bool:
        """Whether a gradient holds an `inf` or a `NaN` (one read of the gradients, one host sync); if so, counts the
        skipped step and warns. Nothing else is touched."""
        grads = [
            param.grad
            for group in self.param_groups
            for param in group["params"]
            if param.grad is not None and param.requires_grad
        ]
        grads = [grad for grad in grads if not grad.is_sparse and grad.numel() > 0]
        if not grads:
            return False
        # The float32 sum of each gradient is finite exactly when the gradient is (an inf or NaN propagates; a finite
        # gradient whose sum overflows float32, |sum| > 3e38, is broken too). One read of the gradients: about 4% of
        # an AdamW step and 20% of an SGD-momentum step of BERT-base on one CPU thread (aminmax costs 1.5x that, the
        # foreach inf-norm 20x).
        sums = torch.stack([grad.sum(dtype=torch.float32) for grad in grads])
        bad = int((~sums.isfinite()).sum())
        if bad == 0:
            return False
        for group in self.param_groups:
            group["skipped_steps"] = group.get("skipped_steps", 0) + 1
        logger.warning(
            f"HSPG: non-finite gradients (inf or NaN) in {bad} of {len(grads)} parameters at step {count}; the step "
            "is skipped (parameters, optimizer state, zero groups and the step count are unchanged; "
            f"{self.skipped_steps} skipped so far). If this repeats, lower the learning rate, clip the gradients "
            "(`max_grad_norm`) or train in bf16 rather than fp16."
        )
        return True

    def _bound_reached(self, family_squared: dict[int, torch.Tensor], family_size: dict[int, int]) -> bool:
        """Whether the zero groups already fill `max_group_sparsity` (one host sync; `False` without a bound)."""
        bound = self.param_groups[0]["max_group_sparsity"]
        if bound is None or not family_squared:
            return False
        zeros = sum((squared == 0).sum() for squared in family_squared.values())
        return int(zeros) >= sparsity_budget(bound, sum(family_size.values()))

    def _full_families(self, family_squared: dict[int, torch.Tensor], family_size: dict[int, int]) -> set[int]:
        """Families whose zero groups already fill `max_family_sparsity` (one host sync; empty without a bound)."""
        bound = self.param_groups[0].get("max_family_sparsity")
        if bound is None or not family_squared:
            return set()
        families = sorted(family_squared)
        zeros = torch.stack([(family_squared[f] == 0).sum() for f in families]).tolist()
        return {f for f, count in zip(families, zeros) if count >= sparsity_budget(bound, family_size[f])}

    def _log_frozen(self, frozen: set[int]) -> None:
        """Logs (once per change) the families kept out of the penalty and projection by a frozen member."""
        self._logged_frozen = frozenset(frozen)
        if frozen:
            names = [self.zigs.families[family].name for family in sorted(frozen)]
            shown = ", ".join(repr(name) for name in names[:8]) + (
                f" and {len(names) - 8} more" if len(names) > 8 else ""
            )
            logger.warning(
                f"HSPG: {len(names)} group families have a frozen member (requires_grad=False): {shown}. A frozen "
                "parameter is never changed, so these families are neither penalised nor zeroed (nor pruned) while "
                "it stays frozen; their trainable members take the plain step. Leave them out of the ZIGs with "
                "`exclude=` (`oto_exclude`) to silence this."
            )

    def _sparsity(self) -> float:
        try:
            return self.zigs.group_sparsity()
        except Exception:  # the model may have been swapped; logging must not fail
            return float("nan")

    def _gather(
        self, group: dict[str, Any], by_param: dict[int, _Member]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[_Member | None]]:
        """The parameters of `group` that take this step, their gradients of `f` (zeros for a penalised member
        without one) and their member records (`None` outside the ZIGs); frozen parameters are left out."""
        params, grads, records = [], [], []
        for param in group["params"]:
            if not param.requires_grad:  # frozen: never changed, even with a stale gradient
                continue
            member = by_param.get(id(param))
            grad = param.grad
            if grad is None:
                if member is None:
                    continue
                grad = torch.zeros_like(param)
            if grad.is_sparse:
                raise RuntimeError("HSPG does not support sparse gradients.")
            params.append(param)
            grads.append(grad)
            records.append(member)
        return params, grads, records

    @staticmethod
    def _member_step(
        member: _Member,
        direction: BaseDirection,
        grad: torch.Tensor,
        state: dict[str, Any],
        context: Any,
        inverse_norm: torch.Tensor,
        half_space: bool,
    ) -> None:
        """x <- x - lr * d on one penalised member, in one fused pass over blocks of its groups.

        `d` is the base direction plus `c_g x_g`, `c_g = weight_decay + lmbda / ||x_g||`: decoupled,
        `x <- (1 - lr * c_g) * x - lr * base`; coupled, the direction's gradient is `grad + c_g * x`. In the half-space
        stage the pass also yields `d_g^T x_g` at x_k.
        """
        group, param = member.group, member.param
        lr, weight_decay, lmbda = group["lr"], group["weight_decay"], group["lmbda"]
        dtype = direction.compute_dtype(param)  # e.g. float32 for a float16 parameter under AdamW
        penalty, penalised, shrink, base = None, False, None, 1.0
        if direction.decoupled:
            base = 1 - lr * weight_decay
            shrink = (base - (lr * lmbda) * inverse_norm).to(dtype) if lmbda != 0 else None
        else:
            penalised = lmbda != 0 or weight_decay != 0
            penalty = (lmbda * inverse_norm + weight_decay).to(dtype)
        divisor = direction.divisor(context)
        step_size = -(lr / divisor)
        keys = [key for key in direction.state_keys if state.get(key) is not None]
        blocks = Blocks(param, member.dim, member.num_groups, _BLOCK)
        dots = []
        for rows in blocks.ranges:
            stored = blocks.view(param, rows)
            x = stored if stored.dtype == dtype else stored.to(dtype)
            block = Block(
                x,
                lambda tensor, rows=rows: blocks.view(tensor, rows),
                grad,
                {key: blocks.view(state[key], rows) for key in keys},
                None if member.live is None else blocks.per_group(member.live, rows, x),
                None if penalty is None else blocks.per_group(penalty, rows, x),
                penalised,
            )
            numerator, denominator = direction.block(group, block, context)
            if half_space:
                if denominator is not None:
                    numerator, denominator = torch.div(numerator, denominator, out=denominator), None
                dots.append(blocks.dot(numerator, x))
            if shrink is not None:
                x.mul_(blocks.per_group(shrink, rows, x))
            elif base != 1:
                x.mul_(base)
            if denominator is None:
                x.add_(numerator, alpha=step_size)
            else:
                x.addcdiv_(numerator, denominator, value=step_size)
            if x is not stored:
                stored.copy_(x)
        if half_space:
            dot = torch.cat(dots) if len(dots) > 1 else dots[0]
            if divisor != 1:
                dot = dot / divisor
            if direction.decoupled:  # d = base + (weight_decay + lmbda / ||x_g||) * x
                dot = dot + (weight_decay + lmbda * inverse_norm) * member.squared_norm
            member.d_dot_x = dot

    def _half_space_drop(
        self,
        members: list[_Member],
        family_squared: dict[int, torch.Tensor],
        family_size: dict[int, int],
    ) -> dict[int, torch.Tensor]:
        """Per active family, a boolean `[num_groups]` mask of the non-zero groups that this step sets to zero."""
        # trial[g] = x~_g^T x_g = sum_m ||x_{m,g}||^2 - lr_m * d_{m,g}^T x_{m,g}; test[g] = trial[g] - eps_m ||x_m,g||^2
        trial: dict[int, torch.Tensor] = {}
        test: dict[int, torch.Tensor] = {}
        for member in members:
            group = member.group
            member_trial = member.squared_norm - group["lr"] * member.d_dot_x
            member_test = member_trial - group["epsilon"] * member.squared_norm
            f = member.family
            trial[f] = member_trial if f not in trial else trial[f] + member_trial
            test[f] = member_test if f not in test else test[f] + member_test
        families = sorted(trial)
        nonzero = {f: family_squared[f] > 0 for f in families}
        candidates = {f: nonzero[f] & (test[f] < 0) for f in families}
        ratio = {f: trial[f] / family_squared[f].clamp(min=torch.finfo(trial[f].dtype).tiny) for f in families}

        max_family_sparsity = self.param_groups[0].get("max_family_sparsity")
        if max_family_sparsity is not None:
            for f in families:
                budget = (sparsity_budget(max_family_sparsity, family_size[f]) - (~nonzero[f]).sum()).clamp(min=0)
                score = torch.where(candidates[f], ratio[f], torch.full_like(ratio[f], math.inf))
                rank = torch.empty_like(score, dtype=torch.long)
                rank[torch.argsort(score, stable=True)] = torch.arange(score.numel(), device=score.device)
                candidates[f] = candidates[f] & (rank < budget)

        max_group_sparsity = self.param_groups[0]["max_group_sparsity"]
        if max_group_sparsity is not None:
            total = sum(family_size.values())
            zeros = sum((family_squared[f] == 0).sum() for f in family_squared)
            budget = (sparsity_budget(max_group_sparsity, total) - zeros).clamp(min=0)
            flat_candidates = torch.cat([candidates[f] for f in families])
            flat_ratio = torch.cat([ratio[f] for f in families])
            score = torch.where(flat_candidates, flat_ratio, torch.full_like(flat_ratio, math.inf))
            order = torch.argsort(score, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel(), device=order.device)
            allowed = flat_candidates & (rank < budget)
            start = 0
            for f in families:
                candidates[f] = allowed[start : start + family_size[f]]
                start += family_size[f]
        return {f: nonzero[f] & candidates[f] for f in families}

    def _zero_dropped(
        self, members: list[_Member], drop: dict[int, torch.Tensor], family_size: dict[int, int]
    ) -> None:
        """Sets the rows of the groups in `drop` to zero in the members and their optimizer state.

        The indices come from one `nonzero` over all families (a host sync); only the members of families with newly
        dropped groups are touched, at a cost proportional to the number of those groups.
        """
        families = sorted(drop)
        dropped = torch.cat([drop[family] for family in families])
        indices = dropped.nonzero().squeeze(1).cpu()
        if indices.numel() == 0:
            return
        sizes = [family_size[family] for family in families]
        ends = torch.searchsorted(indices, torch.tensor(sizes).cumsum(0)).tolist()  # on the host: no sync
        zero_rows: dict[int, torch.Tensor] = {}
        begin, offset = 0, 0
        for family, end, size in zip(families, ends, sizes):
            if end > begin:
                zero_rows[family] = (indices[begin:end] - offset).to(dropped.device)
            begin, offset = end, offset + size
        for member in members:
            rows = zero_rows.get(member.family)
            if rows is None:
                continue
            axis = 0 if member.dim == 0 else member.dim
            grouped(member.param, member.dim, member.num_groups).index_fill_(axis, rows, 0)
            state = self.state[member.param]
            for key in state_keys():
                buffer = state.get(key)
                if buffer is not None:
                    grouped(buffer, member.dim, member.num_groups).index_fill_(axis, rows, 0)


def _check_not_sharded(param: torch.Tensor, name: str) -> None:
    """Refuses a parameter sharded across ranks (FSDP2 `DTensor`, FSDP1 flat parameters): its local group norms would
    be those of a shard, not of the group."""
    sharded = getattr(param, "_is_flat_param", False) or getattr(param, "_fsdp_flattened", False)
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before this module is imported
    if not sharded and dtensor is not None and isinstance(param, dtensor.DTensor):
        sharded = True
    if sharded:
        raise ValueError(
            f"HSPG got a sharded parameter ({name!r}, {type(param).__name__}): FSDP and DeepSpeed ZeRO split "
            "parameters across ranks, so the group norms and the half-space test of one rank would be wrong. Train "
            "with data parallel (DDP: `accelerate launch --multi_gpu` or `torchrun`), where every rank holds whole parameters."
        )


def _materialise(params: Any) -> list[dict[str, Any]] | list[torch.Tensor]:
    """Turns `params` into a list (of tensors or of group dicts with listed params), checking for duplicates."""
    if isinstance(params, torch.Tensor):
        raise ValueError("`params` must be an iterable of parameters or of param-group dicts, not a single tensor.")
    items = list(params)
    if len(items) == 0:
        raise ValueError("HSPG got an empty parameter list.")
    groups = [dict(item) for item in items] if isinstance(items[0], dict) else [{"params": items}]
    seen: dict[int, int] = {}
    for index, group in enumerate(groups):
        group_params = group["params"]
        group_params = [group_params] if isinstance(group_params, torch.Tensor) else list(group_params)
        group["params"] = group_params
        for param in group_params:
            if id(param) in seen:
                raise ValueError(
                    f"A parameter of shape {tuple(param.shape)} appears twice (param groups {seen[id(param)]} and "
                    f"{index}); every parameter may be passed once."
                )
            seen[id(param)] = index
    return groups if isinstance(items[0], dict) else groups[0]["params"]


_OPTIMIZER_WIDE = ("init_steps", "max_group_sparsity", "max_family_sparsity", "variant", "skip_nonfinite", "mode")
"""Param-group keys that must be the same in every group (pass them to `HSPG(...)`)."""
_MEMBERSHIP = ("zig_family", "zig_dim", "zig_num_groups")
"""The param-group lists, parallel to `params`, that place each parameter in the zero-invariant groups."""
_STRUCTURAL = ("mode", "variant")
"""Settings a checkpoint's state only means something under (the target mode's scores and ramps, Adam moments or a
momentum buffer): a state saved under other values is refused by `load_state_dict`."""
_COUNTERS = ("step_count", "skipped_steps")
_FROM_CHECKPOINT = ("lr", *_COUNTERS)
"""The HSPG param-group keys `load_state_dict` takes from the checkpoint (the others come from this run)."""
_FLOAT_HYPERPARAMETERS = ("lr", "lmbda", "epsilon", "momentum", "eps", "weight_decay")
"""The float hyper-parameters of a param group, all of which must be finite."""


_START_FRESH = (
    "To keep the model weights and start the optimizer fresh: with the `Trainer`, delete `optimizer.pt` from the "
    "checkpoint folder (the Trainer then restores the weights and the training state, and starts the optimizer and "
    "the learning-rate schedule anew, since it reads `scheduler.pt` only together with `optimizer.pt`), or load the "
    "checkpoint's weights with `from_pretrained` and start a new run; in a loop of your own, load the model weights "
    "and skip `optimizer.load_state_dict`."
)


def _describe_optimizer(groups: list[Any]) -> str:
    """A best guess at the optimizer class that saved param groups `groups` (from their keys)."""
    keys = {key for group in groups if isinstance(group, Mapping) for key in group} - {"params", "param_names"}
    if {"betas", "amsgrad"} <= keys:
        decoupled = groups[0].get("decoupled_weight_decay")
        return {True: "torch.optim.AdamW", False: "torch.optim.Adam"}.get(decoupled, "torch.optim.Adam or AdamW")
    if "dampening" in keys:
        return "torch.optim.SGD"
    return f"another optimizer (param-group keys {sorted(keys)})"


def _validate_hyperparameters(values: dict[str, Any], where: str) -> None:
    """Refuses NaN / infinite and out-of-range hyper-parameters of the defaults or of one param group."""
    for name in _FLOAT_HYPERPARAMETERS:
        require_finite(name, values[name], where)
    betas = values["betas"]
    if len(betas) != 2:
        raise ValueError(f"Invalid betas{where}: {betas}; pass two coefficients, each in [0, 1).")
    for index, beta in enumerate(betas):
        require_finite(f"betas[{index}]", beta, where)
    if values["lr"] < 0:
        raise ValueError(f"Invalid learning rate{where}: {values['lr']}; it must be >= 0.")
    if values["lmbda"] < 0:
        raise ValueError(f"Invalid lmbda{where}: {values['lmbda']}; the group-lasso weight must be >= 0.")
    if not 0.0 <= values["epsilon"] < 1.0:
        raise ValueError(f"Invalid epsilon{where}: {values['epsilon']}; the half-space parameter must be in [0, 1).")
    if not 0.0 <= values["momentum"] < 1.0:
        raise ValueError(f"Invalid momentum{where}: {values['momentum']}; it must be in [0, 1).")
    if values["nesterov"] and values["momentum"] <= 0:
        raise ValueError(f"Nesterov momentum needs momentum > 0{where}; got momentum={values['momentum']}.")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"Invalid betas{where}: {betas}; pass two coefficients, each in [0, 1).")
    if values["eps"] < 0:
        raise ValueError(f"Invalid eps{where}: {values['eps']}; it must be >= 0.")
    if values["weight_decay"] < 0:
        raise ValueError(f"Invalid weight_decay{where}: {values['weight_decay']}; it must be >= 0.")
