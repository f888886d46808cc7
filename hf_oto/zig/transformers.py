"""Zero-invariant groups of transformer models: attention heads and FFN rows, driven by a `model_type` table.

Adding an architecture is one row of [`TRANSFORMER_LAYOUTS`]: where its layers are, the names of the q/k/v/output
projections and of the FFN projections inside one layer, and the attention attributes that hold the head count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from .groups import ZIGFamily, ZIGMember


logger = logging.get_logger(__name__)

TRANSFORMER_FAMILIES = ("heads", "ffn")
"""Kinds of groups a transformer layout defines."""


@dataclass(frozen=True)
class TransformerLayout:
    """Where the prunable pieces of one transformer architecture live.

    Module paths are relative to one layer (`<base model>.<layers>.<i>`), except `layers`, which is relative to the
    base model (`model.base_model`).

    Args:
        layers (`str`): Path of the `nn.ModuleList` of layers.
        attention (`str`): The module that computes the heads; replaced by a stand-in when a layer loses them all.
        query, key, value (`str`): The q/k/v projections (`nn.Linear`, heads along the output dimension).
        output (`str`): The attention output projection (heads along its input dimension).
        up (`str`): The FFN up projection (rows along its output dimension).
        down (`str`): The FFN down projection (rows along its input dimension).
        gate (`str`, *optional*): The gate projection of gated FFNs.
        num_heads_config (`str`): Config attribute with the number of query heads.
        num_kv_heads_config (`str`, *optional*): Config attribute with the number of key/value heads (GQA).
        head_count_attrs (`tuple[str, ...]`): Attributes of `attention` that hold its number of query heads.
        head_width_attrs (`tuple[str, ...]`): Attributes of `attention` that hold query heads x head size.
    """

    layers: str
    attention: str
    query: str
    key: str
    value: str
    output: str
    up: str
    down: str
    gate: str | None = None
    num_heads_config: str = "num_attention_heads"
    num_kv_heads_config: str | None = None
    head_count_attrs: tuple[str, ...] = ()
    head_width_attrs: tuple[str, ...] = ()

    @property
    def output_inside_attention(self) -> bool:
        """Whether the output projection is a child of `attention` (Llama) rather than a sibling (BERT)."""
        return self.output.startswith(self.attention + ".")


_BERT_LIKE = TransformerLayout(
    layers="encoder.layer",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    output="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
    head_count_attrs=("num_attention_heads",),
    head_width_attrs=("all_head_size",),
)

_LLAMA_LIKE = TransformerLayout(
    layers="layers",
    attention="self_attn",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    output="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    num_kv_heads_config="num_key_value_heads",
)

TRANSFORMER_LAYOUTS: dict[str, TransformerLayout | tuple[TransformerLayout, ...]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    # transformers 4.x (`encoder.layer.N.attention.attention.query`) and 5.x (`layers.N.attention.q_proj`, the
    # output projection inside the attention module, `mlp.fc1/fc2`): the first alternative the model has is used.
    "vit": (
        TransformerLayout(
            layers="encoder.layer",
            attention="attention.attention",
            query="attention.attention.query",
            key="attention.attention.key",
            value="attention.attention.value",
            output="attention.output.dense",
            up="intermediate.dense",
            down="output.dense",
            head_count_attrs=("num_attention_heads",),
            head_width_attrs=("all_head_size",),
        ),
        TransformerLayout(
            layers="layers",
            attention="attention",
            query="attention.q_proj",
            key="attention.k_proj",
            value="attention.v_proj",
            output="attention.o_proj",
            up="mlp.fc1",
            down="mlp.fc2",
            head_count_attrs=("num_attention_heads",),
        ),
    ),
    "distilbert": TransformerLayout(
        layers="transformer.layer",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        output="attention.out_lin",
        up="ffn.lin1",
        down="ffn.lin2",
        num_heads_config="n_heads",
        head_count_attrs=("n_heads",),
        head_width_attrs=("dim",),
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}
"""`config.model_type` → where the heads and FFN rows are. Add a row to support a new architecture.

A row may be a tuple of alternatives when transformers versions name the modules differently (ViT in transformers 4.x
and 5.x): [`get_layout`] picks the first one whose layer list and projections the model has."""


def layout_alternatives(model_type: str | None) -> tuple[TransformerLayout, ...]:
    """The [`TransformerLayout`] alternatives of a `model_type` (empty if it has no row)."""
    row = TRANSFORMER_LAYOUTS.get(model_type)
    if row is None:
        return ()
    return row if isinstance(row, tuple) else (row,)


def _matches(model: nn.Module, layout: TransformerLayout) -> bool:
    """Whether `model` has the layer list of `layout` and, in its first layer, the q/k/v/output/FFN projections."""
    try:
        layers = model.get_submodule(_join(base_model_prefix(model), layout.layers))
    except AttributeError:
        return False
    if not isinstance(layers, nn.ModuleList):
        return False
    if len(layers) == 0:
        return True
    roles = ("query", "key", "value", "output", "up", "down", "gate")
    paths = [getattr(layout, role) for role in roles if getattr(layout, role) is not None]
    try:
        return all(isinstance(layers[0].get_submodule(path), nn.Linear) for path in paths)
    except AttributeError:
        return False


def get_layout(model: nn.Module) -> TransformerLayout:
    """Returns the [`TransformerLayout`] of `model`, or raises a `ValueError` that lists the supported types.

    When the row of its `model_type` has alternatives, the first one that matches the model's modules is returned;
    if none does, the first one (whose module paths then name what is missing in the errors that follow).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    alternatives = layout_alternatives(model_type)
    if not alternatives:
        supported = ", ".join(sorted(TRANSFORMER_LAYOUTS))
        raise ValueError(
            f"hf_oto has no zero-invariant group layout for model_type={model_type!r} ({type(model).__name__}). "
            f"Supported model types: {supported}. To add one, add a `TransformerLayout` row for it to "
            "`hf_oto.zig.transformers.TRANSFORMER_LAYOUTS` naming its layer list and its q/k/v/output and FFN "
            "projection modules."
        )
    if len(alternatives) > 1:
        for layout in alternatives:
            if _matches(model, layout):
                return layout
    return alternatives[0]


def base_model_prefix(model: nn.Module) -> str:
    """The path of `model.base_model` inside `model` (`"bert"` for `BertForQuestionAnswering`, `""` for `BertModel`)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return ""


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _linear(model: nn.Module, path: str, model_type: str) -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        found = "missing" if module is None else f"a {type(module).__name__}"
        raise ValueError(
            f"Expected an nn.Linear at {path!r} (the hf_oto layout of model_type={model_type!r}), but it is {found}. "
            "The model's modules do not match the layout table, e.g. because it runs custom code: add a "
            "`TransformerLayout` row that matches its module names to `hf_oto.zig.transformers.TRANSFORMER_LAYOUTS`."
        )
    return module


def _members(path: str, linear: nn.Linear, dim: int) -> list[ZIGMember]:
    members = [ZIGMember(f"{path}.weight", dim)]
    if linear.bias is not None and dim == 0:
        members.append(ZIGMember(f"{path}.bias", 0))
    return members


HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size")
"""Attributes of an attention module that hold the size of one head (Llama-like, BERT-like and DistilBERT)."""


@dataclass(frozen=True)
class AttentionGeometry:
    """The heads one layer computes now, read from its modules (so it is right for dense, pruned and reloaded models).

    Args:
        num_heads (`int`): Query heads (`query.out_features // head_dim`).
        num_kv_heads (`int`): Key/value heads (`key.out_features // head_dim`; `num_heads` without GQA).
        head_dim (`int`): Size of one head.
        queries_per_group (`int`): Query heads that share one key/value head (1 without GQA).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    queries_per_group: int


def _config_head_sizes(config: Any, layout: TransformerLayout) -> tuple[int, int]:
    """(head size, query heads per key/value head) of the dense architecture, from the config."""
    num_heads = getattr(config, layout.num_heads_config)
    num_kv_heads = getattr(config, layout.num_kv_heads_config, None) if layout.num_kv_heads_config else None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return head_dim, num_heads // (num_kv_heads or num_heads)


def _int_attr(module: nn.Module, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def attention_geometry(
    model: nn.Module, layer_path: str, layout: TransformerLayout | None = None
) -> AttentionGeometry:
    """The [`AttentionGeometry`] of the layer at `layer_path`, read from its modules and checked against them.

    The head size and the number of query heads per key/value head come from the attention module's own attributes
    (`head_dim` or `attention_head_size`, `num_key_value_groups`) when it has them, else from the config (which an
    earlier pruning does not change); the head counts come from the projections' sizes. A model whose modules
    disagree with each other (q/k/v sizes that are not whole heads, an attention module whose head count attributes
    do not match its projections) raises a `ValueError` instead of giving wrong groups.
    """
    layout = layout or get_layout(model)
    model_type = model.config.model_type
    attention = model.get_submodule(_join(layer_path, layout.attention))
    query = _linear(model, _join(layer_path, layout.query), model_type)
    key = _linear(model, _join(layer_path, layout.key), model_type)
    value = _linear(model, _join(layer_path, layout.value), model_type)
    config_head_dim, config_queries_per_group = _config_head_sizes(model.config, layout)
    head_dim = _int_attr(attention, HEAD_SIZE_ATTRS) or config_head_dim
    queries_per_group = _int_attr(attention, ("num_key_value_groups",)) or config_queries_per_group
    num_heads, rest = divmod(query.out_features, head_dim)
    num_kv_heads = key.out_features // head_dim
    problem = None
    if rest or num_heads != num_kv_heads * queries_per_group:
        problem = (
            f"its query projection has {query.out_features} outputs, which is not {queries_per_group} query heads per "
            f"key/value head x {num_kv_heads} key/value heads ({key.out_features} key outputs) x {head_dim} per head"
        )
    elif key.out_features != num_kv_heads * head_dim or value.out_features != key.out_features:
        problem = (
            f"its key/value projections have {key.out_features}/{value.out_features} outputs, not {num_kv_heads} "
            f"heads x {head_dim}"
        )
    else:
        for attr, expected in (
            *((attr, num_heads) for attr in layout.head_count_attrs),
            *((attr, num_heads * head_dim) for attr in layout.head_width_attrs),
        ):
            found = getattr(attention, attr, None)
            if found is not None and found != expected:
                problem = (
                    f"its attention module says {attr}={found}, but its projections compute {num_heads} heads of "
                    f"{head_dim} ({attr} should be {expected})"
                )
                break
    if problem is not None:
        raise ValueError(
            f"Layer {layer_path!r} of {type(model).__name__} does not match itself: {problem}. hf_oto reads the "
            "heads from the modules, so their sizes and attributes must agree: was the model edited or pruned by other "
            "code? Load checkpoints pruned by hf_oto with `hf_oto.load_pruned_model`."
        )
    return AttentionGeometry(num_heads, num_kv_heads, head_dim, queries_per_group)


def model_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a model of a supported type, where its layout row says it is.

    Raises:
        `ValueError` when the model has no `nn.ModuleList` there (custom code, or modules that do not match the row).
    """
    layout = get_layout(model)
    layers_path = _join(base_model_prefix(model), layout.layers)
    try:
        layers = model.get_submodule(layers_path)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"Expected the list of layers at {layers_path!r} (the hf_oto layout of "
            f"model_type={model.config.model_type!r}), but it is missing. The model's modules do not match the layout "
            "table, e.g. because it runs custom code."
        )
    return layers


def transformer_families(model: PreTrainedModel, families: Sequence[str] = TRANSFORMER_FAMILIES) -> list[ZIGFamily]:
    """The head and FFN-row families of every layer of a supported transformer model.

    Head counts and sizes are read from each layer's modules ([`attention_geometry`]), not from the config, so an
    already pruned model (fewer heads than its config says, different per layer) gets whole-head groups and can be
    pruned again. A layer left without heads (or FFN rows) has no family of that kind.
    """
    layout = get_layout(model)
    model_type = model.config.model_type
    layers_path = _join(base_model_prefix(model), layout.layers)
    layers = model_layers(model)

    result: list[ZIGFamily] = []
    for index in range(len(layers)):
        layer_path = _join(layers_path, str(index))
        path = {
            role: _join(layer_path, getattr(layout, role))
            for role in ("attention", "query", "key", "value", "output", "up", "down", "gate")
            if getattr(layout, role) is not None
        }
        if "heads" in families:
            query = _linear(model, path["query"], model_type)
            key = _linear(model, path["key"], model_type)
            value = _linear(model, path["value"], model_type)
            _linear(model, path["output"], model_type)
            geometry = attention_geometry(model, layer_path, layout)
            head_dim, queries_per_group = geometry.head_dim, geometry.queries_per_group
        if "heads" in families and geometry.num_kv_heads > 0:
            result.append(
                ZIGFamily(
                    name=f"{layer_path}.heads",
                    kind="heads",
                    num_groups=geometry.num_kv_heads,
                    members=tuple(
                        _members(path["query"], query, 0)
                        + _members(path["key"], key, 0)
                        + _members(path["value"], value, 0)
                    ),
                    dependents=(ZIGMember(f"{path['output']}.weight", 1),),
                    layer=index,
                    module=layer_path,
                    meta={
                        "head_dim": head_dim,
                        "queries_per_group": queries_per_group,
                        "attention": path["attention"],
                        "output": path["output"],
                        "output_inside_attention": layout.output_inside_attention,
                        "head_count_attrs": layout.head_count_attrs,
                        "head_width_attrs": layout.head_width_attrs,
                    },
                )
            )
        if "ffn" in families:
            up = _linear(model, path["up"], model_type)
            _linear(model, path["down"], model_type)
        if "ffn" in families and up.out_features > 0:
            members = _members(path["up"], up, 0)
            if "gate" in path:
                members += _members(path["gate"], _linear(model, path["gate"], model_type), 0)
            result.append(
                ZIGFamily(
                    name=f"{layer_path}.ffn",
                    kind="ffn",
                    num_groups=up.out_features,
                    members=tuple(members),
                    dependents=(ZIGMember(f"{path['down']}.weight", 1),),
                    layer=index,
                    module=layer_path,
                    meta={},
                )
            )
    return result
