"""What each zero-invariant group costs: forward FLOPs and parameters, from the counter of the pruning report.

A group's cost is what slicing it away saves. Every cost comes from items the report's own counters measure: the
FLOPs of each `nn.Linear` / `nn.Conv2d` call and the attention products of each layer ([`~hf_oto.flops.module_flops`]),
and the size of each parameter tensor. A group owns a slice of some of those items: its rows of the member weights
(q/k/v rows of a head, up/gate rows of an FFN row, a conv's output channel), its columns of the dependent weights (the
output projection's columns of a head, the down projection's columns of an FFN row, the next conv's input channel),
and, for a head, its share of the attention products (GQA: a key/value head with its query heads).

An item's cost after pruning is `base x (kept fraction along dim 0) x (kept fraction along dim 1)`: exact for
transformers (each weight is sliced along one dimension) and for conv chains (a conv loses output channels to one
family and input channels to another). So [`GroupCosts.flops`] with the numbers of groups removed per family gives
exactly what [`~hf_oto.count_flops`] reports for the slim model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from .flops import clamp_flops_seq_length, dummy_inputs, module_flops
from .zig.groups import ZIGSet


logger = logging.get_logger(__name__)

COST_KINDS = ("flops", "params")


@dataclass
class _Item:
    """One measured item (a module's FLOPs or a tensor's size) and the families that slice it, per dimension.

    `slices[dim]` lists `(family index, fraction of the item's extent along dim that one group of it holds)`.
    """

    base: float
    slices: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def kept(self, dim: int, removed: Sequence[int]) -> float:
        return max(0.0, 1.0 - sum(removed[family] * fraction for family, fraction in self.slices.get(dim, ())))

    def value(self, removed: Sequence[int]) -> float:
        value = self.base
        for dim in self.slices:
            value *= self.kept(dim, removed)
        return value

    def marginal(self, family: int, removed: Sequence[int]) -> float:
        """Cost of one more group of `family`, the other slices as in `removed`."""
        total = 0.0
        for dim, entries in self.slices.items():
            fraction = sum(f for index, f in entries if index == family)
            if fraction == 0.0:
                continue
            other = self.base * fraction
            for other_dim in self.slices:
                if other_dim != dim:
                    other *= self.kept(other_dim, removed)
            total += other
        return total


class GroupCosts:
    """The FLOPs and parameter cost of every zero-invariant group of a model, and of any set of removed groups.

    Build it with [`GroupCosts.measure`] (one dummy forward pass, the one [`~hf_oto.count_flops`] makes). All groups of
    a family cost the same; [`GroupCosts.marginal`] gives that cost for each family given what is already removed.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto import build_zigs
    >>> from hf_oto.costs import GroupCosts

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> costs = GroupCosts.measure(build_zigs(model), seq_length=16)
    >>> removed = [0] * len(costs.family_names)
    >>> costs.flops(removed) == costs.dense["flops"]
    True
    >>> removed[0] = 4  # every head of layer 0
    >>> costs.flops(removed) < costs.dense["flops"]
    True
    ```
    """

    def __init__(
        self,
        family_names: Sequence[str],
        family_kinds: Sequence[str],
        num_groups: Sequence[int],
        items: Mapping[str, list[_Item]],
        dense: Mapping[str, float],
        seq_length: int,
    ):
        self.family_names = list(family_names)
        self.family_kinds = list(family_kinds)
        self.num_groups = list(num_groups)
        self.items = {kind: list(items[kind]) for kind in COST_KINDS}
        self.dense = {kind: float(dense[kind]) for kind in COST_KINDS}
        self.seq_length = seq_length
        # What no family slices (embeddings, the classifier, layers kept dense) does not change with pruning.
        self._fixed = {kind: self.dense[kind] - sum(item.base for item in self.items[kind]) for kind in COST_KINDS}

    @classmethod
    @torch.no_grad()
    def measure(
        cls,
        zigs: ZIGSet,
        seq_length: int = 128,
        *,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> GroupCosts:
        """Measures the costs of the groups of `zigs` on its model.

        Args:
            zigs ([`ZIGSet`]): The zero-invariant groups (their model is run once, in eval mode).
            seq_length (`int`, *optional*, defaults to 128):
                Token length at which FLOPs are counted (clamped to `config.max_position_embeddings`; vision models
                use `config.image_size`).
            inputs (`dict[str, torch.Tensor]`, *optional*): Your own inputs instead of the dummy ones.

        Returns:
            [`GroupCosts`]
        """
        model = zigs.model
        if inputs is None:
            seq_length = clamp_flops_seq_length(model, seq_length)
            inputs = dummy_inputs(model, seq_length=seq_length)
        measured = module_flops(model, inputs=inputs)
        parameters = dict(model.named_parameters())
        flops_items: dict[str, _Item] = {}
        param_items: dict[str, _Item] = {}
        for index, family in enumerate(zigs.families):
            for member in (*family.members, *family.dependents):
                tensor = parameters[member.param_name]
                full = tensor.shape[member.dim]
                _, length = member.region(full)
                fraction = length / family.num_groups / full
                item = param_items.setdefault(member.param_name, _Item(float(tensor.numel())))
                item.slices.setdefault(member.dim, []).append((index, fraction))
                module, _, attribute = member.param_name.rpartition(".")
                if attribute == "weight" and module in measured["linear"] and member.dim in (0, 1):
                    item = flops_items.setdefault(module, _Item(float(measured["linear"][module])))
                    item.slices.setdefault(member.dim, []).append((index, fraction))
            if family.kind == "heads" and family.members:
                query = family.members[0].param_name.rpartition(".")[0]
                if query in measured["attention"]:
                    item = flops_items.setdefault(f"{query}#attention", _Item(float(measured["attention"][query])))
                    item.slices.setdefault(0, []).append((index, 1.0 / family.num_groups))
        dense = {
            "flops": sum(measured["linear"].values()) + sum(measured["attention"].values()),
            "params": sum(p.numel() for p in model.parameters()),
        }
        return cls(
            [family.name for family in zigs.families],
            [family.kind for family in zigs.families],
            [family.num_groups for family in zigs.families],
            {"flops": list(flops_items.values()), "params": list(param_items.values())},
            dense,
            seq_length,
        )

    def _check(self, removed: Sequence[int]) -> None:
        if len(removed) != len(self.family_names):
            raise ValueError(f"Expected one count per family ({len(self.family_names)}); got {len(removed)}.")

    def cost(self, kind: str, removed: Sequence[int]) -> float:
        """The model's FLOPs (`kind="flops"`) or parameters (`"params"`) with `removed[f]` groups of family `f` gone."""
        if kind not in COST_KINDS:
            raise ValueError(f"kind must be one of {COST_KINDS}; got {kind!r}.")
        self._check(removed)
        return self._fixed[kind] + sum(item.value(removed) for item in self.items[kind])

    def flops(self, removed: Sequence[int]) -> float:
        """Forward FLOPs at `seq_length` with `removed[f]` groups of family `f` sliced away."""
        return self.cost("flops", removed)

    def params(self, removed: Sequence[int]) -> float:
        """Parameters with `removed[f]` groups of family `f` sliced away."""
        return self.cost("params", removed)

    def marginal(self, kind: str, removed: Sequence[int]) -> list[float]:
        """Per family, what removing one more of its groups saves in `kind`, given `removed`."""
        self._check(removed)
        saving = [0.0] * len(self.family_names)
        for item in self.items[kind]:
            families = {family for entries in item.slices.values() for family, _ in entries}
            for family in families:
                saving[family] += item.marginal(family, removed)
        return saving

    def per_group(self, kind: str = "flops") -> dict[str, float]:
        """What one group of each family costs in the dense model, keyed by family name."""
        return dict(zip(self.family_names, self.marginal(kind, [0] * len(self.family_names))))


def removed_counts(zero_masks: Mapping[str, torch.Tensor], family_names: Sequence[str]) -> list[int]:
    """Numbers of removed groups per family, in `family_names` order, from per-family boolean masks."""
    return [int(zero_masks[name].sum()) for name in family_names]
