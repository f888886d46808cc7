"""One-shot pruning (OTO, section 3.4): slice the zero groups out of a group-sparse model.

A zero-invariant group whose penalised parameters are all zero contributes exactly nothing to the model's outputs:
its q/k/v rows produce zero queries, keys and values (an attention head whose values are zero outputs zero whatever
its attention pattern), and its FFN up (and gate) rows produce zero activations. Removing those rows, together with
the columns of the output/down projections that only ever multiply them (the *dependents*), gives a slim model whose
outputs equal the group-sparse full model's.

[`prune_zero_groups`] does the slicing in place (or on a copy), updates the attention modules' head counts, replaces
an attention module that loses all its heads by a [`PrunedAttention`] stand-in, and records the per-layer sizes in
`model.config.oto_layout`. [`apply_layout`] reshapes a freshly built dense model to such a recorded layout through
the same slicing code; [`hf_oto.modeling.load_pruned_model`] uses it to reload pruned checkpoints.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .flops import clamp_flops_seq_length, count_flops, count_parameters
from .zig.build import SUPPORTED_FAMILIES, has_transformer_layout
from .zig.conv import DEPTHWISE_MARK, ChannelAdapter, channel_families, get_channel_adapter, is_depthwise
from .zig.groups import ZIGFamily, ZIGMember, ZIGSet
from .zig.transformers import _join, attention_geometry, base_model_prefix, get_layout, transformer_families


logger = logging.get_logger(__name__)

LAYOUT_FORMAT_VERSION = 1
"""Version of the `config.oto_layout` dict written by [`prune_zero_groups`]."""


# ----------------------------------------------------------------------------------------------------------------
# Stand-in for an attention module without heads
# ----------------------------------------------------------------------------------------------------------------
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
"""Keyword names under which decoder layers pass their KV cache to attention: `cache` (transformers 5),
`past_key_values` (4.5x), `past_key_value` (older)."""

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)

_STAND_IN_CLASSES: dict[type, type] = {}


class PrunedAttention(nn.Module):
    """Stand-in for an attention module whose heads are all pruned.

    The model's own attention cannot run without heads (it reshapes with `-1` over 0 elements), so the module is
    replaced by this one. It registers the original module's children under the same names (the q/k/v projections
    with 0 output rows, and the output projection when it lives inside the attention module), so the state-dict keys
    do not change, and returns exactly what zero heads give:

    - `"context"` (BERT, ViT in transformers 4: the output projection is a sibling): `(zeros[..., 0], weights)`; the
      sibling output projection, with 0 input features, then yields its bias;
    - `"decoder"` (Llama, Mistral, Qwen2, ViT and DistilBERT in transformers 5: the output projection inside, called
      with `hidden_states`): `(o_proj(zeros[..., 0]), weights)`; a KV cache passed as `cache=` (transformers 5) or
      `past_key_values=` (4.x) is updated with one zero key/value head, `[B, 1, T, head_dim]`, so that the layer's
      cache counts the sequence length (a cache of 0 heads reports length 0, and the model reads the position of the
      next token from layer 0's cache);
    - `"distilbert"` (DistilBERT in transformers 4: `out_lin` inside, called with `query=`, ...): `(out,)`, or
      `(out, weights)` with `output_attentions=True`.

    `weights` are the attention weights of zero heads, an empty `[batch, 0, query length, key length]` tensor, so a
    model's `output_attentions` gives one entry per layer in both transformers 4 and 5.

    `PrunedAttention(original, ...)` returns an instance of a subclass of both `PrunedAttention` and the original's
    class (e.g. `PrunedLlamaAttention`), and takes over the original's forward hooks: transformers records
    `output_attentions` with hooks on the modules of the model's attention class (`_can_record_outputs`), and these
    keep seeing the layer. The original's `__init__` is not run; its plain attributes (`config`, `layer_idx`,
    `head_dim`, ...) are copied.

    Args:
        original (`nn.Module`): The attention module being replaced; its children are taken over.
        style (`str`): One of `"context"`, `"decoder"`, `"distilbert"`.
        output (`str`, *optional*): Name of the output projection child (for `"decoder"` and `"distilbert"`).
        head_dim (`int`): Size of one head (for the empty cache entries).
        layer_idx (`int`, *optional*): Index of the layer in the cache.
    """

    STYLES = ("context", "decoder", "distilbert")

    def __new__(cls, original: nn.Module | None = None, *args: Any, **kwargs: Any):
        if cls is PrunedAttention and isinstance(original, nn.Module) and not isinstance(original, PrunedAttention):
            cls = _stand_in_class(type(original))
        return super().__new__(cls)

    def __init__(
        self,
        original: nn.Module,
        style: str,
        *,
        output: str | None = None,
        head_dim: int = 1,
        layer_idx: int | None = None,
    ):
        nn.Module.__init__(self)  # not the original class's __init__: the children are taken over below
        if style not in self.STYLES:
            raise ValueError(f"Unknown PrunedAttention style {style!r}; choose one of {self.STYLES}.")
        if style != "context" and output is None:
            raise ValueError(f"PrunedAttention style {style!r} needs the name of the output projection child.")
        for name, value in vars(original).items():
            if not name.startswith("_") and name != "forward":  # not a forward patched onto the instance
                object.__setattr__(self, name, value)
        self.style = style
        self.output_name = output
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.original_class = type(original).__name__
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in original.named_buffers(recurse=False):
            persistent = name not in getattr(original, "_non_persistent_buffers_set", set())
            self.register_buffer(name, buffer, persistent=persistent)
        for hooks in _HOOK_DICTS:  # e.g. the output-recording hooks transformers 5 installs once per model
            if hasattr(original, hooks):
                getattr(self, hooks).update(getattr(original, hooks))

    def extra_repr(self) -> str:
        return f"style={self.style!r}, replaces={self.original_class}, heads=0"

    def __reduce_ex__(self, protocol: int) -> Any:
        # `Pruned<Original>` is made at run time: pickle (`torch.save(model)`) names the original class instead.
        bases = [base for base in type(self).__bases__ if base is not PrunedAttention]
        if not bases:
            return super().__reduce_ex__(protocol)
        return _new_stand_in, (bases[0],), self.__dict__

    def _empty_heads(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], 0)

    @staticmethod
    def _empty_weights(query: torch.Tensor, key_length: int) -> torch.Tensor:
        """The attention weights of zero heads: `[batch, 0, query length, key length]`."""
        return query.new_zeros(query.shape[0], 0, query.shape[-2], key_length)

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        if self.style == "distilbert":
            query = kwargs["query"] if "query" in kwargs else args[0]
            key = kwargs["key"] if "key" in kwargs else (args[1] if len(args) > 1 else query)
            out = self.get_submodule(self.output_name)(self._empty_heads(query))
            if kwargs.get("output_attentions", False):
                return out, self._empty_weights(query, key.shape[-2])
            return (out,)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.style == "context":
            context = kwargs.get("encoder_hidden_states")
            key_length = (context if context is not None else hidden).shape[-2]
            return self._empty_heads(hidden), self._empty_weights(hidden, key_length)
        key_length = hidden.shape[-2]
        cache = next((kwargs[name] for name in _CACHE_KWARGS if kwargs.get(name) is not None), None)
        if cache is not None and self.layer_idx is not None:
            # One zero key/value head, not zero heads: a cache layer of 0 elements reports a length of 0, and
            # `cache.get_seq_length()` (layer 0) gives the position of the next token.
            batch, length = hidden.shape[0], hidden.shape[-2]
            placeholder = hidden.new_zeros(batch, 1, length, self.head_dim)
            keys, _ = cache.update(
                placeholder, placeholder, self.layer_idx, {"cache_position": kwargs.get("cache_position")}
            )
            key_length = keys.shape[-2]
        out = self.get_submodule(self.output_name)(self._empty_heads(hidden))
        return out, self._empty_weights(hidden, key_length)


def _new_stand_in(original_class: type) -> PrunedAttention:
    """An empty `Pruned<Original>` for unpickling; `nn.Module.__setstate__` then restores its state."""
    return nn.Module.__new__(_stand_in_class(original_class))


def _stand_in_class(original_class: type) -> type:
    """`Pruned<Original>`: a subclass of [`PrunedAttention`] and of `original_class` (one per class)."""
    if original_class not in _STAND_IN_CLASSES:
        _STAND_IN_CLASSES[original_class] = type(
            f"Pruned{original_class.__name__}",
            (PrunedAttention, original_class),
            {"__module__": __name__},
        )
    return _STAND_IN_CLASSES[original_class]


def _stand_in_style(attention: nn.Module, output_inside: bool) -> str:
    if not output_inside:
        return "context"
    parameters = list(inspect.signature(attention.forward).parameters)
    return "distilbert" if parameters[:1] == ["query"] else "decoder"


# ----------------------------------------------------------------------------------------------------------------
# Layout (per-layer sizes) of a model
# ----------------------------------------------------------------------------------------------------------------
def _layers(model: nn.Module) -> nn.ModuleList:
    layout = get_layout(model)
    layers = model.get_submodule(_join(base_model_prefix(model), layout.layers))
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"Expected the layers of {type(model).__name__} at {layout.layers!r}, found none.")
    return layers


def current_layout(model: nn.Module) -> dict[str, Any]:
    """The sizes a model computes now: per-layer query heads, key/value heads (GQA models) and FFN rows of a
    supported transformer, or the channels of every channel family of a convolutional network.

    Read from the modules themselves (the q/k and FFN up projections; the traced graph of a CNN), so it is right for
    dense, pruned and reloaded models alike.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto.pruning import current_layout

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> current_layout(model)
    {'format_version': 1, 'num_attention_heads': [4, 4], 'intermediate_size': [37, 37]}
    ```
    """
    if not has_transformer_layout(model):
        families, _ = channel_families(model)
        return {"format_version": LAYOUT_FORMAT_VERSION, "channels": {f.name: f.num_groups for f in families}}
    layout = get_layout(model)
    layers_path = _join(base_model_prefix(model), layout.layers)
    heads, kv_heads, ffn = [], [], []
    for index, layer in enumerate(_layers(model)):
        geometry = attention_geometry(model, _join(layers_path, str(index)), layout)
        heads.append(geometry.num_heads)
        kv_heads.append(geometry.num_kv_heads)
        ffn.append(layer.get_submodule(layout.up).out_features)
    result: dict[str, Any] = {"format_version": LAYOUT_FORMAT_VERSION, "num_attention_heads": heads}
    if layout.num_kv_heads_config is not None:
        result["num_key_value_heads"] = kv_heads
    result["intermediate_size"] = ffn
    return result


# ----------------------------------------------------------------------------------------------------------------
# Slicing (shared by prune_zero_groups and apply_layout)
# ----------------------------------------------------------------------------------------------------------------
def _check_not_stale(model: nn.Module, family: ZIGFamily) -> None:
    """Raises if the family no longer describes the model (e.g. it was built before an earlier pruning)."""
    if family.kind not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"prune_zero_groups slices families of kinds {list(SUPPORTED_FAMILIES)}; family {family.name!r} is of "
            f"kind {family.kind!r}."
        )
    first = family.members[0]
    size = model.get_parameter(first.param_name).shape[first.dim]
    expected = family.num_groups
    if family.kind == "heads":
        expected *= family.meta["head_dim"] * family.meta["queries_per_group"]
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
    head_updates: list[tuple[ZIGFamily, int]] = []
    for family, kept in plan:
        kept = torch.as_tensor(kept, dtype=torch.long).flatten().sort().values
        if family.kind == "channels" and kept.numel() == 0:
            # A convolution cannot have 0 output channels: keep one (all-zero, so outputs do not change).
            kept = torch.zeros(1, dtype=torch.long)
            logger.info(f"Every channel of {family.name} is zero; keeping one zero channel (a conv needs one).")
        if kept.numel() == family.num_groups:
            continue
        group_keep = torch.zeros(family.num_groups, dtype=torch.bool)
        group_keep[kept] = True
        for member in _family_slices(family):
            size = _tensor(model, member.param_name).shape[member.dim]
            start, length = member.region(size)
            mask = keep.setdefault((member.param_name, member.dim), torch.ones(size, dtype=torch.bool))
            mask[start : start + length] &= group_keep.repeat_interleave(length // family.num_groups)
        if family.kind == "heads":
            head_updates.append((family, int(kept.numel())))
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
    for family, kept_groups in head_updates:
        _update_attention(model, family, kept_groups)


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def _update_attention(model: nn.Module, family: ZIGFamily, kept_groups: int) -> None:
    meta = family.meta
    heads = kept_groups * meta["queries_per_group"]
    attention_path = meta["attention"]
    attention = model.get_submodule(attention_path)
    for attr in meta.get("head_count_attrs", ()):
        setattr(attention, attr, heads)
    for attr in meta.get("head_width_attrs", ()):
        setattr(attention, attr, heads * meta["head_dim"])
    if kept_groups > 0 or isinstance(attention, PrunedAttention):
        return
    output_inside = meta["output_inside_attention"]
    output = meta["output"][len(attention_path) + 1 :] if output_inside else None
    stand_in = PrunedAttention(
        attention,
        _stand_in_style(attention, output_inside),
        output=output,
        head_dim=meta["head_dim"],
        layer_idx=getattr(attention, "layer_idx", family.layer),
    )
    parent_name, _, child = attention_path.rpartition(".")
    setattr(model.get_submodule(parent_name), child, stand_in)
    logger.info(f"All heads of {attention_path} are pruned; replaced it by a PrunedAttention stand-in.")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PruningReport:
    """What [`prune_zero_groups`] removed.

    Per-layer lists have one entry per transformer layer; `num_key_value_heads_*` is `None` for models without
    grouped-query attention. For convolutional networks, `channels_before`/`channels_after` map every pruned channel
    family (named after the module that produces it) to its channel count, and the per-layer lists are empty.
    """

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    seq_length: int
    num_attention_heads_before: list[int] = field(default_factory=list)
    num_attention_heads_after: list[int] = field(default_factory=list)
    intermediate_size_before: list[int] = field(default_factory=list)
    intermediate_size_after: list[int] = field(default_factory=list)
    num_key_value_heads_before: list[int] | None = None
    num_key_value_heads_after: list[int] | None = None
    channels_before: dict[str, int] | None = None
    channels_after: dict[str, int] | None = None

    @property
    def params_ratio(self) -> float:
        """Remaining share of the parameters."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def flops_ratio(self) -> float:
        """Remaining share of the forward FLOPs."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields and the two ratios."""
        result = asdict(self)
        result["params_ratio"] = self.params_ratio
        result["flops_ratio"] = self.flops_ratio
        return result

    def __str__(self) -> str:
        if self.channels_before is not None:
            width = max([len(name) for name in self.channels_before] + [6])
            lines = [f"{'family':<{width}} {'channels':>15}"]
            for name, before in self.channels_before.items():
                lines.append(f"{name:<{width}} {before:>6} -> {self.channels_after[name]:<6}")
            lines.append(self._totals_line())
            return "\n".join(lines)
        gqa = self.num_key_value_heads_before is not None
        header = f"{'layer':>5} {'heads':>11}" + (f" {'kv heads':>11}" if gqa else "") + f" {'ffn rows':>13}"
        lines = [header]
        for i, (h0, h1, f0, f1) in enumerate(
            zip(
                self.num_attention_heads_before,
                self.num_attention_heads_after,
                self.intermediate_size_before,
                self.intermediate_size_after,
            )
        ):
            kv = f" {self.num_key_value_heads_before[i]:>4} -> {self.num_key_value_heads_after[i]:<3}" if gqa else ""
            lines.append(f"{i:>5} {h0:>4} -> {h1:<3}{kv} {f0:>6} -> {f1:<5}")
        lines.append(self._totals_line())
        return "\n".join(lines)

    def architecture(self) -> str:
        """The kept channels of every channel family in graph order, like the "Architecture" column of the paper's
        tables (e.g. `"22-56-M-..."` without the pooling marks): `"22-56-98-..."`. Empty for transformers."""
        return "-".join(str(count) for count in (self.channels_after or {}).values())

    def _totals_line(self) -> str:
        where = "on the example inputs" if self.channels_before is not None else f"at seq_length={self.seq_length}"
        return (
            f"params: {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.1%}); "
            f"FLOPs {where}: {self.flops_before:,} -> {self.flops_after:,} ({self.flops_ratio:.1%})"
        )


def prune_zero_groups(
    model: nn.Module,
    zigs: ZIGSet,
    *,
    seq_length: int = 128,
    inplace: bool = True,
    flops_inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, PruningReport]:
    """Slices every zero group out of a group-sparse model (OTO section 3.4); the slim model gives the same outputs.

    For every family of `zigs`, the groups whose penalised parameters are all exactly zero are removed from their
    members (q/k/v rows of a head, FFN up/gate rows; conv filters, biases and batch-norm weights of a channel) and
    from their dependents (the matching input columns of the attention output and FFN down projections; of the
    convolutions or linear layers that read a channel) and per-channel buffers (batch-norm statistics). Module sizes
    (`in_features`, `out_channels`, `num_features`, ...) and the attention modules' head counts are updated; an
    attention module left without heads is replaced by a [`PrunedAttention`] stand-in, and a channel family whose
    channels are all zero keeps one zero channel (a convolution needs one). The sizes are recorded in
    `model.config.oto_layout` (when the model has a config), which [`~hf_oto.modeling.save_pruned_model`] writes to
    `config.json`.

    After pruning, `zigs` (and any optimizer built on the old parameters) is stale: the model holds new parameter
    tensors of new shapes. Build new ZIGs with [`build_zigs`] on the slim model to prune it again (it reads the heads
    from the modules, so a second round is exact).

    Args:
        model (`nn.Module`):
            The group-sparse model (a supported transformers model, any task head).
        zigs ([`ZIGSet`]):
            Its zero-invariant groups, from [`build_zigs`]. Zero groups are read from `model`'s current weights.
        seq_length (`int`, *optional*, defaults to 128):
            Sequence length (batch 1) of the dummy forward used to count FLOPs before and after; clamped to
            `config.max_position_embeddings` (the report's `seq_length` is the length used).
        inplace (`bool`, *optional*, defaults to `True`):
            Prune `model` itself; with `False`, prune and return a deep copy and leave `model` untouched.
        flops_inputs (`dict[str, torch.Tensor]`, *optional*):
            Keyword inputs of the forward used to count FLOPs, instead of the dummy ones (needed for a plain
            `nn.Module` whose input is not a `[1, C, H, W]` image at 32 x 32).

    Returns:
        `tuple[nn.Module, PruningReport]`: the slim model and a [`PruningReport`].

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto import build_zigs
    >>> from hf_oto.pruning import prune_zero_groups

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> zigs = build_zigs(model)
    >>> zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    >>> slim, report = prune_zero_groups(model.eval(), zigs, seq_length=16, inplace=False)
    >>> print(report)  # doctest: +SKIP
    ```
    """
    for family in zigs.families:
        _check_not_stale(model, family)
    # Read the zero groups from `model` itself, so ZIGs built on an equal copy work too.
    masks = ZIGSet(model, zigs.families).family_zero_masks()
    channels = any(family.kind == "channels" for family in zigs.families)
    flops_inputs = flops_inputs if flops_inputs is not None or not channels else _image_inputs(model)
    if flops_inputs is None:
        seq_length = clamp_flops_seq_length(model, seq_length)
    params_before = count_parameters(model)
    flops_before = count_flops(model, seq_length=seq_length, inputs=flops_inputs)
    layout_before = _zigs_layout(zigs) if channels else current_layout(model)
    if not inplace:
        model = copy.deepcopy(model)
    plan = [(family, torch.nonzero(~masks[family.name]).flatten()) for family in zigs.families]
    _slice_families(model, plan)
    layout_after = _zigs_layout(zigs, sliced=plan) if channels else current_layout(model)
    if getattr(model, "config", None) is not None:
        model.config.oto_layout = current_layout(model) if channels else layout_after
    report = PruningReport(
        params_before=params_before,
        params_after=count_parameters(model),
        flops_before=flops_before,
        flops_after=count_flops(model, seq_length=seq_length, inputs=flops_inputs),
        seq_length=seq_length,
        num_attention_heads_before=layout_before.get("num_attention_heads", []),
        num_attention_heads_after=layout_after.get("num_attention_heads", []),
        intermediate_size_before=layout_before.get("intermediate_size", []),
        intermediate_size_after=layout_after.get("intermediate_size", []),
        num_key_value_heads_before=layout_before.get("num_key_value_heads"),
        num_key_value_heads_after=layout_after.get("num_key_value_heads"),
        channels_before=layout_before.get("channels"),
        channels_after=layout_after.get("channels"),
    )
    logger.info(f"Pruned {sum(int(m.sum()) for m in masks.values())} zero groups.\n{report}")
    return model, report


def _zigs_layout(zigs: ZIGSet, sliced: Sequence[tuple[ZIGFamily, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Channel counts of the families of `zigs`: as built, or (with `sliced`) as kept by [`_slice_families`]."""
    if sliced is None:
        return {"channels": {family.name: family.num_groups for family in zigs.families}}
    return {"channels": {family.name: max(int(kept.numel()), 1) for family, kept in sliced}}


def _image_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Dummy image inputs for counting FLOPs of a CNN without a `main_input_name` (a plain `nn.Module`)."""
    if getattr(model, "main_input_name", None):
        return None
    from .zig.conv import _main_input_name, default_example_inputs

    return {_main_input_name(model): default_example_inputs(model)}


def _validate_layout(layout: Mapping[str, Any], num_layers: int, dense: Mapping[str, Any]) -> None:
    if not isinstance(layout, Mapping):
        raise ValueError(f"oto_layout must be a dict; got {type(layout).__name__}.")
    version = layout.get("format_version")
    if version != LAYOUT_FORMAT_VERSION:
        raise ValueError(
            f"oto_layout has format_version={version!r}; this hf_oto reads version {LAYOUT_FORMAT_VERSION}. Upgrade "
            "hf_oto to load this checkpoint."
        )
    for key in ("num_attention_heads", "intermediate_size", "num_key_value_heads"):
        if key not in dense:
            continue
        values = layout.get(key)
        if key == "num_key_value_heads" and values is None:
            continue
        if not isinstance(values, Sequence) or len(values) != num_layers:
            raise ValueError(
                f"oto_layout[{key!r}] must list one size per layer ({num_layers} layers); got {values!r}."
            )
        for i, (value, full) in enumerate(zip(values, dense[key])):
            if not isinstance(value, int) or not 0 <= value <= full:
                raise ValueError(f"oto_layout[{key!r}][{i}] = {value!r} is not an integer in [0, {full}].")


def apply_layout(model: nn.Module, layout: Mapping[str, Any]) -> nn.Module:
    """Reshapes a freshly built dense model to a recorded `oto_layout`, in place.

    Keeps the first `k` groups of every head and FFN family (the values do not matter: the pruned checkpoint's
    weights overwrite them when they load). Uses the same slicing code as [`prune_zero_groups`], so the modules, their
    attributes and the state-dict keys and shapes match those of the pruned model.

    Args:
        model (`nn.Module`): A dense model built from the pruned checkpoint's config (e.g. `AutoModel.from_config`).
        layout (`dict`): The `oto_layout` recorded in the config by [`prune_zero_groups`].

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
    if isinstance(layout, Mapping) and "channels" in layout:
        return _apply_channel_layout(model, layout)
    dense = current_layout(model)
    if "channels" in dense:
        raise ValueError(
            f"oto_layout {dict(layout) if isinstance(layout, Mapping) else layout!r} records transformer heads/FFN "
            f"sizes, but {type(model).__name__} is a convolutional network (channel families): the config and the "
            "model do not match."
        )
    families = transformer_families(model)
    num_layers = len(dense["num_attention_heads"])
    _validate_layout(layout, num_layers, dense)
    plan = []
    for family in families:
        if family.kind == "heads":
            qpg = family.meta["queries_per_group"]
            if "num_key_value_heads" in dense and layout.get("num_key_value_heads") is not None:
                kept = layout["num_key_value_heads"][family.layer]
                if layout["num_attention_heads"][family.layer] != kept * qpg:
                    raise ValueError(
                        f"oto_layout of layer {family.layer}: {layout['num_attention_heads'][family.layer]} query "
                        f"heads do not match {kept} key/value heads x {qpg} query heads per group."
                    )
            else:
                heads = layout["num_attention_heads"][family.layer]
                if heads % qpg:
                    raise ValueError(
                        f"oto_layout of layer {family.layer}: {heads} query heads is not a multiple of the {qpg} "
                        "query heads per key/value head."
                    )
                kept = heads // qpg
        else:
            kept = layout["intermediate_size"][family.layer]
        plan.append((family, torch.arange(kept)))
    _slice_families(model, plan)
    model.config.oto_layout = current_layout(model)
    return model


def _apply_channel_layout(model: nn.Module, layout: Mapping[str, Any]) -> nn.Module:
    """[`apply_layout`] for convolutional networks: keeps the first `k` channels of every recorded channel family."""
    version = layout.get("format_version")
    if version != LAYOUT_FORMAT_VERSION:
        raise ValueError(
            f"oto_layout has format_version={version!r}; this hf_oto reads version {LAYOUT_FORMAT_VERSION}. Upgrade "
            "hf_oto to load this checkpoint."
        )
    recorded = layout["channels"]
    if not isinstance(recorded, Mapping):
        raise ValueError(f"oto_layout['channels'] must map channel family names to counts; got {recorded!r}.")
    families, _ = channel_families(model)
    by_name = {family.name: family for family in families}
    missing, unknown = sorted(set(by_name) - set(recorded)), sorted(set(recorded) - set(by_name))
    if missing or unknown:
        raise ValueError(
            f"oto_layout['channels'] does not match the channel families of {type(model).__name__}: the model has "
            f"{missing} that the layout lacks and the layout names {unknown} that the model lacks. The config and "
            "the architecture come from different models (or a different hf_oto version traced them)."
        )
    plan = []
    for name, count in recorded.items():
        family = by_name[name]
        if not isinstance(count, int) or not 1 <= count <= family.num_groups:
            raise ValueError(
                f"oto_layout['channels'][{name!r}] = {count!r} is not an integer in [1, {family.num_groups}]."
            )
        plan.append((family, torch.arange(count)))
    _slice_families(model, plan)
    if getattr(model, "config", None) is not None:
        model.config.oto_layout = {"format_version": LAYOUT_FORMAT_VERSION, "channels": dict(recorded)}
    return model
