"""Measuring what pruning removed: [`measure_model`] (parameters and FLOPs, counted once per model) and
[`PruningReport`] (the two measurements and the two [`~hf_oto.layout.OTOLayout`]s). [`prune_and_measure`] is the
convenience that prunes and reports in one call.

Example:

```python
>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from hf_oto import build_zigs
>>> from hf_oto.report import prune_and_measure

>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
>>> zigs = build_zigs(model)
>>> zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
>>> slim, report = prune_and_measure(model.eval(), zigs, seq_length=16)
>>> report.params_after < report.params_before
True
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .flops import clamp_flops_seq_length, count_flops, count_parameters
from .group_kinds import GroupKind, report_columns
from .layout import OTOLayout


@dataclass(frozen=True)
class ModelSize:
    """Parameters and forward FLOPs of a model, and the input they were counted on.

    Args:
        params (`int`): Number of parameters.
        flops (`int`): Forward FLOPs (multiply-adds x 2) at batch 1.
        seq_length (`int`): Token length of the counting forward (for image models: the value passed, unused).
    """

    params: int
    flops: int
    seq_length: int


def flops_inputs_for(
    model: nn.Module, inputs: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor] | None:
    """The inputs FLOPs are counted on: `inputs`, or dummy image inputs for a plain `nn.Module` conv net (no
    `main_input_name`), else `None` (the counter's dummy inputs of the model's own kind)."""
    if inputs is not None or getattr(model, "main_input_name", None):
        return inputs
    if not any(isinstance(module, nn.Conv2d) for module in model.modules()):
        return None
    from .zig.conv import _main_input_name, default_example_inputs

    return {_main_input_name(model): default_example_inputs(model)}


def measure_model(
    model: nn.Module, *, seq_length: int = 128, inputs: dict[str, torch.Tensor] | None = None
) -> ModelSize:
    """Counts the parameters and forward FLOPs of `model` (one counting forward, batch 1).

    Args:
        model (`nn.Module`): Any model [`~hf_oto.flops.count_flops`] can count.
        seq_length (`int`, *optional*, defaults to 128): Token length of the dummy inputs, clamped to
            `config.max_position_embeddings` (the [`ModelSize`] records the length used).
        inputs (`dict[str, torch.Tensor]`, *optional*): Your own inputs instead of the dummy ones.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto.report import measure_model

    >>> size = measure_model(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)), seq_length=8)
    >>> size.seq_length, size.params > 0
    (8, True)
    ```
    """
    inputs = flops_inputs_for(model, inputs)
    if inputs is None:
        seq_length = clamp_flops_seq_length(model, seq_length)
    return ModelSize(
        params=count_parameters(model),
        flops=count_flops(model, seq_length=seq_length, inputs=inputs),
        seq_length=seq_length,
    )


@dataclass
class PruningReport:
    """What pruning removed: the sizes before and after ([`ModelSize`]) and the layouts before and after.

    The per-layer lists (`num_attention_heads_*`, `intermediate_size_*`, `num_key_value_heads_*`) and the channel
    dicts (`channels_*`) are views of the two layouts: the lists are empty for a convolutional network,
    `num_key_value_heads_*` is `None` without grouped-query attention, `channels_*` is `None` for a transformer.

    Example:

    ```python
    >>> report = PruningReport.from_sizes(before, after, zigs.layout, slim_layout)  # doctest: +SKIP
    >>> print(report)  # per-layer table and totals  # doctest: +SKIP
    ```
    """

    before: ModelSize
    after: ModelSize
    layout_before: OTOLayout
    layout_after: OTOLayout

    @classmethod
    def from_sizes(
        cls, before: ModelSize, after: ModelSize, layout_before: OTOLayout, layout_after: OTOLayout
    ) -> PruningReport:
        """The report of a pruning from its two measurements and two layouts (checked to describe the same model)."""
        layout_after.validate_against(layout_before)
        return cls(before, after, layout_before, layout_after)

    # Sizes ----------------------------------------------------------------------------------------------------
    params_before = property(lambda self: self.before.params, doc="Parameters of the group-sparse model.")
    params_after = property(lambda self: self.after.params, doc="Parameters of the slim model.")
    flops_before = property(lambda self: self.before.flops, doc="Forward FLOPs of the group-sparse model.")
    flops_after = property(lambda self: self.after.flops, doc="Forward FLOPs of the slim model.")
    seq_length = property(lambda self: self.after.seq_length, doc="Token length at which FLOPs were counted.")

    @property
    def params_ratio(self) -> float:
        """Remaining share of the parameters."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def flops_ratio(self) -> float:
        """Remaining share of the forward FLOPs."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    # Layout views -----------------------------------------------------------------------------------------------
    num_attention_heads_before = property(lambda self: list(self.layout_before.num_attention_heads))
    num_attention_heads_after = property(lambda self: list(self.layout_after.num_attention_heads))
    intermediate_size_before = property(lambda self: list(self.layout_before.intermediate_size))
    intermediate_size_after = property(lambda self: list(self.layout_after.intermediate_size))
    num_key_value_heads_before = property(lambda self: _list_or_none(self.layout_before.num_key_value_heads))
    num_key_value_heads_after = property(lambda self: _list_or_none(self.layout_after.num_key_value_heads))
    channels_before = property(lambda self: _dict_or_none(self.layout_before.channels))
    channels_after = property(lambda self: _dict_or_none(self.layout_after.channels))

    def columns(self) -> tuple[str, list[tuple[GroupKind, str, dict[Any, tuple[int, int]]]]]:
        """The row axis (`"layer"` or `"family"`) and, per column of every group kind, `(kind, title, {row: (before,
        after)})`: what tables and plots lay out (see [`~hf_oto.group_kinds.report_columns`])."""
        axis, before = report_columns(self.layout_before)
        _, after = report_columns(self.layout_after)
        after_by_title = {title: values for _, title, values in after}
        return axis, [
            (kind, title, {row: (count, after_by_title[title][row]) for row, count in values.items()})
            for kind, title, values in before
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: sizes, ratios and the per-layer (or per-family) layouts before and after."""
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "seq_length": self.seq_length,
            "num_attention_heads_before": self.num_attention_heads_before,
            "num_attention_heads_after": self.num_attention_heads_after,
            "intermediate_size_before": self.intermediate_size_before,
            "intermediate_size_after": self.intermediate_size_after,
            "num_key_value_heads_before": self.num_key_value_heads_before,
            "num_key_value_heads_after": self.num_key_value_heads_after,
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "params_ratio": self.params_ratio,
            "flops_ratio": self.flops_ratio,
        }

    def __str__(self) -> str:
        axis, columns = self.columns()
        rows = list(columns[0][2]) if columns else []
        width = max([len(str(row)) for row in rows] + [6 if axis == "family" else 5])
        header = f"{axis:<{width}}" if axis == "family" else f"{axis:>{width}}"
        cells = [f"{title.lower():>15}" for _, title, _ in columns]
        lines = [" ".join([header, *cells])]
        for row in rows:
            label = f"{row!s:<{width}}" if axis == "family" else f"{row!s:>{width}}"
            values = [f"{before:>6} -> {after:<6}" for before, after in (column[row] for _, _, column in columns)]
            lines.append(" ".join([label, *values]))
        lines.append(self._totals_line())
        return "\n".join(lines)

    def architecture(self) -> str:
        """The kept channels of every channel family in graph order, like the "Architecture" column of the paper's
        tables (e.g. `"22-56-M-..."` without the pooling marks): `"22-56-98-..."`. Empty for transformers."""
        return "-".join(str(count) for count in (self.channels_after or {}).values())

    def _totals_line(self) -> str:
        where = "on the example inputs" if not self.layout_after.is_transformer else f"at seq_length={self.seq_length}"
        return (
            f"params: {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.1%}); "
            f"FLOPs {where}: {self.flops_before:,} -> {self.flops_after:,} ({self.flops_ratio:.1%})"
        )


def _list_or_none(values: tuple[int, ...] | None) -> list[int] | None:
    return list(values) if values is not None else None


def _dict_or_none(values: Any) -> dict[str, int] | None:
    return dict(values) if values is not None else None


def prune_and_measure(
    model: nn.Module,
    zigs: Any,
    *,
    seq_length: int = 128,
    inplace: bool = True,
    flops_inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, PruningReport]:
    """Measures `model`, prunes its zero groups with [`~hf_oto.pruning.prune_zero_groups`], measures the slim model
    and returns it with the [`PruningReport`]: the one call for who wants the report (the training scripts and
    [`~hf_oto.OTOTrainer.prune`] use it).

    Args:
        model (`nn.Module`): The group-sparse model.
        zigs ([`~hf_oto.ZIGSet`]): Its zero-invariant groups.
        seq_length (`int`, *optional*, defaults to 128): Token length at which FLOPs are counted (clamped to
            `config.max_position_embeddings`).
        inplace (`bool`, *optional*, defaults to `True`): Prune `model` itself, else a deep copy.
        flops_inputs (`dict`, *optional*): Inputs to count FLOPs on instead of the dummy ones.

    Example:

    ```python
    >>> slim, report = prune_and_measure(model, zigs, seq_length=128)  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    ```
    """
    from .pruning import prune_zero_groups, zigs_layout

    layout_before = zigs_layout(zigs)
    before = measure_model(model, seq_length=seq_length, inputs=flops_inputs)
    slim, layout_after = prune_zero_groups(model, zigs, inplace=inplace)
    after = measure_model(slim, seq_length=seq_length, inputs=flops_inputs)
    return slim, PruningReport.from_sizes(before, after, layout_before, layout_after)
