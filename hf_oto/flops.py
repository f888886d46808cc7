"""Parameter and FLOPs counts of a model, measured on one dummy forward pass.

FLOPs are forward floating-point operations counted as 2 x multiply-accumulates (MACs) of the matrix products that
dominate a transformer or a CNN:

- every `nn.Linear` call: `2 x (input rows) x in_features x out_features`, from the shapes it actually sees;
- every `nn.Conv2d` call: `2 x (output elements) x (in_channels / groups) x kernel height x kernel width`;
- the attention products of every layer of a model with a [`~hf_oto.zig.transformers.TransformerLayout`]: the
  scores `Q K^T` and the context `softmax(.) V`, `4 x B x T x T x (query width)` together, where the query width is
  the number of query heads x head size the layer actually computes (0 for a layer whose heads are all pruned).

Biases, normalisations, activations, softmax and embeddings lookups are not counted; they are a small share of the
total and do not change with pruning in a way that matters for comparisons.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of `model`, counting tied (shared) parameters once.

    Args:
        model (`nn.Module`): Any PyTorch module.
        trainable_only (`bool`, *optional*, defaults to `False`): Count only parameters with `requires_grad`.

    Returns:
        `int`: the number of scalar parameters.

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_oto.flops import count_parameters

    >>> count_parameters(nn.Linear(4, 3))
    15
    ```
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _query_modules(model: nn.Module) -> Iterator[nn.Linear]:
    """The query projections of every layer of a supported transformer, or nothing for other models."""
    from .zig.transformers import TRANSFORMER_LAYOUTS, get_layout, model_layers

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TRANSFORMER_LAYOUTS:
        logger.info(
            f"No transformer layout for model_type={model_type!r}: counting nn.Linear / nn.Conv2d FLOPs only, "
            "without attention score/context products."
        )
        return
    layout = get_layout(model)
    try:
        layers = model_layers(model)
    except ValueError:  # modules that do not match the layout row: count the linear products only
        return
    for layer in layers:
        try:
            query = layer.get_submodule(layout.query)
        except AttributeError:
            continue
        if isinstance(query, nn.Linear):
            yield query


def clamp_flops_seq_length(model: nn.Module, seq_length: int) -> int:
    """The token length at which to count a model's FLOPs: `seq_length`, at most `config.max_position_embeddings`.

    Counting FLOPs is a side pass (of pruning, of costing groups, of a script's report) and must not fail a run: a
    default of 128 tokens is longer than what a model with 64 positions accepts. Logs a warning when it clamps.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto.flops import clamp_flops_seq_length

    >>> clamp_flops_seq_length(BertModel(BertConfig(max_position_embeddings=64)), 128)
    64
    ```
    """
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and 0 < max_positions < seq_length:
        logger.warning(
            f"Counting FLOPs at {max_positions} tokens (config.max_position_embeddings of {type(model).__name__}), "
            f"not the {seq_length} asked for."
        )
        return max_positions
    return seq_length


def image_size(config: Any, default: int = 224) -> tuple[int, int]:
    """(height, width) of the images a vision model takes: `config.image_size` (an int or a pair), else `default` (224;
    the conv-net tracer uses 32, the CIFAR size). The one rule for dummy images (FLOPs, tracing, ONNX feeds).

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> image_size(SimpleNamespace(image_size=[28, 32])), image_size(None, default=32)
    ((28, 32), (32, 32))
    ```
    """
    size = getattr(config, "image_size", None) or default
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def dummy_inputs(model: nn.Module, seq_length: int = 128, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Dummy inputs for `model.main_input_name`: token ids of length `seq_length`, or pixels at `config.image_size`."""
    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", "input_ids")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if main_input == "pixel_values":
        size = image_size(config)
        channels = getattr(config, "num_channels", 3)
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        return {"pixel_values": torch.zeros(batch_size, channels, *size, device=device, dtype=dtype)}
    if main_input != "input_ids":
        raise ValueError(
            f"count_flops builds dummy inputs for `input_ids` or `pixel_values`; {type(model).__name__} takes "
            f"{main_input!r}. Measure it with your own inputs through `count_flops(model, inputs=...)`."
        )
    vocab_size = getattr(config, "vocab_size", 2)
    # Avoid special ids (pad is often 0 or 1), so sequence classifiers find a last non-pad token.
    low = min(3, vocab_size - 1)
    input_ids = low + torch.arange(seq_length, device=device) % max(vocab_size - low, 1)
    input_ids = input_ids.unsqueeze(0).expand(batch_size, -1).contiguous()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.no_grad()
def module_flops(
    model: nn.Module,
    seq_length: int = 128,
    batch_size: int = 1,
    *,
    inputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, int]]:
    """The FLOPs [`count_flops`] counts, itemised by module: `{"linear": {path: flops}, "attention": {query path:
    flops}}` (`nn.Linear` and `nn.Conv2d` products under `"linear"`; the attention score and context products of a
    layer under `"attention"`, keyed by the path of its query projection). [`count_flops`] is the sum of all items;
    [`~hf_oto.costs.GroupCosts`] prices each zero-invariant group from the same items, so that a FLOPs target and the
    pruning report use one counter.

    Args:
        model (`nn.Module`): The model.
        seq_length (`int`, *optional*, defaults to 128): Length of the dummy token sequence.
        batch_size (`int`, *optional*, defaults to 1): Batch size of the dummy inputs.
        inputs (`dict[str, torch.Tensor]`, *optional*): Your own keyword inputs instead of the dummy ones.

    Returns:
        `dict[str, dict[str, int]]`: FLOPs per module path, in two kinds.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto.flops import count_flops, module_flops

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> items = module_flops(model, seq_length=16)
    >>> sum(sum(kind.values()) for kind in items.values()) == count_flops(model, seq_length=16)
    True
    ```
    """
    if inputs is None:
        if seq_length < 1 or batch_size < 1:
            raise ValueError(f"seq_length and batch_size must be positive; got {seq_length} and {batch_size}.")
        inputs = dummy_inputs(model, seq_length=seq_length, batch_size=batch_size)
    linear: dict[str, int] = {}
    attention: dict[str, int] = {}
    handles = []

    def add(table: dict[str, int], name: str, flops: int) -> None:
        table[name] = table.get(name, 0) + flops  # a module called twice counts twice

    def linear_hook(name: str):
        def hook(module: nn.Linear, args, output):
            if module.in_features and module.out_features:
                rows = output.numel() // module.out_features
                add(linear, name, 2 * rows * module.in_features * module.out_features)

        return hook

    def conv_hook(name: str):
        def hook(module: nn.Conv2d, args, output):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            add(linear, name, 2 * output.numel() * (module.in_channels // module.groups) * kernel)

        return hook

    def attention_hook(name: str):
        def hook(module: nn.Linear, args, output):
            hidden = args[0]
            if hidden.dim() < 3 or hidden.numel() == 0:
                return
            tokens = hidden.shape[-2]
            batch = hidden.numel() // (tokens * hidden.shape[-1])
            add(attention, name, 4 * batch * tokens * tokens * module.out_features)

        return hook

    names = {id(module): name for name, module in model.named_modules()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name)))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
    for query in _query_modules(model):
        handles.append(query.register_forward_hook(attention_hook(names[id(query)])))
    was_training = model.training
    model.eval()
    try:
        model(**inputs)
    except (IndexError, RuntimeError) as error:
        raise ValueError(
            f"The dummy forward pass for counting FLOPs failed ({type(error).__name__}: {error}). If seq_length="
            f"{seq_length} exceeds what the model accepts (e.g. config.max_position_embeddings), pass a smaller "
            "seq_length."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {"linear": linear, "attention": attention}


def count_flops(
    model: nn.Module,
    seq_length: int = 128,
    batch_size: int = 1,
    *,
    inputs: dict[str, torch.Tensor] | None = None,
) -> int:
    """Forward FLOPs (2 x MACs) of one forward pass, measured with forward hooks on the actual shapes.

    Counts `nn.Linear` and `nn.Conv2d` products and, for supported transformers, the attention score and context
    products (`4 x B x T^2 x query width` per layer). Pruned layers count what they still compute: a layer whose heads
    are all pruned costs no attention products, an `nn.Linear` with 0 rows or columns costs nothing. The same items,
    per module, come from [`module_flops`].

    Args:
        model (`nn.Module`):
            The model; usually a transformers model.
        seq_length (`int`, *optional*, defaults to 128):
            Length of the dummy token sequence (ignored for vision models, which use `config.image_size`).
        batch_size (`int`, *optional*, defaults to 1):
            Batch size of the dummy inputs.
        inputs (`dict[str, torch.Tensor]`, *optional*):
            Your own keyword inputs instead of the dummy ones.

    Returns:
        `int`: the forward FLOPs.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto.flops import count_flops

    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    >>> count_flops(model, seq_length=16) > 0
    True
    ```
    """
    items = module_flops(model, seq_length=seq_length, batch_size=batch_size, inputs=inputs)
    return int(sum(items["linear"].values()) + sum(items["attention"].values()))
