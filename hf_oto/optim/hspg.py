"""Half-Space Stochastic Projected Gradient (HSPG), the optimizer of "Only Train Once" (Chen et al., NeurIPS 2021).

HSPG minimises `f(x) + lmbda * sum_g ||x_g||_2` over the zero-invariant groups (ZIGs) of a model. It runs in two
stages (Algorithm 2 of the paper):

1. **Initialization stage** (the first `init_steps` calls of `step()`): stochastic subgradient steps, i.e. the base
   direction of `f` (SGD with momentum or AdamW) plus `lmbda * x_g / ||x_g||` on every penalised group.
2. **Half-space stage**: the same trial point `x~ = x - lr * d`, followed by the half-space projection (eq. 6): a
   non-zero group whose trial point leaves the half-space `x~_g^T x_g >= epsilon * ||x_g||^2` is set to exactly zero,
   and groups that are zero stay zero for the rest of training.
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
from .target import MODES, PruningTarget, Schedule, TargetSelection


logger = logging.get_logger(__name__)

VARIANTS = ("sgd", "adamw")
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
    live: torch.Tensor | None = None  # half-space stage, family with zero groups: [num_groups] 1 (non-zero) / 0 (zero)
    d_dot_x: torch.Tensor | None = None  # [num_groups], d_{m,g}^T x_{m,g} at x_k (half-space stage only)


def _grouped(tensor: torch.Tensor, dim: int, num_groups: int) -> torch.Tensor:
    """A view of `tensor` whose group axis is explicit: `[num_groups, -1]` for `dim == 0`, else unflattened."""
    if dim == 0 and tensor.is_contiguous():
        return tensor.view(num_groups, -1)
    return tensor.unflatten(dim, (num_groups, -1))


def _per_group(values: torch.Tensor, grouped: torch.Tensor, dim: int) -> torch.Tensor:
    """`values` (`[num_groups]`) shaped to broadcast against `_grouped(tensor, dim, num_groups)`."""
    if dim == 0 and grouped.dim() == 2:
        return values.view(-1, 1)
    shape = [1] * grouped.dim()
    shape[dim] = values.numel()
    return values.view(shape)


class _Blocks:
    """The blocks of whole groups in which one penalised parameter is updated, and views of its tensors by block.

    For `dim == 0` (every member `build_zigs` produces) a block is a range of rows of the `[num_groups, -1]` view
    holding at most `_BLOCK` elements per thread (at least one group); otherwise the whole grouped tensor is one block.
    """

    def __init__(self, member: _Member):
        self.dim, self.num_groups = member.dim, member.num_groups
        self.flat = self.dim == 0 and member.param.is_contiguous()  # channels_last: the unflattened path
        if self.flat:
            block = _BLOCK * max(1, torch.get_num_threads())
            rows = max(1, block // max(1, member.param.numel() // max(1, self.num_groups)))
            self.ranges = [(start, min(start + rows, self.num_groups)) for start in range(0, self.num_groups, rows)]
        else:
            self.ranges = [(0, self.num_groups)]

    def view(self, tensor: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        if self.flat:
            return tensor.view(self.num_groups, -1)[block[0] : block[1]]
        return tensor.unflatten(self.dim, (self.num_groups, -1))  # one layout for the param, its grad and state

    def per_group(self, values: torch.Tensor, block: tuple[int, int], view: torch.Tensor) -> torch.Tensor:
        """`values` (`[num_groups]`) restricted to `block`, shaped to broadcast against `view`."""
        if self.flat:
            return values[block[0] : block[1]].unsqueeze(1)
        return _per_group(values, view, self.dim)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The per-group dot products `a_g^T b_g` of two block views, accumulated in float32 at least."""
        if a.dtype not in (torch.float32, torch.float64):
            a, b = a.float(), b.float()
        if self.flat:
            return torch.linalg.vecdot(a, b)
        return (a * b).sum(dim=[d for d in range(a.dim()) if d != self.dim])


def _low_precision(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is float16 or bfloat16, whose AdamW step HSPG computes in float32."""
    return tensor.dtype in (torch.float16, torch.bfloat16)


def _moment_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of the Adam moments of `param`: float32 for a float16 / bfloat16 parameter, else its own.

    In float16 the second moment of a gradient below ~1e-4 underflows to 0 while the first does not, and
    `eps = 1e-8` rounds to 0: the step `m / (sqrt(v) + eps)` is then huge, or `0 / 0 = NaN` in the zero groups
    (`torch.optim.AdamW` turns a float16 model into NaN in one step for that reason; its fused variant into weights of
    thousands). Float32 moments and a float32 update, rounded to the parameter's dtype once, stay finite.
    """
    return torch.float32 if _low_precision(param) else param.dtype


def _row_squared_norm(a: torch.Tensor, dim: int, num_groups: int) -> torch.Tensor:
    """`[num_groups]` tensor of the squared group norms `||a_g||^2`, in float32 at least."""
    if dim == 0 and a.is_contiguous():
        view = a.view(num_groups, -1)
        if view.dtype not in (torch.float32, torch.float64):
            view = view.float()
        return torch.linalg.vector_norm(view, dim=1).square()
    grouped = _grouped(a, dim, num_groups)
    if grouped.dtype not in (torch.float32, torch.float64):
        grouped = grouped.float()
    return grouped.square().sum(dim=[d for d in range(grouped.dim()) if d != dim])


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
            Base direction: `"adamw"` or `"sgd"`.
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
        pruning_periods (`int`, *optional*, defaults to 4):
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
        pruning_periods: int = 4,
        group_costs: GroupCosts | None = None,
        cost_seq_length: int = 128,
    ):
        if not isinstance(zigs, ZIGSet):
            raise ValueError(
                f"`zigs` must be a ZIGSet (e.g. from `hf_oto.build_zigs(model)`); got {type(zigs).__name__}."
            )
        if variant not in VARIANTS:
            raise ValueError(f"Unknown variant {variant!r}; choose one of {VARIANTS}.")
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

    def _assign_zig_membership(self, zigs: ZIGSet) -> None:
        # A map from tensor identity to position, used only here, at construction.
        position = {}
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                position[id(param)] = (group_index, param_index)
        missing = []
        frozen_out: set[int] = set()
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
                for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
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
                squared = _row_squared_norm(param.detach(), dim, num_groups)
                family_squared[family] = squared if family not in family_squared else family_squared[family] + squared
                family_size[family] = num_groups
                if family in frozen:
                    continue
                record = _Member(param, family, dim, num_groups, group, squared)
                all_members.append(record)
                if family in active:
                    members.append(record)
        if self._selection is not None:
            self._target_step(count, members, all_members, family_squared, family_size, frozen)
            for group in self.param_groups:
                group["step_count"] = count + 1
            return loss
        if self._bound_reached(family_squared, family_size):
            # No further group may be zeroed: the penalty could only shrink the kept groups, so it is switched off
            # and the kept groups train on f alone (zero groups still stay zero).
            inverse_norm = {family: torch.zeros_like(squared) for family, squared in family_squared.items()}
        else:
            full = self._full_families(family_squared, family_size)
            inverse_norm = {
                family: torch.zeros_like(squared)
                if family in full
                else torch.where(squared > 0, squared.rsqrt(), torch.zeros_like(squared))
                for family, squared in family_squared.items()
            }
        by_param = {id(member.param): member for member in members}  # local to this call

        # In the half-space stage the groups that are zero at x_k stay zero: one host sync tells which families have
        # any, and only their members mask those rows (of the direction, the momentum or the Adam moments) in the
        # fused pass below.
        if half_space:
            self._mark_live(members, family_squared)

        # Phase A: the update x <- x - lr * d. Parameters outside the ZIGs take torch's foreach step; each penalised
        # member is updated in one fused pass over blocks of its groups, which also yields d_g^T x_g at x_k.
        self._base_step(by_param, inverse_norm, half_space)

        # Phase B: the half-space test per family, from the norms and dot products at x_k; then the rows of the
        # newly dropped groups are set to zero in the parameters and in the optimizer state.
        if half_space and members:
            drop = self._half_space_drop(members, family_squared, family_size)
            self._zero_dropped(members, drop, family_size)

        for group in self.param_groups:
            group["step_count"] = count + 1
        return loss

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

    def _base_step(
        self, by_param: dict[int, _Member], inverse_norm: dict[int, torch.Tensor], half_space: bool
    ) -> None:
        """x <- x - lr * d for every param group, with its variant's base direction."""
        for group in self.param_groups:
            if group["variant"] == "adamw":
                self._adamw_step(group, by_param, inverse_norm, half_space)
            else:
                self._sgd_step(group, by_param, inverse_norm, half_space)

    def _target_step(
        self,
        count: int,
        members: list[_Member],
        all_members: list[_Member],
        family_squared: dict[int, torch.Tensor],
        family_size: dict[int, int],
        frozen: set[int],
    ) -> None:
        """One step of the target mode: select (on schedule), score, base step without penalty, ramp, project."""
        selection = self._selection
        schedule = selection.schedule
        index = schedule.selection_index(count)
        if index is not None:
            selection.select(count, index, family_squared, frozen)
        if schedule.scoring(count):
            selection.accumulate_saliency()
        # Zero groups stay zero: their rows of the direction and of the optimizer state are masked.
        self._mark_live(members, family_squared)
        inverse_norm = {family: torch.zeros_like(squared) for family, squared in family_squared.items()}
        self._base_step({id(member.param): member for member in members}, inverse_norm, half_space=False)
        drop = selection.ramp(count, frozen)
        if drop:
            self._zero_dropped(all_members, drop, family_size)

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
        return int(zeros) >= math.floor(bound * sum(family_size.values()) + 1e-9)

    def _full_families(self, family_squared: dict[int, torch.Tensor], family_size: dict[int, int]) -> set[int]:
        """Families whose zero groups already fill `max_family_sparsity` (one host sync; empty without a bound)."""
        bound = self.param_groups[0].get("max_family_sparsity")
        if bound is None or not family_squared:
            return set()
        families = sorted(family_squared)
        zeros = torch.stack([(family_squared[f] == 0).sum() for f in families]).tolist()
        return {f for f, count in zip(families, zeros) if count >= _family_budget(bound, family_size[f])}

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

    def _adamw_step(
        self,
        group: dict[str, Any],
        by_param: dict[int, _Member],
        inverse_norm: dict[int, torch.Tensor],
        half_space: bool,
    ) -> None:
        params, grads, records = self._gather(group, by_param)
        if not params:
            return
        beta1, beta2 = group["betas"]
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for index, param in enumerate(params):
            state = self.state[param]
            dtype = _moment_dtype(param)
            if "exp_avg" not in state:  # (the target mode may have put its own entries in a member's state)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            elif state["exp_avg"].dtype != dtype:  # the model was cast to or from a low precision since
                state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].to(dtype), state["exp_avg_sq"].to(dtype)
            if grads[index].dtype != dtype:
                grads[index] = grads[index].to(dtype)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        # Moments of every parameter, as torch's foreach AdamW (in float32 for float16 / bfloat16 parameters).
        torch._foreach_add_(steps, 1.0)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_values = [step.item() for step in steps]  # CPU scalars, as torch's non-capturable AdamW
        bias_correction1 = [1 - beta1**step for step in step_values]
        bias_correction2_sqrt = [math.sqrt(1 - beta2**step) for step in step_values]

        plain = [i for i, record in enumerate(records) if record is None and not _low_precision(params[i])]
        for i, record in enumerate(records):
            if record is None and _low_precision(params[i]):
                self._adamw_low_precision(
                    params[i], exp_avgs[i], exp_avg_sqs[i], bias_correction1[i], bias_correction2_sqrt[i], group
                )
        if plain:
            plain_params = [params[i] for i in plain]
            denominators = torch._foreach_sqrt([exp_avg_sqs[i] for i in plain])
            torch._foreach_div_(denominators, [bias_correction2_sqrt[i] for i in plain])
            torch._foreach_add_(denominators, eps)
            if weight_decay != 0:
                torch._foreach_mul_(plain_params, 1 - lr * weight_decay)
            torch._foreach_addcdiv_(
                plain_params,
                [exp_avgs[i] for i in plain],
                denominators,
                [-(lr / bias_correction1[i]) for i in plain],
            )
            del denominators
        for i, record in enumerate(records):
            if record is not None:
                self._adamw_member(
                    record,
                    exp_avgs[i],
                    exp_avg_sqs[i],
                    bias_correction1[i],
                    bias_correction2_sqrt[i],
                    inverse_norm[record.family],
                    half_space,
                )

    @staticmethod
    def _adamw_low_precision(
        param: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        bias_correction1: float,
        bias_correction2_sqrt: float,
        group: dict[str, Any],
    ) -> None:
        """The AdamW update of a float16 / bfloat16 parameter outside the ZIGs, from its float32 moments, computed in
        float32 and rounded to the parameter's dtype once (see `_moment_dtype`)."""
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        denominator = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
        update = torch.div(exp_avg, denominator, out=denominator)
        param.copy_(param.float().mul_(1 - lr * weight_decay).add_(update, alpha=-(lr / bias_correction1)))

    @staticmethod
    def _adamw_member(
        member: _Member,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        bias_correction1: float,
        bias_correction2_sqrt: float,
        inverse_norm: torch.Tensor,
        half_space: bool,
    ) -> None:
        """x <- (1 - lr * weight_decay - lr * lmbda / ||x_g||) * x - lr / bc1 * m / (sqrt(v / bc2) + eps), by block."""
        group, param = member.group, member.param
        lr, weight_decay, lmbda, eps = group["lr"], group["weight_decay"], group["lmbda"], group["eps"]
        # float16 / bfloat16 parameters are updated in float32 from their float32 moments (see `_moment_dtype`).
        low_precision = _low_precision(param)
        compute_dtype = torch.float32 if low_precision else param.dtype
        base = 1 - lr * weight_decay
        shrink = (base - (lr * lmbda) * inverse_norm).to(compute_dtype) if lmbda != 0 else None
        step_size = -(lr / bias_correction1)
        blocks = _Blocks(member)
        dots = []
        for block in blocks.ranges:
            stored = blocks.view(param, block)
            x = stored.float() if low_precision else stored
            exp_avg_block = blocks.view(exp_avg, block)
            exp_avg_sq_block = blocks.view(exp_avg_sq, block)
            if member.live is not None:  # zero groups: zero moments, hence a zero direction
                live = blocks.per_group(member.live, block, x)
                exp_avg_block.mul_(live)
                exp_avg_sq_block.mul_(live)
            denominator = torch.sqrt(exp_avg_sq_block.to(compute_dtype))
            denominator.div_(bias_correction2_sqrt).add_(eps)
            if member.live is not None and eps == 0:
                denominator.add_(1 - live)  # 0 / 1 rather than 0 / 0 in the zero groups; + 0 elsewhere
            if half_space:
                direction = torch.div(exp_avg_block, denominator, out=denominator)
                dots.append(blocks.dot(direction, x))
            if shrink is not None:
                x.mul_(blocks.per_group(shrink, block, x))
            elif base != 1:
                x.mul_(base)
            if half_space:
                x.add_(direction, alpha=step_size)
            else:
                x.addcdiv_(exp_avg_block, denominator, value=step_size)
            if low_precision:
                stored.copy_(x)
        if half_space:
            # d = dir / bc1 + (weight_decay + lmbda / ||x_g||) * x  (decoupled terms)
            dot = torch.cat(dots) if len(dots) > 1 else dots[0]
            coefficient = weight_decay + lmbda * inverse_norm
            member.d_dot_x = dot / bias_correction1 + coefficient * member.squared_norm

    def _sgd_step(
        self,
        group: dict[str, Any],
        by_param: dict[int, _Member],
        inverse_norm: dict[int, torch.Tensor],
        half_space: bool,
    ) -> None:
        params, grads, records = self._gather(group, by_param)
        if not params:
            return
        lr, weight_decay, momentum, nesterov = group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]
        steps = []
        for param in params:
            state = self.state[param]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            steps.append(state["step"])
        torch._foreach_add_(steps, 1.0)

        plain = [i for i, record in enumerate(records) if record is None]
        if plain:  # torch's foreach SGD
            plain_params = [params[i] for i in plain]
            directions = [grads[i] for i in plain]
            if weight_decay != 0:
                directions = torch._foreach_add(directions, plain_params, alpha=weight_decay)
            if momentum != 0:
                states = [self.state[param] for param in plain_params]
                if all(state.get("momentum_buffer") is not None for state in states):
                    buffers = [state["momentum_buffer"] for state in states]
                    torch._foreach_mul_(buffers, momentum)
                    torch._foreach_add_(buffers, directions)
                else:
                    buffers = []
                    for state, nu in zip(states, directions):
                        buffer = state.get("momentum_buffer")
                        if buffer is None:
                            buffer = state["momentum_buffer"] = torch.clone(nu).detach()
                        else:
                            buffer.mul_(momentum).add_(nu)
                        buffers.append(buffer)
                directions = torch._foreach_add(directions, buffers, alpha=momentum) if nesterov else buffers
            torch._foreach_add_(plain_params, directions, alpha=-lr)
        for i, record in enumerate(records):
            if record is not None:
                self._sgd_member(record, grads[i], self.state[params[i]], inverse_norm[record.family], half_space)

    @staticmethod
    def _sgd_member(
        member: _Member,
        grad: torch.Tensor,
        state: dict[str, Any],
        inverse_norm: torch.Tensor,
        half_space: bool,
    ) -> None:
        """nu = grad + (weight_decay + lmbda / ||x_g||) * x, buf = momentum * buf + nu, x <- x - lr * d, by block.

        With momentum and without Nesterov (the usual case) `nu` is never materialised: the penalty is added to the
        buffer in place, `buf = (momentum * buf + grad) + coefficient * x`.
        """
        group, param = member.group, member.param
        lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
        penalised = group["lmbda"] != 0 or group["weight_decay"] != 0
        coefficient = (group["lmbda"] * inverse_norm + group["weight_decay"]).to(param.dtype)
        buffer, new = None, False
        if momentum != 0:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = torch.empty_like(param, memory_format=torch.contiguous_format)
                new = True
        live = member.live  # zero groups (half-space stage): zero nu and momentum, hence a zero direction
        blocks = _Blocks(member)
        dots = []
        for block in blocks.ranges:
            x = blocks.view(param, block)
            grad_block = blocks.view(grad, block)
            if buffer is not None and not nesterov:
                direction = blocks.view(buffer, block)
                if new:
                    direction.copy_(grad_block)
                    if live is not None:
                        direction.mul_(blocks.per_group(live, block, x))
                elif live is not None:
                    direction.mul_(blocks.per_group(momentum * live, block, x))
                    direction.addcmul_(grad_block, blocks.per_group(live, block, x))
                else:
                    direction.mul_(momentum).add_(grad_block)
                if penalised:
                    direction.addcmul_(x, blocks.per_group(coefficient, block, x))
            else:
                nu = torch.addcmul(grad_block, x, blocks.per_group(coefficient, block, x))
                if live is not None:
                    nu.mul_(blocks.per_group(live, block, x))
                if buffer is None:
                    direction = nu
                else:
                    buffer_block = blocks.view(buffer, block)
                    if new:
                        buffer_block.copy_(nu)
                    elif live is not None:
                        buffer_block.mul_(blocks.per_group(momentum * live, block, x)).add_(nu)
                    else:
                        buffer_block.mul_(momentum).add_(nu)
                    direction = nu.add_(buffer_block, alpha=momentum)  # Nesterov
            if half_space:
                dots.append(blocks.dot(direction, x))
            x.add_(direction, alpha=-lr)
        if half_space:
            member.d_dot_x = torch.cat(dots) if len(dots) > 1 else dots[0]

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
                budget = (_family_budget(max_family_sparsity, family_size[f]) - (~nonzero[f]).sum()).clamp(min=0)
                score = torch.where(candidates[f], ratio[f], torch.full_like(ratio[f], math.inf))
                rank = torch.empty_like(score, dtype=torch.long)
                rank[torch.argsort(score, stable=True)] = torch.arange(score.numel(), device=score.device)
                candidates[f] = candidates[f] & (rank < budget)

        max_group_sparsity = self.param_groups[0]["max_group_sparsity"]
        if max_group_sparsity is not None:
            total = sum(family_size.values())
            zeros = sum((family_squared[f] == 0).sum() for f in family_squared)
            budget = (math.floor(max_group_sparsity * total + 1e-9) - zeros).clamp(min=0)
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
            _grouped(member.param, member.dim, member.num_groups).index_fill_(axis, rows, 0)
            state = self.state[member.param]
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                buffer = state.get(key)
                if buffer is not None:
                    _grouped(buffer, member.dim, member.num_groups).index_fill_(axis, rows, 0)


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


def _family_budget(bound: float, num_groups: int) -> int:
    """How many groups of a family of `num_groups` `max_family_sparsity=bound` lets HSPG zero."""
    return math.floor(bound * num_groups + 1e-9)
