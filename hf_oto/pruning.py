"""One-shot pruning (OTO, section 3.4): slice the zero groups out of a group-sparse model.

A zero-invariant group whose penalised parameters are all zero contributes exactly nothing to the model's outputs:
its q/k/v rows produce zero queries, keys and values (an attention head whose values are zero outputs zero whatever
its attention pattern), and its FFN up (and gate) rows produce zero activations. Removing those rows, together with
the columns of the output/down projections that only ever multiply them (the *dependents*), gives a slim model whose
outputs equal the group-sparse full model's.

[`prune_zero_groups`] only prunes: it slices in place (or on a copy), lets each family's kind
([`~hf_oto.group_kinds`]) update what the tensors do not say (attention head counts; an attention module that loses
all its heads becomes a [`~hf_oto.pruned_attention.PrunedAttention`] stand-in), and returns the slim model with its
[`~hf_oto.layout.OTOLayout`], computed from the ZIGs and the kept groups (also recorded in `model.config.oto_layout`).
Measuring what was removed is [`~hf_oto.report.prune_and_measure`]'s job. [`apply_layout`] reshapes a freshly built
dense model to a recorded layout through the same slicing code; [`hf_oto.modeling.load_pruned_model`] uses it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .group_kinds import kind_of
from .layout import LAYOUT_FORMAT_VERSION, OTOLayout, read_layout
from .pruned_attention import PrunedAttention, _new_stand_in  # noqa: F401  (pickles name hf_oto.pruning._new_stand_in)
from .report import PruningReport  # noqa: F401  (its historical home)
from .zig.build import has_transformer_layout
from .zig.conv import DEPTHWISE_MARK, ChannelAdapter, channel_families, get_channel_adapter, is_depthwise
from .zig.groups import ZIGFamily, ZIGMember, ZIGSet
from .zig.transformers import transformer_families


logger = logging.get_logger(__name__)

__all__ = ["LAYOUT_FORMAT_VERSION", "PrunedAttention", "apply_layout", "current_layout", "prune_zero_groups"]


# ----------------------------------------------------------------------------------------------------------------
# Slicing (shared by prune_zero_groups and apply_layout)
# ----------------------------------------------------------------------------------------------------------------
def _check_not_stale(model: nn.Module, family: ZIGFamily) -> None:
    """Raises if the family no longer describes the model (e.g. it was built before an earlier pruning)."""
    kind = kind_of(family)  # raises for a kind that is not registered
    first = family.members[0]
    size = model.get_parameter(first.param_name).shape[first.dim]
    expected = family.num_groups * kind.group_width(family)
    if size != expected:
        raise ValueError(
            f"Family {family.name!r} expects {expected} entries along dim {first.dim} of {first.param_name!r}, but the "
            f"model has {size}: the ZIGs are stale (the model was pruned or reshaped after `build_zigs`). Call "
            "`build_zigs` again on the current model."
        )


def _family_slices(family: ZIGFamily) -> list[ZIGMember]:
    """Every tensor region a family's groups own: members, dependents and per-channel buffers (BN statistics)."""
    buffers = [ZIGMember(name, 0) for name in family.meta.get("buffers", ())]
    return [*family.members, *family.dependents, *buffers]


def _sync_shape_attributes(module: nn.Module, adapter: ChannelAdapter | None) -> None:
    """Sets the size attributes of a module (`in_features`, `out_channels`, `num_features`, ...) from its weight."""
    weight = module.weight
    role = adapter.role if adapter is not None else None
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif role == "conv" or (role is None and isinstance(module, nn.Conv2d)):
        depthwise = is_depthwise(module)
        module.out_channels = weight.shape[0]
        if depthwise:
            module.groups = module.in_channels = weight.shape[0]
            setattr(module, DEPTHWISE_MARK, True)  # with one channel left, groups == 1 no longer says it
        else:
            module.in_channels = weight.shape[1] * module.groups
    elif role == "norm" or (role is None and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))):
        for attr in adapter.size_attrs if adapter is not None else ("num_features",):
            setattr(module, attr, weight.shape[0])
    elif isinstance(module, nn.PReLU):
        module.num_parameters = weight.numel()


@torch.no_grad()
def _slice_families(model: nn.Module, plan: Sequence[tuple[ZIGFamily, torch.Tensor]]) -> None:
    """Keeps only the groups `kept` (sorted group indices) of every family; the one slicing code path.

    The kept entries of every tensor region are collected first and each tensor is sliced once per dimension, so
    several families may own disjoint regions of one tensor (the input columns of a convolution after a concat).
    """
    keep: dict[tuple[str, int], torch.Tensor] = {}
    updates: list[tuple[ZIGFamily, int]] = []
    for family, kept in plan:
        kind = kind_of(family)
        kept = torch.as_tensor(kept, dtype=torch.long).flatten().sort().values
        if kept.numel() == 0 and kind.min_kept:
            # e.g. a convolution cannot have 0 output channels: keep the first (all-zero: outputs do not change).
            kept = torch.arange(kind.min_kept)
            logger.info(f"Every group of {family.name} is zero; keeping {kind.min_kept} zero {kind.label} (needed).")
        if kept.numel() == family.num_groups:
            continue
        group_keep = torch.zeros(family.num_groups, dtype=torch.bool)
        group_keep[kept] = True
        for member in _family_slices(family):
            size = _tensor(model, member.param_name).shape[member.dim]
            start, length = member.region(size)
            mask = keep.setdefault((member.param_name, member.dim), torch.ones(size, dtype=torch.bool))
            mask[start : start + length] &= group_keep.repeat_interleave(length // family.num_groups)
        updates.append((family, int(kept.numel())))
    touched: dict[str, nn.Module] = {}
    channels_before: dict[str, int] = {}
    for (name, dim), mask in keep.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = getattr(module, attr)
        channels_before.setdefault(module_name, tensor.shape[dim])
        sliced = tensor.data.index_select(dim, mask.nonzero().flatten().to(tensor.device)).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            setattr(module, attr, sliced)
        touched[module_name] = module
    for module_name, module in touched.items():
        adapter = get_channel_adapter(module)
        if getattr(module, "weight", None) is not None:
            _sync_shape_attributes(module, adapter)
        if adapter is not None and adapter.stand_in is not None:
            # e.g. a global response norm that must keep dividing by the dense channel count
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, adapter.stand_in(module, channels_before[module_name]))
    for family, kept_groups in updates:
        kind_of(family).after_slice(model, family, kept_groups)


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def zigs_layout(zigs: ZIGSet) -> OTOLayout:
    """The layout of the model as `zigs` were built on it ([`ZIGSet.layout`]), or, for ZIGs made without
    [`~hf_oto.zig.build_zigs`], read from the model once."""
    layout = getattr(zigs, "layout", None)
    if layout is None:
        layout = read_layout(zigs.model)
        zigs.layout = layout
    return layout


def prune_zero_groups(model: nn.Module, zigs: ZIGSet, *, inplace: bool = True) -> tuple[nn.Module, OTOLayout]:
    """Slices every zero group out of a group-sparse model (OTO section 3.4); the slim model gives the same outputs.

    For every family of `zigs`, the groups whose penalised parameters are all exactly zero are removed from their
    members (q/k/v rows of a head, FFN up/gate rows; conv filters, biases and batch-norm weights of a channel) and
    from their dependents (the matching input columns of the attention output and FFN down projections; of the
    convolutions or linear layers that read a channel) and per-channel buffers (batch-norm statistics). Module sizes
    (`in_features`, `out_channels`, `num_features`, ...) and the attention modules' head counts are updated; an
    attention module left without heads is replaced by a [`PrunedAttention`] stand-in, and a channel family whose
    channels are all zero keeps one zero channel (a convolution needs one). The slim layout is computed from the ZIGs
    and the kept groups and recorded in `model.config.oto_layout` (when the model has a config), which
    [`~hf_oto.modeling.save_pruned_model`] writes to `config.json`.

    Pruning only prunes: to also count parameters and FLOPs before and after, use
    [`~hf_oto.report.prune_and_measure`]. After pruning, `zigs` (and any optimizer built on the old parameters) is
    stale: build new ZIGs with [`build_zigs`] on the slim model to prune it again (a second round is exact).

    Args:
        model (`nn.Module`):
            The group-sparse model (a supported transformers model, any task head, or a convolutional network).
        zigs ([`ZIGSet`]):
            Its zero-invariant groups, from [`build_zigs`]. Zero groups are read from `model`'s current weights.
        inplace (`bool`, *optional*, defaults to `True`):
            Prune `model` itself; with `False`, prune and return a deep copy and leave `model` untouched.

    Returns:
        `tuple[nn.Module, OTOLayout]`: the slim model and its [`~hf_oto.layout.OTOLayout`].

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto import build_zigs
    >>> from hf_oto.pruning import prune_zero_groups

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> zigs = build_zigs(model)
    >>> zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    >>> slim, layout = prune_zero_groups(model.eval(), zigs, inplace=False)
    >>> sum(layout.num_attention_heads) < 8
    True
    ```
    """
    for family in zigs.families:
        _check_not_stale(model, family)
    # Read the zero groups from `model` itself, so ZIGs built on an equal copy work too.
    masks = ZIGSet(model, zigs.families).family_zero_masks()
    layout_before = zigs_layout(zigs)
    if not inplace:
        model = copy.deepcopy(model)
    plan = [(family, torch.nonzero(~masks[family.name]).flatten()) for family in zigs.families]
    _slice_families(model, plan)
    layout = layout_before.kept([(family, kept.numel()) for family, kept in plan])
    if getattr(model, "config", None) is not None:
        model.config.oto_layout = layout.to_dict()
    logger.info(f"Pruned {sum(int(m.sum()) for m in masks.values())} zero groups; layout {layout.summary()}.")
    return model, layout


def current_layout(model: nn.Module) -> dict[str, Any]:
    """The sizes a model computes now, as the `oto_layout` dict: [`~hf_oto.layout.read_layout`]`(model).to_dict()`.

    Kept for code written against earlier versions; prefer `zigs.layout`, the layout [`prune_zero_groups`] returns,
    or [`~hf_oto.layout.model_layout`].

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto.pruning import current_layout

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> current_layout(model)
    {'format_version': 1, 'num_attention_heads': [4, 4], 'intermediate_size': [37, 37]}
    ```
    """
    return read_layout(model).to_dict()


def apply_layout(model: nn.Module, layout: Mapping[str, Any] | OTOLayout) -> nn.Module:
    """Reshapes a freshly built dense model to a recorded `oto_layout`, in place.

    Keeps the first `k` groups of every family (the values do not matter: the pruned checkpoint's weights overwrite
    them when they load). Uses the same slicing code as [`prune_zero_groups`], so the modules, their attributes and the
    state-dict keys and shapes match those of the pruned model.

    Args:
        model (`nn.Module`): A dense model built from the pruned checkpoint's config (e.g. `AutoModel.from_config`).
        layout (`dict` or [`~hf_oto.layout.OTOLayout`]): The `oto_layout` recorded in the config.

    Returns:
        `nn.Module`: the same `model`, reshaped, with `model.config.oto_layout` set.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto.pruning import apply_layout

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> layout = {"format_version": 1, "num_attention_heads": [2, 0], "intermediate_size": [10, 37]}
    >>> apply_layout(model, layout).encoder.layer[0].attention.self.query.out_features
    16
    ```
    """
    target = OTOLayout.from_dict(layout)
    if target.is_transformer:
        families = transformer_families(model) if has_transformer_layout(model) else []
        dense = read_layout(model) if families else OTOLayout(channels={})
    else:
        families, _ = channel_families(model)
        dense = OTOLayout(channels={family.name: family.num_groups for family in families})
    target.validate_against(dense)
    entries = target.entries()
    plan = []
    for family in families:
        kept = kind_of(family).kept_count(family, entries)
        plan.append((family, torch.arange(kept)))
    _slice_families(model, plan)
    if getattr(model, "config", None) is not None:
        model.config.oto_layout = target.to_dict()
    return model
