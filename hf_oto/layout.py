"""[`OTOLayout`]: the one record of what a model keeps per family of zero-invariant groups.

A layout says how many groups of every family a model computes: per transformer layer its query heads, key/value
heads (grouped-query attention) and FFN rows; per channel family of a convolutional network its channels. It is
computed once from the ZIGs (the dense layout when [`~hf_oto.zig.build_zigs`] builds them, the slim layout from the
kept groups when [`~hf_oto.pruning.prune_zero_groups`] slices them), written to `config.json` as `oto_layout` when the
model is saved, and read back by [`~hf_oto.pruning.apply_layout`] when it is loaded. Nothing downstream re-reads the
modules or re-traces the model to learn what was kept.

The on-disk form ([`OTOLayout.to_dict`]) is the `oto_layout` of format version 1:
`{"format_version": 1, "num_attention_heads": [...], "num_key_value_heads": [...], "intermediate_size": [...]}` for
a transformer (`num_key_value_heads` only for grouped-query attention), `{"format_version": 1, "channels": {...}}` for
a convolutional network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from .group_kinds import GROUP_KINDS, kind_of


LAYOUT_FORMAT_VERSION = 1
"""Version of the `oto_layout` dict in `config.json`."""


@dataclass(frozen=True)
class OTOLayout:
    """How many groups of every family a model computes.

    Args:
        num_attention_heads (`tuple[int, ...]`): Query heads per transformer layer (empty for a conv net).
        intermediate_size (`tuple[int, ...]`): FFN rows per transformer layer (empty for a conv net).
        num_key_value_heads (`tuple[int, ...]`, *optional*): Key/value heads per layer of a grouped-query attention
            model; `None` otherwise.
        channels (`dict[str, int]`, *optional*): Channels of every channel family of a convolutional network, by family
            name, in graph order; `None` for a transformer.
        format_version (`int`): Version of the on-disk form.

    Example:

    ```python
    >>> from hf_oto.layout import OTOLayout

    >>> layout = OTOLayout.from_dict({"format_version": 1, "num_attention_heads": [4, 2], "intermediate_size": [37, 9]})
    >>> layout.is_transformer, layout.num_attention_heads
    (True, (4, 2))
    >>> layout.to_dict()["intermediate_size"]
    [37, 9]
    ```
    """

    num_attention_heads: tuple[int, ...] = ()
    intermediate_size: tuple[int, ...] = ()
    num_key_value_heads: tuple[int, ...] | None = None
    channels: Mapping[str, int] | None = None
    format_version: int = LAYOUT_FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_attention_heads", tuple(self.num_attention_heads))
        object.__setattr__(self, "intermediate_size", tuple(self.intermediate_size))
        if self.num_key_value_heads is not None:
            object.__setattr__(self, "num_key_value_heads", tuple(self.num_key_value_heads))
        if self.channels is not None:
            object.__setattr__(self, "channels", dict(self.channels))

    @property
    def is_transformer(self) -> bool:
        """Whether this is the layout of a transformer (per-layer heads and FFN rows), not of a conv net."""
        return self.channels is None

    @property
    def num_layers(self) -> int:
        """Number of transformer layers (0 for a conv net)."""
        return len(self.num_attention_heads)

    def to_dict(self) -> dict[str, Any]:
        """The `oto_layout` stored in `config.json` (lists, JSON-serialisable)."""
        if not self.is_transformer:
            return {"format_version": self.format_version, "channels": dict(self.channels)}
        result: dict[str, Any] = {
            "format_version": self.format_version,
            "num_attention_heads": list(self.num_attention_heads),
        }
        if self.num_key_value_heads is not None:
            result["num_key_value_heads"] = list(self.num_key_value_heads)
        result["intermediate_size"] = list(self.intermediate_size)
        return result

    @classmethod
    def from_dict(cls, layout: Mapping[str, Any] | OTOLayout) -> OTOLayout:
        """Reads (and checks the form of) an `oto_layout` dict, e.g. `config.oto_layout`.

        Raises:
            `ValueError`: not a dict, another format version, or sizes that are not non-negative integers.
        """
        if isinstance(layout, OTOLayout):
            return layout
        if not isinstance(layout, Mapping):
            raise ValueError(f"oto_layout must be a dict; got {type(layout).__name__}.")
        version = layout.get("format_version")
        if version != LAYOUT_FORMAT_VERSION:
            raise ValueError(
                f"oto_layout has format_version={version!r}; this hf_oto reads version {LAYOUT_FORMAT_VERSION}. "
                "Upgrade hf_oto to load this checkpoint."
            )
        if "channels" in layout:
            channels = layout["channels"]
            if not isinstance(channels, Mapping):
                raise ValueError(f"oto_layout['channels'] must map channel family names to counts; got {channels!r}.")
            return cls(channels=dict(channels))
        values = {}
        for key in ("num_attention_heads", "intermediate_size", "num_key_value_heads"):
            value = layout.get(key)
            if value is None and key == "num_key_value_heads":
                continue
            if not isinstance(value, Sequence) or isinstance(value, str):
                raise ValueError(f"oto_layout[{key!r}] must list one size per layer; got {value!r}.")
            values[key] = tuple(value)
        return cls(**values)

    def kept(self, plan: Sequence[tuple[Any, int]]) -> OTOLayout:
        """The layout after keeping `kept` groups of each family of `plan` (`(ZIGFamily, kept count)` pairs); the
        families not in `plan` keep their sizes. Each family's kind (see [`~hf_oto.group_kinds.GROUP_KINDS`]) says
        which entry it changes.

        Example:

        ```python
        >>> from transformers import BertConfig, BertModel
        >>> from hf_oto import build_zigs

        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
        >>> zigs = build_zigs(model)
        >>> zigs.layout.kept([(zigs.families[0], 1)]).num_attention_heads
        (1, 4)
        ```
        """
        entries = self.entries()
        for family, count in plan:
            for key, index, value in kind_of(family).layout_entries(family, int(count)):
                if key in entries:  # e.g. key/value heads only for grouped-query attention
                    entries[key][index] = value
        return self.from_entries(entries)

    def entries(self) -> dict[str, dict[Any, int]]:
        """Every entry of the layout, `{key: {layer index or family name: count}}` (a mutable copy)."""
        if not self.is_transformer:
            return {"channels": dict(self.channels)}
        result = {
            "num_attention_heads": dict(enumerate(self.num_attention_heads)),
            "intermediate_size": dict(enumerate(self.intermediate_size)),
        }
        if self.num_key_value_heads is not None:
            result["num_key_value_heads"] = dict(enumerate(self.num_key_value_heads))
        return result

    def from_entries(self, entries: Mapping[str, Mapping[Any, int]]) -> OTOLayout:
        """A layout of the same model with the entries of [`OTOLayout.entries`]."""
        if not self.is_transformer:
            return replace(self, channels=dict(entries["channels"]))
        return replace(
            self,
            num_attention_heads=tuple(entries["num_attention_heads"][i] for i in range(self.num_layers)),
            intermediate_size=tuple(entries["intermediate_size"][i] for i in range(self.num_layers)),
            num_key_value_heads=(
                tuple(entries["num_key_value_heads"][i] for i in range(self.num_layers))
                if self.num_key_value_heads is not None
                else None
            ),
        )

    def validate_against(self, dense: OTOLayout) -> None:
        """Checks that this layout can be cut out of a model whose dense layout is `dense` (same kind of model, same
        number of layers or the same channel families, no entry larger than the dense one).

        Raises:
            `ValueError` naming the first entry that does not fit.
        """
        if self.is_transformer != dense.is_transformer:
            what = "transformer heads/FFN sizes" if self.is_transformer else "channel counts"
            raise ValueError(
                f"oto_layout {self.to_dict()!r} records {what}, but the model is "
                f"{'a transformer' if dense.is_transformer else 'a convolutional network (channel families)'}: the "
                "config and the model do not match."
            )
        if not self.is_transformer:
            missing, unknown = (
                sorted(set(dense.channels) - set(self.channels)),
                sorted(set(self.channels) - set(dense.channels)),
            )
            if missing or unknown:
                raise ValueError(
                    f"oto_layout['channels'] does not match the channel families of the model: the model has "
                    f"{missing} that the layout lacks and the layout names {unknown} that the model lacks. The config "
                    "and the architecture come from different models (or a different hf_oto version traced them)."
                )
            for name, count in self.channels.items():
                if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= dense.channels[name]:
                    raise ValueError(
                        f"oto_layout['channels'][{name!r}] = {count!r} is not an integer in [1, {dense.channels[name]}]."
                    )
            return
        own, full = self.entries(), dense.entries()
        if self.num_key_value_heads is None:
            full.pop("num_key_value_heads", None)
        for key, values in full.items():
            if key not in own or len(own[key]) != len(values):
                got = self.to_dict().get(key)
                raise ValueError(
                    f"oto_layout[{key!r}] must list one size per layer ({len(values)} layers); got {got!r}."
                )
            for index, limit in values.items():
                value = own[key][index]
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                    raise ValueError(f"oto_layout[{key!r}][{index}] = {value!r} is not an integer in [0, {limit}].")

    def summary(self) -> dict[str, int]:
        """Total kept groups by kind, e.g. `{"heads": 60, "ffn rows": 4096}` or `{"channels": 2048}`."""
        return {kind.label: kind.total(self) for kind in GROUP_KINDS.values() if kind.applies_to(self)}


def read_layout(model: nn.Module) -> OTOLayout:
    """The layout a model computes now, read from its modules (transformers: the q/k and FFN up projections of every
    layer) or, for a convolutional network, from its traced graph (one `torch.fx` trace).

    Prefer the layout the ZIGs carry (`zigs.layout`) or `model.config.oto_layout` (written by pruning): this function
    is for models that come without either.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto.layout import read_layout

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> read_layout(model).to_dict()
    {'format_version': 1, 'num_attention_heads': [4, 4], 'intermediate_size': [37, 37]}
    ```
    """
    from .zig.build import has_transformer_layout
    from .zig.conv import channel_families
    from .zig.transformers import _join, attention_geometry, base_model_prefix, get_layout, model_layers

    if not has_transformer_layout(model):
        families, _ = channel_families(model)
        return OTOLayout(channels={family.name: family.num_groups for family in families})
    layout = get_layout(model)
    layers_path = _join(base_model_prefix(model), layout.layers)
    heads, kv_heads, ffn = [], [], []
    for index, layer in enumerate(model_layers(model)):
        geometry = attention_geometry(model, _join(layers_path, str(index)), layout)
        heads.append(geometry.num_heads)
        kv_heads.append(geometry.num_kv_heads)
        ffn.append(layer.get_submodule(layout.up).out_features)
    gqa = layout.num_kv_heads_config is not None
    return OTOLayout(num_attention_heads=heads, intermediate_size=ffn, num_key_value_heads=kv_heads if gqa else None)


def model_layout(model: nn.Module) -> OTOLayout:
    """`model.config.oto_layout` when pruning recorded one, else [`read_layout`].

    Example:

    ```python
    >>> model_layout(slim_model).num_attention_heads  # doctest: +SKIP
    (4, 0, 3)
    ```
    """
    recorded = getattr(getattr(model, "config", None), "oto_layout", None)
    return OTOLayout.from_dict(recorded) if recorded is not None else read_layout(model)
