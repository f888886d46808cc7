"""The zero-invariant group (ZIG) data model.

A *family* is a set of `num_groups` groups that share their layout: every member parameter is split into
`num_groups` equal, contiguous chunks along one dimension, and group `g` is the `g`-th chunk of every member. One
family is, for example, the attention heads of one layer (members: the q, k, v weights and biases, split along
their output dimension) or the FFN rows of one layer (members: the up (and gate) projection weights and biases).

Members are penalised by the group-lasso term and driven to zero by HSPG. *Dependents* are pruned along with the
group but not penalised: when a group is zero, its dependent slices only ever multiply zeros (the attention
output projection's input columns of a zero head, the down projection's input columns of a zero FFN row).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ZIGMember:
    """One parameter of a family: `param_name` (as in `model.named_parameters()`) split along `dim`.

    By default the whole of `dim` is split into the family's groups. A dependent may cover only the region
    `[start, start + length)` of `dim` (the input columns of a convolution that reads a concatenation).
    """

    param_name: str
    dim: int = 0
    start: int = 0
    length: int | None = None

    def region(self, size: int) -> tuple[int, int]:
        """`(start, length)` of the region along `dim` of a tensor of `size` entries."""
        return self.start, size - self.start if self.length is None else self.length


@dataclass
class ZIGFamily:
    """A set of `num_groups` zero-invariant groups sharing one layout.

    Args:
        name (`str`):
            Unique name, `<module path>.<kind>`, e.g. `"bert.encoder.layer.3.heads"`.
        kind (`str`):
            What a group is: `"heads"`, `"ffn"` or `"channels"`.
        num_groups (`int`):
            Number of groups; every member's size along its `dim` is a multiple of it.
        members (`tuple[ZIGMember, ...]`):
            Penalised parameters.
        dependents (`tuple[ZIGMember, ...]`):
            Parameters pruned along with the groups but not penalised.
        layer (`int`, *optional*):
            Index of the transformer layer the family belongs to.
        module (`str`):
            Path of the module that owns the family (the transformer layer for heads and FFN rows).
        meta (`dict`):
            What pruning needs to rebuild the module: head sizes, attribute names, and so on.
    """

    name: str
    kind: str
    num_groups: int
    members: tuple[ZIGMember, ...]
    dependents: tuple[ZIGMember, ...] = ()
    layer: int | None = None
    module: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def member_view(self, param: torch.Tensor, dim: int) -> torch.Tensor:
        """Returns `param` seen as `[num_groups, -1]`, for reading (a copy when `param` is not contiguous, e.g. a
        `channels_last` convolution weight)."""
        return param.movedim(dim, 0).reshape(self.num_groups, -1)


class ZIGSet:
    """The zero-invariant groups of a model.

    Built by [`build_zigs`]; it keeps a reference to the model and reads the parameters on demand, so norms and
    sparsity always describe the current weights.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto import build_zigs

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> zigs = build_zigs(model)
    >>> len(zigs)  # 2 layers x (4 heads + 37 FFN rows)
    82
    >>> zigs.set_zero(torch.arange(len(zigs)) % 2 == 0)
    >>> zigs.group_sparsity()
    0.5
    ```
    """

    def __init__(self, model: nn.Module, families: Sequence[ZIGFamily], layout: Any | None = None):
        if len(families) == 0:
            raise ValueError("A ZIGSet needs at least one family of groups; got none.")
        names = [family.name for family in families]
        if len(set(names)) != len(names):
            raise ValueError(f"Family names must be unique; got {names}.")
        self.model = model
        self.families: list[ZIGFamily] = list(families)
        self.layout = layout
        """The [`~hf_oto.layout.OTOLayout`] of the model when the groups were built (every family, including the
        excluded ones), set by [`build_zigs`]; `None` for a set made by hand (pruning then reads it from the model)."""
        parameters = dict(model.named_parameters())
        penalised: dict[str, str] = {}
        for family in self.families:
            for member in (*family.members, *family.dependents):
                if member.param_name not in parameters:
                    raise ValueError(
                        f"Family {family.name!r} names parameter {member.param_name!r}, which the model lacks."
                    )
                full = parameters[member.param_name].shape[member.dim]
                start, size = member.region(full)
                if start < 0 or size < 0 or start + size > full:
                    raise ValueError(
                        f"Family {family.name!r} names the region [{start}, {start + size}) of dim {member.dim} of "
                        f"{member.param_name!r}, which has {full} entries."
                    )
                if size % family.num_groups != 0:
                    raise ValueError(
                        f"Parameter {member.param_name!r} has size {size} along dim {member.dim}, which does not split "
                        f"into the {family.num_groups} groups of family {family.name!r}."
                    )
            for member in family.members:
                if member.start != 0 or member.length is not None:
                    raise ValueError(
                        f"Penalised member {member.param_name!r} of family {family.name!r} must span its whole dim "
                        f"{member.dim}; only dependents may cover a region."
                    )
                if member.param_name in penalised:
                    raise ValueError(
                        f"Parameter {member.param_name!r} is penalised by two families ({penalised[member.param_name]!r}"
                        f" and {family.name!r}); a parameter may belong to one family only."
                    )
                penalised[member.param_name] = family.name

    # ----------------------------------------------------------------------------------------------------------
    # Structure
    # ----------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(family.num_groups for family in self.families)

    def __iter__(self) -> Iterator[ZIGFamily]:
        return iter(self.families)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{kind}: {count}" for kind, count in self.num_groups_by_kind().items())
        return f"ZIGSet({len(self)} groups in {len(self.families)} families; {kinds})"

    def family(self, name: str) -> ZIGFamily:
        """Returns the family called `name`."""
        for family in self.families:
            if family.name == name:
                return family
        raise KeyError(f"No family named {name!r}; families are {[f.name for f in self.families][:8]}...")

    def num_groups_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for family in self.families:
            counts[family.kind] += family.num_groups
        return dict(counts)

    def parameter(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def penalised_parameters(self) -> Iterator[tuple[ZIGFamily, ZIGMember, nn.Parameter]]:
        """Yields `(family, member, parameter)` for every penalised member."""
        for family in self.families:
            for member in family.members:
                yield family, member, self.parameter(member.param_name)

    def offsets(self) -> list[int]:
        """Start index of each family in the flat group order used by [`~ZIGSet.group_norms`] and `set_zero`."""
        starts, total = [], 0
        for family in self.families:
            starts.append(total)
            total += family.num_groups
        return starts

    # ----------------------------------------------------------------------------------------------------------
    # Norms and sparsity
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def family_norms(self) -> list[torch.Tensor]:
        """Euclidean norm of every group, one `[num_groups]` float32 tensor per family (batched per parameter)."""
        norms = []
        for family in self.families:
            squared = None
            for member in family.members:
                view = family.member_view(self.parameter(member.param_name).detach(), member.dim).float()
                contribution = view.pow(2).sum(dim=1)
                squared = contribution if squared is None else squared + contribution
            norms.append(squared.sqrt())
        return norms

    def group_norms(self) -> torch.Tensor:
        """Euclidean norm of every group, flat over all families in their order."""
        return torch.cat([norm.cpu() for norm in self.family_norms()])

    def zero_mask(self) -> torch.Tensor:
        """Boolean mask, flat over all groups, of the groups whose penalised parameters are all exactly zero."""
        return self.group_norms() == 0

    def family_zero_masks(self) -> dict[str, torch.Tensor]:
        """Zero mask of every family, keyed by family name."""
        return {family.name: (norm == 0).cpu() for family, norm in zip(self.families, self.family_norms())}

    def num_zero_groups(self) -> int:
        return int(self.zero_mask().sum())

    def group_sparsity(self) -> float:
        """Fraction of groups that are exactly zero."""
        return self.num_zero_groups() / len(self)

    def sparsity_by_kind(self) -> dict[str, float]:
        """Group sparsity of each kind of family (`"heads"`, `"ffn"`, ...)."""
        zeros: dict[str, int] = defaultdict(int)
        for family, mask in zip(self.families, self.family_zero_masks().values()):
            zeros[family.kind] += int(mask.sum())
        return {kind: zeros[kind] / count for kind, count in self.num_groups_by_kind().items()}

    def sparsity_by_family(self) -> dict[str, float]:
        """Group sparsity of each family (one per layer and kind), keyed by family name."""
        return {name: int(mask.sum()) / mask.numel() for name, mask in self.family_zero_masks().items()}

    def kept_groups(self) -> dict[str, int]:
        """Number of non-zero groups of each family, keyed by family name."""
        return {name: int((~mask).sum()) for name, mask in self.family_zero_masks().items()}

    # ----------------------------------------------------------------------------------------------------------
    # Editing
    # ----------------------------------------------------------------------------------------------------------
    def _split_mask(self, mask: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(mask, Mapping):
            unknown = set(mask) - {family.name for family in self.families}
            if unknown:
                raise ValueError(f"Unknown family names in mask: {sorted(unknown)}.")
            split = {}
            for name, family_mask in mask.items():
                family_mask = torch.as_tensor(family_mask, dtype=torch.bool).flatten()
                if family_mask.numel() != self.family(name).num_groups:
                    raise ValueError(
                        f"Mask of family {name!r} has {family_mask.numel()} entries; the family has "
                        f"{self.family(name).num_groups} groups."
                    )
                split[name] = family_mask
            return split
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten().cpu()
        if mask.numel() != len(self):
            raise ValueError(f"The mask has {mask.numel()} entries; the ZIGSet has {len(self)} groups.")
        return {
            family.name: mask[start : start + family.num_groups]
            for family, start in zip(self.families, self.offsets())
        }

    @torch.no_grad()
    def set_zero(self, mask: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Sets the penalised parameters of the chosen groups to exactly zero.

        Args:
            mask (`torch.Tensor` or `dict[str, torch.Tensor]`):
                Either a boolean tensor over all groups (flat, in family order), or a dict from family name to a
                boolean tensor over that family's groups. `True` marks a group to zero.
        """
        for name, family_mask in self._split_mask(mask).items():
            family = self.family(name)
            for member in family.members:
                param = self.parameter(member.param_name)
                keep = (~family_mask).to(device=param.device, dtype=param.dtype)
                chunks = param.data.unflatten(member.dim, (family.num_groups, -1))
                keep_shape = [1] * chunks.dim()
                keep_shape[member.dim] = family.num_groups
                chunks.mul_(keep.view(keep_shape))

    def random_zero_mask(self, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """A flat mask choosing `round(fraction * len(self))` groups uniformly at random, for sanity checks."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1]; got {fraction}.")
        order = torch.randperm(len(self), generator=generator)
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[order[: round(fraction * len(self))]] = True
        return mask

    def excluding(self, patterns: Sequence[str]) -> list[ZIGFamily]:
        """Families none of whose names or modules match any of the `fnmatch` `patterns`."""
        return [family for family in self.families if not family_matches(family, patterns)]

    def summary(self) -> str:
        """A text table: one line per family with its kind, groups, zero groups and sparsity."""
        lines = [f"{'family':<48} {'kind':<9} {'groups':>7} {'zero':>7} {'sparsity':>9}"]
        for family, mask in zip(self.families, self.family_zero_masks().values()):
            zero = int(mask.sum())
            lines.append(
                f"{family.name:<48} {family.kind:<9} {family.num_groups:>7} {zero:>7} {zero / family.num_groups:>9.1%}"
            )
        lines.append(f"{'total':<48} {'':<9} {len(self):>7} {self.num_zero_groups():>7} {self.group_sparsity():>9.1%}")
        return "\n".join(lines)


def family_matches(family: ZIGFamily, patterns: Sequence[str]) -> bool:
    """Whether `fnmatch` `patterns` match the family's name or the name of one of its parameters."""
    names = [family.name, *(member.param_name for member in family.members)]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)
