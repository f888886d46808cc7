"""The kinds of zero-invariant groups, as a small registry: what each kind records in the layout, how it is laid out in
reports and cards, what slicing must update besides the tensors, and which extra FLOPs it owns.

Everything downstream of the ZIGs (pruning, the layout, the report, the model card, the cost model) asks the family's
kind instead of branching on "transformer or CNN?". Adding a kind of group means one [`GroupKind`] subclass,
registered with [`register_group_kind`], plus the builder that makes its families (`hf_oto/zig/`).

Example:

```python
>>> from hf_oto.group_kinds import GROUP_KINDS

>>> sorted(GROUP_KINDS)
['channels', 'ffn', 'heads']
>>> GROUP_KINDS["heads"].label
'heads'
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn


if TYPE_CHECKING:
    from .layout import OTOLayout
    from .zig.groups import ZIGFamily


class GroupKind:
    """One kind of group. Subclasses set the class attributes and override what differs.

    Attributes:
        name (`str`): The `ZIGFamily.kind` it describes (`"heads"`, `"ffn"`, `"channels"`).
        label (`str`): How reports and cards name its groups ("FFN rows").
        axis (`str`): What a report row is for this kind: `"layer"` (one row per transformer layer) or `"family"` (one
            row per family, e.g. per channel family).
        min_kept (`int`): Groups a family keeps even when all are zero (a convolution needs one output channel).
    """

    name: str = ""
    label: str = ""
    axis: str = "layer"
    min_kept: int = 0
    card_label: str = ""
    """The row of the model card's size table ("attention heads")."""
    description: str = ""
    """What one group is, in the card's sentence on the method."""
    row_header: str = "layer"
    """Title of the first column of the card's per-row table."""
    color: str = "#4C72B0"
    """Bar colour in the layout plot."""

    def table_header(self, title: str) -> str:
        """Header of a column of the card's per-row table."""
        return f"{title} kept"

    def row_label(self, row: Any) -> str:
        """How a row (layer index or family name) is written in the card's table."""
        return str(row)

    def layout_entries(self, family: ZIGFamily, kept: int) -> list[tuple[str, Any, int]]:
        """The layout entries `(key, layer index or family name, value)` of `family` with `kept` groups."""
        raise NotImplementedError

    def columns(self, layout: OTOLayout) -> list[tuple[str, Mapping[Any, int]]]:
        """The report columns of this kind: `(column title, {row: count})` pairs."""
        raise NotImplementedError

    def kept_count(self, family: ZIGFamily, entries: Mapping[str, Mapping[Any, int]]) -> int:
        """How many groups of `family` a recorded layout keeps ([`~hf_oto.layout.OTOLayout.entries`]): the inverse of
        [`GroupKind.layout_entries`], used when a saved model is rebuilt. Default: the value of its first entry."""
        key, index, _ = self.layout_entries(family, 0)[0]
        return entries[key][index]

    def applies_to(self, layout: OTOLayout) -> bool:
        """Whether `layout` has entries of this kind."""
        return any(len(values) for _, values in self.columns(layout))

    def total(self, layout: OTOLayout) -> int:
        """The kept groups of this kind in `layout` (the first column: heads, FFN rows, channels)."""
        columns = self.columns(layout)
        return sum(columns[0][1].values()) if columns else 0

    def group_width(self, family: ZIGFamily) -> int:
        """Entries one group owns along the first member's dimension (a head: `head_dim` x query heads per group)."""
        return 1

    def after_slice(self, model: nn.Module, family: ZIGFamily, kept: int) -> None:
        """Updates what slicing the tensors does not (e.g. an attention module's head count). Default: nothing."""

    def extra_flops(self, family: ZIGFamily, measured: Mapping[str, Mapping[str, float]]) -> list[tuple[str, float]]:
        """FLOPs owned by the family beyond its linear/conv products, as `(key, flops)` pairs shared equally by its
        groups (e.g. a head's share of the attention products). Default: none."""
        return []


class HeadsKind(GroupKind):
    """Attention heads: one group is a key/value head with the query heads that share it (one head without GQA)."""

    name = "heads"
    label = "heads"
    card_label = "attention heads"
    description = "attention heads"

    def layout_entries(self, family: ZIGFamily, kept: int) -> list[tuple[str, Any, int]]:
        entries = [("num_attention_heads", family.layer, kept * family.meta["queries_per_group"])]
        return entries + [("num_key_value_heads", family.layer, kept)]

    def columns(self, layout: OTOLayout) -> list[tuple[str, Mapping[Any, int]]]:
        if not layout.is_transformer:
            return []
        columns = [("heads", dict(enumerate(layout.num_attention_heads)))]
        if layout.num_key_value_heads is not None:
            columns.append(("KV heads", dict(enumerate(layout.num_key_value_heads))))
        return columns

    def group_width(self, family: ZIGFamily) -> int:
        return family.meta["head_dim"] * family.meta["queries_per_group"]

    def kept_count(self, family: ZIGFamily, entries: Mapping[str, Mapping[Any, int]]) -> int:
        qpg = family.meta["queries_per_group"]
        heads = entries["num_attention_heads"][family.layer]
        if "num_key_value_heads" in entries:
            kept = entries["num_key_value_heads"][family.layer]
            if heads != kept * qpg:
                raise ValueError(
                    f"oto_layout of layer {family.layer}: {heads} query heads do not match {kept} key/value heads x "
                    f"{qpg} query heads per group."
                )
            return kept
        if heads % qpg:
            raise ValueError(
                f"oto_layout of layer {family.layer}: {heads} query heads is not a multiple of the {qpg} query heads "
                "per key/value head."
            )
        return heads // qpg

    def after_slice(self, model: nn.Module, family: ZIGFamily, kept: int) -> None:
        from .pruned_attention import update_attention

        update_attention(model, family, kept)

    def extra_flops(self, family: ZIGFamily, measured: Mapping[str, Mapping[str, float]]) -> list[tuple[str, float]]:
        if not family.members:
            return []
        query = family.members[0].param_name.rpartition(".")[0]
        attention = measured.get("attention", {})
        return [(f"{query}#attention", float(attention[query]))] if query in attention else []


class FFNKind(GroupKind):
    """FFN rows: one row of the up (and gate) projection with the matching column of the down projection."""

    name = "ffn"
    label = "FFN rows"
    card_label = "FFN rows"
    description = "FFN rows"
    color = "#DD8452"

    def layout_entries(self, family: ZIGFamily, kept: int) -> list[tuple[str, Any, int]]:
        return [("intermediate_size", family.layer, kept)]

    def columns(self, layout: OTOLayout) -> list[tuple[str, Mapping[Any, int]]]:
        return [("FFN rows", dict(enumerate(layout.intermediate_size)))] if layout.is_transformer else []


class ChannelsKind(GroupKind):
    """Convolution channels: a filter with its bias and batch-norm weight and bias, tied across residual adds."""

    name = "channels"
    label = "channels"
    axis = "family"
    min_kept = 1
    card_label = "channels in pruned families"
    description = (
        "convolution channels (a filter with its bias and batch-norm weight and bias, tied across residual adds)"
    )
    row_header = "channels of (and tied to)"
    color = "#55A868"

    def table_header(self, title: str) -> str:
        return "kept"

    def row_label(self, row: Any) -> str:
        return f"`{str(row).removesuffix('.channels')}`"

    def layout_entries(self, family: ZIGFamily, kept: int) -> list[tuple[str, Any, int]]:
        return [("channels", family.name, max(kept, self.min_kept))]

    def columns(self, layout: OTOLayout) -> list[tuple[str, Mapping[Any, int]]]:
        return [] if layout.is_transformer else [("channels", dict(layout.channels))]


GROUP_KINDS: dict[str, GroupKind] = {}
"""The registered kinds, by `ZIGFamily.kind`."""


def register_group_kind(kind: GroupKind) -> GroupKind:
    """Registers a [`GroupKind`] under `kind.name` (replacing one of the same name) and returns it.

    Example:

    ```python
    >>> class MyKind(GroupKind):  # doctest: +SKIP
    ...     name, label = "experts", "experts"
    >>> register_group_kind(MyKind())  # doctest: +SKIP
    ```
    """
    if not isinstance(kind, GroupKind) or not kind.name:
        raise ValueError(f"register_group_kind needs a GroupKind instance with a name; got {kind!r}.")
    GROUP_KINDS[kind.name] = kind
    return kind


for _kind in (HeadsKind(), FFNKind(), ChannelsKind()):
    register_group_kind(_kind)


def kind_of(family: ZIGFamily) -> GroupKind:
    """The [`GroupKind`] of a family.

    Raises:
        `ValueError` for a kind that is not registered.
    """
    kind = GROUP_KINDS.get(family.kind)
    if kind is None:
        raise ValueError(
            f"Family {family.name!r} is of kind {family.kind!r}, which hf_oto does not know; registered kinds: "
            f"{sorted(GROUP_KINDS)} (see hf_oto.group_kinds.register_group_kind)."
        )
    return kind


def kinds_in(layout: OTOLayout) -> list[GroupKind]:
    """The registered kinds that have entries in `layout`, in registration order."""
    return [kind for kind in GROUP_KINDS.values() if kind.applies_to(layout)]


def report_columns(layout: OTOLayout) -> tuple[str, list[tuple[GroupKind, str, Mapping[Any, int]]]]:
    """The row axis (`"layer"` or `"family"`) and the columns `(kind, title, {row: count})` of every registered kind
    that applies to `layout`, in registration order: what reports, cards and plots lay out.

    Example:

    ```python
    >>> from hf_oto.layout import OTOLayout

    >>> axis, columns = report_columns(OTOLayout(num_attention_heads=[4, 2], intermediate_size=[37, 9]))
    >>> axis, [title for _, title, _ in columns]
    ('layer', ['heads', 'FFN rows'])
    ```
    """
    kinds = kinds_in(layout)
    axes = {kind.axis for kind in kinds}
    axis = axes.pop() if len(axes) == 1 else "layer"
    return axis, [(kind, title, values) for kind in kinds for title, values in kind.columns(layout)]
