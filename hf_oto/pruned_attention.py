"""[`PrunedAttention`]: the stand-in for an attention module whose heads are all pruned, and
[`update_attention`], which sets an attention module's head counts after its heads are sliced."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import logging


if TYPE_CHECKING:
    from .zig.groups import ZIGFamily


logger = logging.get_logger(__name__)

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


def update_attention(model: nn.Module, family: ZIGFamily, kept_groups: int) -> None:
    """Sets the head count (and width) attributes of the attention module of a head family that keeps `kept_groups`
    groups; an attention module left without heads is replaced by a [`PrunedAttention`] stand-in."""
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
