"""[`build_zigs`]: the one entry point that partitions a model's parameters into zero-invariant groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.utils import logging

from ..layout import OTOLayout, read_layout
from .conv import channel_families, describe_dense_channels
from .groups import ZIGFamily, ZIGSet, family_matches
from .transformers import TRANSFORMER_FAMILIES, TRANSFORMER_LAYOUTS, transformer_families


logger = logging.get_logger(__name__)

SUPPORTED_FAMILIES = (*TRANSFORMER_FAMILIES, "channels")
"""Kinds of groups: attention `"heads"` and `"ffn"` rows of transformers, `"channels"` of convolutional networks."""


def has_transformer_layout(model: nn.Module) -> bool:
    """Whether `model` is a transformer with a row in `TRANSFORMER_LAYOUTS` (heads and FFN rows)."""
    return getattr(getattr(model, "config", None), "model_type", None) in TRANSFORMER_LAYOUTS


def is_transformer(model: nn.Module) -> bool:
    """Whether `model` is a transformers model built around attention (DeiT, Swin, T5, GPT-2, ...): it has a config
    with a `model_type` and an attention module (`nn.MultiheadAttention` or a class named `*Attention`)."""
    if getattr(getattr(model, "config", None), "model_type", None) is None:
        return False
    return any(
        isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")
        for module in model.modules()
    )


def default_families(model: nn.Module) -> tuple[str, ...]:
    """`("channels",)` for a convolutional network (convolutions, no transformer layout, no attention), else
    `("heads", "ffn")`, which raises the layout error (supported model types, how to add one) for a transformer
    without a layout, even one with a convolutional patch embedding (DeiT, Swin)."""
    if has_transformer_layout(model) or is_transformer(model):
        return TRANSFORMER_FAMILIES
    if any(isinstance(module, nn.Conv2d) for module in model.modules()):
        return ("channels",)
    return TRANSFORMER_FAMILIES


def build_zigs(
    model: nn.Module,
    *,
    families: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    example_inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    channel_penalty: str = "conv_and_norm",
) -> ZIGSet:
    """Partitions a model's prunable parameters into zero-invariant groups.

    Args:
        model (`nn.Module`):
            A transformers model of a supported `model_type` (any of its `*For...` task variants) for `"heads"` and
            `"ffn"`; any convolutional network that `torch.fx` can trace (a transformers model such as
            `ResNetForImageClassification`, or a plain `nn.Module`) for `"channels"`. An already pruned transformer
            (from [`~hf_oto.pruning.prune_zero_groups`] or [`~hf_oto.modeling.load_pruned_model`]) works: head counts
            and sizes are read from its modules, not its config, so pruning it again is exact.
        families (`Sequence[str]`, *optional*):
            Which kinds of groups to build: `"heads"` (the q/k/v rows of one attention head; with grouped-query
            attention, one key/value head with the query heads that share it), `"ffn"` (one row of the FFN up
            projection, and of the gate projection for gated FFNs) and/or `"channels"` (one output channel of a
            convolution with its bias and batch-norm weight and bias, tied across residual adds; see
            [`~hf_oto.zig.conv`]). Defaults to `("channels",)` for a model with convolutions and no transformer
            layout, `("heads", "ffn")` otherwise.
        exclude (`Sequence[str]`, *optional*):
            `fnmatch` patterns of families to leave out, matched against the family name
            (`"<layer path>.heads"`, `"<layer path>.ffn"`, `"<producing module path>.channels"`) and its parameter
            names. For example `["*.layer.5.*"]` keeps layer 5 whole and `["*.query.*"]` would leave out every head
            family.
        example_inputs (`torch.Tensor` or `dict`, *optional*):
            For `"channels"`: a batch for the model's main input, run once to read the shapes. Defaults to zeros of
            `[1, config.num_channels, config.image_size, config.image_size]` (or 32 x 32 with the first
            convolution's input channels).
        channel_penalty (`str`, *optional*, defaults to `"conv_and_norm"`):
            For `"channels"`: `"conv_and_norm"` penalises a channel's filter, bias and batch-norm weight and bias
            (the paper); `"norm"` penalises only the batch-norm weight and bias where a norm reads a convolution
            directly, and slices the filter along (see [`~hf_oto.zig.conv.channel_families`]).

    Returns:
        [`ZIGSet`]: the groups, in layer (graph) order.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification, ResNetConfig, ResNetForImageClassification
    >>> from hf_oto import build_zigs

    >>> config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    >>> zigs = build_zigs(BertForSequenceClassification(config), exclude=["*.layer.1.*"])
    >>> zigs.num_groups_by_kind()
    {'heads': 4, 'ffn': 37}
    >>> resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> build_zigs(resnet).num_groups_by_kind()  # doctest: +SKIP
    {'channels': ...}
    ```
    """
    if families is None:
        families = default_families(model)
    if isinstance(families, str):
        families = (families,)
    unknown = [family for family in families if family not in SUPPORTED_FAMILIES]
    if unknown or not families:
        raise ValueError(
            f"Unknown group families {unknown or list(families)}; choose one or more of {list(SUPPORTED_FAMILIES)}."
        )
    all_families: list[ZIGFamily] = []
    layout = None
    transformer_kinds = [kind for kind in families if kind in TRANSFORMER_FAMILIES]
    if transformer_kinds and "channels" in families:
        raise ValueError(
            f"Build either transformer groups {list(TRANSFORMER_FAMILIES)} or 'channels', not both in one ZIGSet: got "
            f"families={list(families)}."
        )
    if transformer_kinds:
        all_families += transformer_families(model, transformer_kinds)
        layout = read_layout(model)  # every layer, including excluded ones and those without a family left
    if "channels" in families:
        channels, dense = channel_families(model, example_inputs, channel_penalty)
        for line in describe_dense_channels(dense):
            logger.info(line)
        if not channels:
            raise ValueError(
                f"{type(model).__name__} has no prunable channel group: every channel set is kept dense "
                f"({'; '.join(describe_dense_channels(dense)) or 'no convolution or linear layer found'})."
            )
        all_families += channels
        layout = OTOLayout(channels={family.name: family.num_groups for family in channels})
    for pattern in exclude:
        if not any(family_matches(family, [pattern]) for family in all_families):
            raise ValueError(
                f"The exclude pattern {pattern!r} matches no group family. Family names look like "
                f"{all_families[0].name!r}; patterns are fnmatch-style, e.g. '*.layer.5.*'."
            )
    kept = [family for family in all_families if not family_matches(family, exclude)]
    if not kept:
        raise ValueError(
            f"The exclude patterns {list(exclude)} leave no group to train for sparsity; exclude fewer modules."
        )
    if len(kept) < len(all_families):
        logger.info(
            f"Excluded {len(all_families) - len(kept)} of {len(all_families)} group families: {list(exclude)}."
        )
    return ZIGSet(model, kept, layout=layout)
