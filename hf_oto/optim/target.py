"""The `"target"` mode of HSPG: loss-aware selection of zero-invariant groups to a FLOPs / parameter target.

The paper's HSPG shrinks *every* group by the same group-lasso step and zeroes those that cross the half-space
boundary; with a short budget, that is magnitude pruning (the groups that start small go first) and large groups such
as attention heads are never reached. The target mode keeps what makes OTO (zero-invariant groups, one training run,
no fine-tuning stage, exact zeros by projection) and changes *which* groups go and *how*:

1. **Saliency.** Over the steps before each selection, every group accumulates the square of the first-order Taylor
   term of removing it, `(dL/d beta_g)^2 = (sum_{dependent columns of g} grad * weight)^2`: `beta_g` scales what the
   group feeds to the rest of the network (a head's columns of the attention output projection, an FFN row's column
   of the down projection, a channel's input slices of the next convolutions), so zeroing the group is `beta_g = 0`
   (the Fisher / Taylor head importance of Michel et al. 2019 and Molchanov et al. 2019). A family without dependents
   uses its members' term, `sum grad * x_g`.
2. **Cost.** Each group's FLOPs (and parameter) cost comes from [`~hf_oto.costs.GroupCosts`], the counter of the
   pruning report.
3. **Selection** at `periods` evenly spaced steps of the pruning window: the groups with the smallest saliency per
   unit of cost are chosen until the model's cost reaches the period's share of the target (linear in the periods;
   the last period reaches the target), under the per-kind caps and the per-family floor. Scores are reset after each
   selection, so the next one re-scores the network as it is then.
4. **Ramp.** A selected group is shrunk to zero over one period, whatever its size: after each base step its norm is
   projected onto a radius that falls linearly from its norm at selection to 0 (cancelling any outward push of the
   base direction), and at the end of the ramp the projection sets it, and its rows of the optimizer state, to exactly
   zero. Unselected groups get no penalty at all and keep training in the same run; zero groups stay zero.

Everything this mode keeps lives in the optimizer state of the first member of each family (`"oto_saliency"`,
`"oto_ramp_start"`, `"oto_ramp_norm"`), so `state_dict()` / `load_state_dict()` resume the identical trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from ..costs import COST_KINDS, GroupCosts
from .group_ops import grouped, per_group, sparsity_budget, squared_norms


if TYPE_CHECKING:
    from ..zig.groups import ZIGSet

logger = logging.get_logger(__name__)

MODES = ("paper", "target")
DEFAULT_TARGET_FLOPS = 0.5
"""The FLOPs fraction the target mode aims at when no target is stated."""


@dataclass
class PruningTarget:
    """What the target mode of HSPG prunes to.

    Args:
        flops (`float`, *optional*):
            Fraction in (0, 1] of the dense model's FLOPs (at the cost sequence length) to keep. When neither `flops`
            nor `params` is given, `0.5`.
        params (`float`, *optional*):
            Fraction in (0, 1] of the dense model's parameters to keep. With both, both are reached.
        max_kind_sparsity (`dict[str, float]`, *optional*):
            Per kind of group (`"heads"`, `"ffn"`, `"channels"`), the largest fraction of that kind's groups that may
            be removed, e.g. `{"heads": 0.75}`.
        min_kept_per_family (`int`, *optional*, defaults to 1):
            Groups every family (one layer's heads, FFN rows or channels) keeps at least; `0` lets a layer be emptied.

    Example:

    ```python
    >>> from hf_oto.optim import PruningTarget

    >>> PruningTarget(flops=0.5, max_kind_sparsity={"heads": 0.75}).describe()
    '50% of FLOPs, at most 75% of heads removed, at least 1 group per family'
    ```
    """

    flops: float | None = None
    params: float | None = None
    max_kind_sparsity: dict[str, float] = field(default_factory=dict)
    min_kept_per_family: int = 1

    def __post_init__(self):
        if self.flops is None and self.params is None:
            self.flops = DEFAULT_TARGET_FLOPS
        for name in COST_KINDS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(
                    f"The {name} target must be a fraction in (0, 1] of the dense model's {name} (e.g. 0.5 for half); "
                    f"got {value!r}."
                )
        self.max_kind_sparsity = dict(self.max_kind_sparsity or {})
        for kind, cap in self.max_kind_sparsity.items():
            if not (isinstance(cap, (int, float)) and 0.0 <= cap <= 1.0):
                raise ValueError(f"max_kind_sparsity[{kind!r}] must be a fraction in [0, 1]; got {cap!r}.")
        if isinstance(self.min_kept_per_family, bool) or not isinstance(self.min_kept_per_family, int):
            raise ValueError(f"min_kept_per_family must be an integer >= 0; got {self.min_kept_per_family!r}.")
        if self.min_kept_per_family < 0:
            raise ValueError(f"min_kept_per_family must be >= 0; got {self.min_kept_per_family}.")

    def goals(self) -> dict[str, float]:
        """`{cost kind: fraction to keep}` for the stated targets."""
        return {kind: getattr(self, kind) for kind in COST_KINDS if getattr(self, kind) is not None}

    def describe(self) -> str:
        parts = [
            f"{value:.0%} of {'FLOPs' if kind == 'flops' else 'parameters'}" for kind, value in self.goals().items()
        ]
        parts += [f"at most {cap:.0%} of {kind} removed" for kind, cap in self.max_kind_sparsity.items()]
        plural = "" if self.min_kept_per_family == 1 else "s"
        parts.append(f"at least {self.min_kept_per_family} group{plural} per family")
        return ", ".join(parts)


def parse_kind_caps(value: str | Mapping[str, float] | None) -> dict[str, float]:
    """`"heads=0.75,ffn=0.9"` (or a dict) → `{"heads": 0.75, "ffn": 0.9}`, with a clear error on anything else."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(kind): float(cap) for kind, cap in value.items()}
    caps = {}
    for part in str(value).split(","):
        kind, sep, cap = part.partition("=")
        try:
            if not sep or not kind.strip():
                raise ValueError
            caps[kind.strip()] = float(cap)
        except ValueError:
            raise ValueError(
                f"Per-kind caps are written kind=fraction, comma-separated, e.g. 'heads=0.75,ffn=0.9'; got {value!r}."
            ) from None
    return caps


@dataclass(frozen=True)
class Schedule:
    """When the target mode scores, selects and ramps: `periods` selections, `period` steps apart, from `start`."""

    start: int
    period: int
    periods: int

    def selection_index(self, step: int) -> int | None:
        """Index of the selection made at the start of step `step`, or `None`."""
        offset = step - self.start
        if offset < 0 or offset % self.period != 0 or offset // self.period >= self.periods:
            return None
        return offset // self.period

    def scoring(self, step: int) -> bool:
        """Whether step `step` accumulates saliency (the `period` steps before each selection)."""
        return self.start - self.period <= step < self.start + (self.periods - 1) * self.period

    @property
    def end(self) -> int:
        """First step after which every selected group is exactly zero."""
        return self.start + self.periods * self.period


class TargetSelection:
    """Saliency, selection and ramps of HSPG's target mode, working on the optimizer's parameters and state.

    Built by [`HSPG`] with `mode="target"`; not meant to be used alone.
    """

    def __init__(
        self,
        optimizer: Any,
        zigs: ZIGSet,
        target: PruningTarget,
        schedule: Schedule,
        costs: GroupCosts,
    ):
        self.optimizer = optimizer
        self.target = target
        self.schedule = schedule
        self.costs = costs
        self.kinds = [family.kind for family in zigs.families]
        self.num_groups = [family.num_groups for family in zigs.families]
        if costs.family_names != [family.name for family in zigs.families]:
            raise ValueError(
                "The GroupCosts were measured for other ZIGs; measure them with the ZIGSet given to HSPG."
            )
        unknown = sorted(set(target.max_kind_sparsity) - set(self.kinds))
        if unknown:
            raise ValueError(
                f"max_kind_sparsity names kinds of groups this model does not train: {unknown}; its kinds are "
                f"{sorted(set(self.kinds))}."
            )
        # Per family: positions (param group, index) of its penalised members with their dim (the optimizer's
        # membership), and of the dependent slices `(position, dim, start, length)` whose Taylor term scores it.
        self.members: list[list[tuple[tuple[int, int], int]]] = optimizer._family_members
        self.dependents: list[list[tuple[tuple[int, int], int, int, int]]] = []
        # Families with a frozen member left out of the optimizer's params: never selected, scored or ramped.
        self.excluded: set[int] = set(getattr(optimizer, "_frozen_out", ()))
        position = optimizer._positions()
        for index, family in enumerate(zigs.families):
            self.dependents.append([] if index in self.excluded else self._dependent_slices(zigs, family, position))

    @staticmethod
    def _dependent_slices(
        zigs: ZIGSet, family: Any, position: Mapping[int, tuple[int, int]]
    ) -> list[tuple[tuple[int, int], int, int, int]]:
        """The dependent slices `(position, dim, start, length)` of `family`, or `[]` if one is not trained (an
        incomplete output-side score would mislead: the members' term is used instead)."""
        dependents = []
        for dependent in family.dependents:
            param = zigs.parameter(dependent.param_name)
            if id(param) not in position or not param.requires_grad:
                return []
            start, length = dependent.region(param.shape[dependent.dim])
            dependents.append((position[id(param)], dependent.dim, start, length))
        return dependents

    # ----------------------------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------------------------
    def _param(self, position: tuple[int, int]) -> torch.Tensor:
        return self.optimizer.param_groups[position[0]]["params"][position[1]]

    def family_state(self, family: int) -> dict[str, torch.Tensor]:
        """The target-mode state of `family`, kept in the optimizer state of its first member (created on demand)."""
        anchor = self._param(self.members[family][0][0])
        state = self.optimizer.state[anchor]
        if "oto_saliency" not in state:
            size = self.num_groups[family]
            state["oto_saliency"] = torch.zeros(size, dtype=torch.float32, device=anchor.device)
            state["oto_ramp_start"] = torch.full((size,), -1, dtype=torch.long, device=anchor.device)
            state["oto_ramp_norm"] = torch.zeros(size, dtype=torch.float32, device=anchor.device)
        return state

    def selected_masks(self, family_squared: Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
        """Per family, the groups that are zero or on their way there (boolean, on the host)."""
        masks = []
        for family in range(len(self.num_groups)):
            if family in self.excluded:
                masks.append(torch.zeros(self.num_groups[family], dtype=torch.bool))
                continue
            state = self.family_state(family)
            mask = state["oto_ramp_start"] >= 0
            if family in family_squared:
                mask = mask | (family_squared[family] == 0)
            masks.append(mask.cpu())
        return masks

    # ----------------------------------------------------------------------------------------------------------
    # Saliency
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate_saliency(self) -> None:
        """Adds this step's squared Taylor term of every group (from the gradients of `f` at `x_k`)."""
        for family in range(len(self.num_groups)):
            term = self._taylor_term(family)
            if term is not None:
                self.family_state(family)["oto_saliency"].add_(term.square().to(torch.float32))

    def _taylor_term(self, family: int) -> torch.Tensor | None:
        num_groups = self.num_groups[family]
        slices = [(position, dim, None, None) for position, dim in self.members[family]]
        if self.dependents[family]:
            slices = self.dependents[family]
        total = None
        for position, dim, start, length in slices:
            param = self._param(position)
            if param.grad is None:
                continue
            weight, grad = param.detach(), param.grad
            if start is not None:
                weight, grad = weight.narrow(dim, start, length), grad.narrow(dim, start, length)
            if weight.dtype not in (torch.float32, torch.float64):
                weight, grad = weight.float(), grad.float()
            if weight.dim() == 1:
                per_entry = weight * grad
            else:
                # sum over every axis but `dim`: one entry per row (dim 0) or column (dim 1) of the weight
                per_entry = (weight * grad).sum(dim=[d for d in range(weight.dim()) if d != dim])
            term = per_entry.view(num_groups, -1).sum(dim=1)
            total = term if total is None else total + term
        return total

    # ----------------------------------------------------------------------------------------------------------
    # Selection
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def select(
        self, step: int, index: int, family_squared: Mapping[int, torch.Tensor], frozen: set[int] = frozenset()
    ) -> int:
        """Chooses the groups that start their ramp at `step` (selection `index` of the schedule); returns how many.

        Families with a frozen member (`frozen`, and those left out of the optimizer) are not chosen from."""
        removed_masks = self.selected_masks(family_squared)
        counts = [int(mask.sum()) for mask in removed_masks]
        progress = (index + 1) / self.schedule.periods
        goals = {
            kind: self.costs.dense[kind] * (1.0 - progress * (1.0 - fraction))
            for kind, fraction in self.target.goals().items()
        }
        current = {kind: self.costs.cost(kind, counts) for kind in goals}
        if all(current[kind] <= goals[kind] * (1 + 1e-12) for kind in goals):
            self._reset_saliency()
            return 0
        saliency = [
            torch.zeros(size) if family in self.excluded else self.family_state(family)["oto_saliency"].cpu()
            for family, size in enumerate(self.num_groups)
        ]
        if index == 0 and all(float(s.sum()) == 0 for s in saliency):
            logger.warning(
                "HSPG (target mode): no saliency was accumulated before the first selection (no gradients, or the "
                "pruning window starts at step 0); groups are chosen by cost alone. Start the window later "
                "(`init_steps` >= one period)."
            )
        family_cap = [
            0 if family in self.excluded or family in frozen else self._family_cap(family)
            for family in range(len(self.num_groups))
        ]
        kind_total: dict[str, int] = {}
        kind_removed: dict[str, int] = {}
        for family, kind in enumerate(self.kinds):
            kind_total[kind] = kind_total.get(kind, 0) + self.num_groups[family]
            kind_removed[kind] = kind_removed.get(kind, 0) + counts[family]
        kind_cap = {
            kind: sparsity_budget(self.target.max_kind_sparsity.get(kind, 1.0), total)
            for kind, total in kind_total.items()
        }

        # Rank every candidate by saliency per unit of (normalised) cost, cheapest loss per saving first.
        marginal = {kind: self.costs.marginal(kind, counts) for kind in goals}
        gap = {kind: max(current[kind] - goals[kind], 1e-9 * self.costs.dense[kind]) for kind in goals}
        scores, families, rows = [], [], []
        for family, mask in enumerate(removed_masks):
            weight = sum(marginal[kind][family] / gap[kind] for kind in goals)
            candidates = (~mask).nonzero().squeeze(1)
            if candidates.numel() == 0 or weight <= 0:
                continue
            scores.append(saliency[family][candidates].double() / weight)
            families.append(torch.full_like(candidates, family))
            rows.append(candidates)
        if not scores:
            return 0
        order = torch.argsort(torch.cat(scores), stable=True)
        families_flat, rows_flat = torch.cat(families)[order].tolist(), torch.cat(rows)[order].tolist()

        chosen: list[list[int]] = [[] for _ in self.num_groups]
        estimate = dict(current)
        for family, row in zip(families_flat, rows_flat):
            kind = self.kinds[family]
            if counts[family] + 1 > family_cap[family] or kind_removed[kind] + 1 > kind_cap[kind]:
                continue
            chosen[family].append(row)
            counts[family] += 1
            kind_removed[kind] += 1
            for name in goals:
                estimate[name] -= marginal[name][family]
            if all(estimate[name] <= goals[name] for name in goals):
                # Exact costs (bilinear for conv chains) and fresh marginals; go on if the estimate was optimistic.
                estimate = {name: self.costs.cost(name, counts) for name in goals}
                if all(estimate[name] <= goals[name] * (1 + 1e-12) for name in goals):
                    break
                marginal = {name: self.costs.marginal(name, counts) for name in goals}
        else:
            if index == self.schedule.periods - 1:
                reached = ", ".join(f"{name} {estimate[name] / self.costs.dense[name]:.1%}" for name in goals)
                logger.warning(
                    f"HSPG (target mode): the target ({self.target.describe()}) cannot be reached under the per-kind "
                    f"caps and the per-family floor; the model keeps {reached}. Loosen `max_kind_sparsity` or "
                    "`min_kept_per_family`."
                )

        selected = 0
        for family, rows_chosen in enumerate(chosen):
            if not rows_chosen:
                continue
            state = self.family_state(family)
            index_tensor = torch.tensor(rows_chosen, dtype=torch.long, device=state["oto_ramp_start"].device)
            state["oto_ramp_start"].index_fill_(0, index_tensor, step)
            norms = family_squared[family].to(state["oto_ramp_norm"].device).sqrt()
            state["oto_ramp_norm"].index_copy_(0, index_tensor, norms.index_select(0, index_tensor).float())
            selected += len(rows_chosen)
        self._reset_saliency()
        logger.info(
            f"HSPG (target mode): selection {index + 1}/{self.schedule.periods} at step {step}: {selected} groups "
            "start their ramp to zero; "
            + ", ".join(
                f"{name} {self.costs.cost(name, counts) / self.costs.dense[name]:.1%} kept after it" for name in goals
            )
        )
        return selected

    def _family_cap(self, family: int) -> int:
        cap = self.num_groups[family] - self.target.min_kept_per_family
        bound = self.optimizer.param_groups[0].get("max_family_sparsity")
        if bound is not None:
            cap = min(cap, sparsity_budget(bound, self.num_groups[family]))
        return max(cap, 0)

    def _reset_saliency(self) -> None:
        for family in range(len(self.num_groups)):
            if family not in self.excluded:
                self.family_state(family)["oto_saliency"].zero_()

    # ----------------------------------------------------------------------------------------------------------
    # Ramps
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ramp(self, step: int, frozen: set[int] = frozenset()) -> dict[int, torch.Tensor]:
        """Projects every ramping group onto its scheduled radius (after the base step of `step`); returns, per
        family, the mask of the groups whose ramp ends now (to be set to exactly zero with their optimizer state).
        Families with a frozen member (`frozen`, and those left out of the optimizer) are not touched."""
        period = self.schedule.period
        drop: dict[int, torch.Tensor] = {}
        if not self.schedule.start <= step < self.schedule.end:  # no ramp outside the window (and no host sync)
            return drop
        for family in range(len(self.num_groups)):
            if family in self.excluded or family in frozen:
                continue
            state = self.family_state(family)
            start = state["oto_ramp_start"]
            ramping = (start >= 0) & (start <= step) & (start > step - period)
            if not bool(ramping.any()):
                continue
            radius = state["oto_ramp_norm"] * ((period - 1 - (step - start)).clamp(min=0).float() / period)
            params = [(self._param(position), dim) for position, dim in self.members[family]]
            squared = None
            for param, dim in params:
                contribution = squared_norms(param.detach(), dim, self.num_groups[family], sum_of_squares=True)
                squared = contribution if squared is None else squared + contribution
            norm = squared.sqrt()
            ending = ramping & (radius == 0)
            shrink = ramping & ~ending & (norm > radius)
            if bool(shrink.any()):
                scale = torch.where(
                    shrink, radius / norm.clamp(min=torch.finfo(norm.dtype).tiny), torch.ones_like(norm)
                )
                for param, dim in params:
                    view = grouped(param.detach(), dim, self.num_groups[family])
                    view.mul_(per_group(scale.to(param.dtype), view, dim))
            if bool(ending.any()):
                drop[family] = ending
        return drop

    def kept_fraction(self, family_squared: Mapping[int, torch.Tensor]) -> dict[str, float]:
        """`{cost kind: fraction of the dense cost}` of the model once the selected groups are removed."""
        counts = [int(mask.sum()) for mask in self.selected_masks(family_squared)]
        return {kind: self.costs.cost(kind, counts) / self.costs.dense[kind] for kind in COST_KINDS}
