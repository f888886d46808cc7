"""Zero-invariant channel groups of convolutional networks, found by tracing the model with `torch.fx`.

OTO section 3.1: a group is one output channel of a convolution (its filter row and bias) together with the matching
weight and bias of the batch norm that follows it, so that a zero group produces an all-zero channel. The channel is
then only ever multiplied by the input columns of the layers that consume it (the next convolution, or the first
linear layer after a flatten), which are pruned along with it (*dependents*).

The builder reads the computation graph instead of a per-model table:

- every convolution with `groups=1` (and every `nn.Linear` on `[batch, features]` inputs) *produces* a new channel
  space; batch norms and depthwise convolutions attach their per-channel parameters to the space they receive;
- zero-preserving operations (ReLU-like activations, pooling, dropout, upsampling, flatten) pass a space through;
  a flatten to `[batch, C * H * W]` makes each channel own `H * W` consecutive input columns of the next linear;
- a residual add (or an elementwise product) *ties* the channels of its operands: channel `i` of every producer
  feeding the add is one group, and the whole tied set is one family;
- a concatenation along channels places several spaces side by side for its consumers.

Channels are kept dense (never grouped, never pruned), with the reason logged, when something could make a zero
group matter: a model input or output, an operation not known to keep zeros zero (`sigmoid`, `LayerNorm`, a
`GroupNorm`, an unknown function), a batch norm without affine parameters, a grouped (non-depthwise) convolution,
per-channel parameters or a residual add after a concatenation.

Module types that tracing cannot see through, or that fuse several pieces (timm's `BatchNormAct2d`, `Conv2dSame`),
are handled by a [`ChannelAdapter`] registered with [`register_channel_adapter`]: the one extension point.
"""

from __future__ import annotations

import contextlib
import inspect
import logging as pylogging
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from transformers.utils import logging

from .groups import ZIGFamily, ZIGMember


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Adapters: the extension point for module types the tracer must not (or cannot) trace into
# ----------------------------------------------------------------------------------------------------------------
ADAPTER_ROLES = ("conv", "norm", "elementwise", "opaque")


@dataclass(frozen=True)
class ChannelAdapter:
    """How the channel tracer treats a module type as one opaque step (a leaf of the traced graph).

    Args:
        role (`str`):
            - `"conv"`: behaves like `nn.Conv2d` (attributes `weight` `[out, in / groups, ...]`, `bias`, `groups`,
              `in_channels`, `out_channels`), e.g. timm's `Conv2dSame`;
            - `"norm"`: a per-channel affine normalisation like `nn.BatchNorm2d` (attributes `weight`, `bias`, the
              running-statistics `buffers` and the `size_attrs` that hold the channel count), possibly fused with an
              activation, e.g. timm's `BatchNormAct2d`;
            - `"elementwise"`: keeps every channel where it is and maps zero to zero (an activation module);
            - `"opaque"`: anything else; channels flowing in and out of it are kept dense.
        zero_preserving (`Callable[[nn.Module], bool]`, *optional*):
            For `"norm"` and `"elementwise"`: whether this module instance maps an all-zero channel (with zero
            affine parameters) to an all-zero channel, e.g. whether the fused activation of a `BatchNormAct2d` is
            ReLU-like. Defaults to always true.
        buffers (`tuple[str, ...]`, *optional*, defaults to `("running_mean", "running_var")`):
            For `"norm"`: per-channel buffers sliced with the channels (missing ones are skipped).
        size_attrs (`tuple[str, ...]`, *optional*, defaults to `("num_features",)`):
            For `"norm"`: attributes set to the new channel count after pruning.

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_oto.zig.conv import ChannelAdapter, register_channel_adapter

    >>> class MyBatchNormReLU(nn.BatchNorm2d):  # a fused module, as in timm
    ...     def forward(self, x):
    ...         return nn.functional.relu(super().forward(x))

    >>> register_channel_adapter(MyBatchNormReLU, ChannelAdapter("norm"))
    ```
    """

    role: str
    zero_preserving: Callable[[nn.Module], bool] | None = None
    buffers: tuple[str, ...] = ("running_mean", "running_var")
    size_attrs: tuple[str, ...] = ("num_features",)

    def __post_init__(self):
        if self.role not in ADAPTER_ROLES:
            raise ValueError(f"Unknown ChannelAdapter role {self.role!r}; choose one of {list(ADAPTER_ROLES)}.")

    def preserves_zero(self, module: nn.Module) -> bool:
        return True if self.zero_preserving is None else bool(self.zero_preserving(module))


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _activation_preserves_zero(module: nn.Module) -> bool:
    """Whether the `act` (and `drop`) children of a fused norm-act module map zero to zero."""
    for name in ("act", "drop"):
        child = getattr(module, name, None)
        if child is not None and not _module_preserves_zero(child):
            return False
    return True


_CHANNEL_ADAPTERS: dict[type | str, ChannelAdapter] = {
    # timm's fused BatchNorm + activation (+ drop): traced, it becomes F.batch_norm on attributes plus an in-place
    # counter update, which the tracer cannot attribute to channels.
    "timm.layers.norm_act.BatchNormAct2d": ChannelAdapter("norm", zero_preserving=_activation_preserves_zero),
    "timm.layers.norm_act.SyncBatchNormAct": ChannelAdapter("norm", zero_preserving=_activation_preserves_zero),
    # timm's TensorFlow-"SAME" padded convolution: pads dynamically, then calls F.conv2d on its own weight.
    "timm.layers.conv2d_same.Conv2dSame": ChannelAdapter("conv"),
}


def register_channel_adapter(module_type: type | str, adapter: ChannelAdapter) -> None:
    """Registers how the channel tracer treats a module type (and its subclasses) as one opaque step.

    Use it for a module whose `forward` `torch.fx` cannot trace (data-dependent control flow) or whose pieces the
    tracer cannot attribute to channels (a fused norm + activation calling `F.batch_norm` on its own attributes). The
    error raised for such a module by [`build_zigs`] names the module and this function.

    Args:
        module_type (`type` or `str`):
            The class, or its qualified name `"package.module.ClassName"` (to register a class of a package that may
            not be installed, as hf_oto does for timm).
        adapter ([`ChannelAdapter`]):
            Its role.

    Example:

    ```python
    >>> from torch import nn
    >>> from hf_oto.zig.conv import ChannelAdapter, register_channel_adapter

    >>> class Swish(nn.Module):
    ...     def forward(self, x):
    ...         return x * x.sigmoid()

    >>> register_channel_adapter(Swish, ChannelAdapter("elementwise"))
    ```
    """
    if not isinstance(adapter, ChannelAdapter):
        raise ValueError(f"adapter must be a ChannelAdapter; got {type(adapter).__name__}.")
    if not isinstance(module_type, (type, str)):
        raise ValueError(f"module_type must be a class or a qualified class name; got {module_type!r}.")
    _CHANNEL_ADAPTERS[module_type] = adapter


def get_channel_adapter(module: nn.Module) -> ChannelAdapter | None:
    """The adapter registered for the type of `module` (or for its closest registered base class), if any."""
    for cls in type(module).__mro__:
        for key in (cls, _qualified_name(cls)):
            if key in _CHANNEL_ADAPTERS:
                return _CHANNEL_ADAPTERS[key]
    return None


# ----------------------------------------------------------------------------------------------------------------
# What keeps a zero channel zero
# ----------------------------------------------------------------------------------------------------------------
_ZERO_PRESERVING_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softsign,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.ZeroPad2d,
)
"""Channel-wise modules that map an all-zero channel to an all-zero channel (`f(0) = 0`)."""

_ZERO_PRESERVING_FUNCTIONS: set[Any] = {
    torch.relu,
    torch.tanh,
    torch.neg,
    torch.clone,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.elu,
    torch.nn.functional.celu,
    torch.nn.functional.selu,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.mish,
    torch.nn.functional.hardswish,
    torch.nn.functional.hardtanh,
    torch.nn.functional.tanh,
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool1d,
    torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.interpolate,
    operator.neg,
}
_ZERO_PRESERVING_METHODS = {
    "relu",
    "relu_",
    "tanh",
    "tanh_",
    "neg",
    "clone",
    "contiguous",
    "float",
    "to",
    "type_as",
    "detach",
}
_ADD_LIKE = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub"}
_MUL_LIKE = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV_LIKE = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}


def _module_preserves_zero(module: nn.Module) -> bool:
    adapter = get_channel_adapter(module)
    if adapter is not None:
        return adapter.role == "elementwise" and adapter.preserves_zero(module)
    if isinstance(module, nn.PReLU):
        return True  # prelu(0) = 0 whatever its slope
    return isinstance(module, _ZERO_PRESERVING_MODULES)


# ----------------------------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------------------------
class _ModuleStackMixin:
    """Keeps the path of the module being traced, to name it when tracing fails."""

    def _init_stack(self) -> None:
        self.oto_module_stack: list[tuple[str, type]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if get_channel_adapter(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.oto_module_stack.append((self.path_of_module(m), type(m)))
        result = super().call_module(m, forward, args, kwargs)
        self.oto_module_stack.pop()
        return result


class _ChannelTracer(_ModuleStackMixin, torch.fx.Tracer):
    def __init__(self):
        super().__init__()
        self._init_stack()


def _hf_tracer_class() -> type:
    from transformers.utils.fx import HFTracer

    class _HFChannelTracer(_ModuleStackMixin, HFTracer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_stack()

    return _HFChannelTracer


def _main_input_name(model: nn.Module) -> str:
    name = getattr(model, "main_input_name", None)
    if name:
        return name
    return next(iter(inspect.signature(model.forward).parameters))


@contextlib.contextmanager
def _quiet_fx_warnings() -> Iterator[None]:
    """Hides torch.fx's notice that `is_fx_tracing` also covers `torch.export` (logged on every trace)."""
    fx_logger = pylogging.getLogger("torch.fx._symbolic_trace")
    level = fx_logger.level
    fx_logger.setLevel(pylogging.ERROR)
    try:
        yield
    finally:
        fx_logger.setLevel(level)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    with _quiet_fx_warnings():
        return _trace_model(model)


def _trace_model(model: nn.Module) -> torch.fx.GraphModule:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        from transformers.utils.fx import symbolic_trace

        tracer_class = _hf_tracer_class()
        holder: list = []

        class _Recording(tracer_class):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                holder.append(self)

        try:
            return symbolic_trace(
                model, input_names=[_main_input_name(model)], disable_check=True, tracer_cls=_Recording
            )
        except Exception as error:  # noqa: BLE001 - re-raised with the module that failed
            _raise_trace_error(model, holder[0].oto_module_stack if holder else [], error)
    tracer = _ChannelTracer()
    signature = inspect.signature(model.forward)
    names = list(signature.parameters)
    concrete = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name != names[0] and parameter.default is not inspect.Parameter.empty
    }
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as error:  # noqa: BLE001 - re-raised with the module that failed
        _raise_trace_error(model, tracer.oto_module_stack, error)
    return torch.fx.GraphModule(model, graph)


def _raise_trace_error(model: nn.Module, stack: list[tuple[str, type]], error: Exception) -> None:
    if stack:
        path, cls = stack[-1]
        where = f"module {path!r} ({_qualified_name(cls)})"
        fix = (
            f"Register an adapter for it: `hf_oto.zig.conv.register_channel_adapter({cls.__name__}, "
            "ChannelAdapter(role))` with role 'conv', 'norm', 'elementwise' or 'opaque' (see the README, "
            '"Conv networks: adding an adapter").'
        )
    else:
        where = f"the forward of {type(model).__name__} itself"
        fix = "Make its forward traceable by torch.fx (no Python control flow on tensor values)."
    raise ValueError(
        f"torch.fx could not trace {where} to find its channel groups ({type(error).__name__}: {error}). {fix}"
    ) from error


def default_example_inputs(model: nn.Module) -> torch.Tensor:
    """A zero image batch `[1, C, H, W]` for tracing: `C`/`H, W` from `config.num_channels`/`config.image_size` when
    the model has them, else the first convolution's input channels and 32 x 32."""
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    if channels is None:
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first_conv.in_channels if first_conv is not None else 3
    size = getattr(config, "image_size", None) or 32
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.zeros(1, channels, *size, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Channel spaces and the graph walk
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Space:
    """The channels produced by one producer, plus every per-channel slice attached to them on the way."""

    index: int
    size: int
    producer: str
    members: list[ZIGMember] = field(default_factory=list)
    dependents: list[ZIGMember] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    fixed: str | None = None
    producer_members: list[ZIGMember] = field(default_factory=list)
    producer_node: torch.fx.Node | None = None
    normalized_directly: bool = False

    def penalised(self, channel_penalty: str) -> list[ZIGMember]:
        """The members the group lasso sees: with `"norm"`, the producer's filter is left out when a norm reads
        its output directly (and nothing else does)."""
        if channel_penalty == "norm" and self.normalized_directly:
            return list(self.members)
        return [*self.producer_members, *self.members]

    def sliced_along(self, channel_penalty: str) -> list[ZIGMember]:
        if channel_penalty == "norm" and self.normalized_directly:
            return [*self.producer_members, *self.dependents]
        return list(self.dependents)


@dataclass(frozen=True)
class _Channels:
    """Which spaces a tensor's channel dimension (dim 1) carries: `(space, size)` segments; `factor` columns each."""

    segments: tuple[tuple[int, int], ...]
    factor: int = 1

    @property
    def size(self) -> int:
        return sum(size for _, size in self.segments)


class _ChannelGraph:
    """Walks a traced graph and collects channel spaces, their ties, members and consumers."""

    def __init__(self, graph_module: torch.fx.GraphModule, channel_penalty: str = "conv_and_norm"):
        self.channel_penalty = channel_penalty
        self.graph_module = graph_module
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.channels: dict[torch.fx.Node, _Channels] = {}

    # union-find -----------------------------------------------------------------------------------------------
    def new_space(self, size: int, producer: str, fixed: str | None = None) -> _Channels:
        space = _Space(len(self.spaces), size, producer, fixed=fixed)
        self.spaces.append(space)
        self.parent.append(space.index)
        return _Channels(((space.index, size),))

    def find(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)

    def fix(self, channels: _Channels | None, reason: str) -> None:
        if channels is None:
            return
        for index, _ in channels.segments:
            if self.spaces[index].fixed is None:
                self.spaces[index].fixed = reason

    # helpers --------------------------------------------------------------------------------------------------
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def input_nodes(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [arg for arg in node.all_input_nodes if arg in self.channels]

    def fresh(self, node: torch.fx.Node, reason: str) -> None:
        shape = self.shape(node)
        if shape is not None and len(shape) >= 2:
            self.channels[node] = self.new_space(shape[1], node.name, fixed=reason)

    def opaque(self, node: torch.fx.Node, what: str) -> None:
        reason = f"{what} is not known to keep a zero channel zero"
        for arg in self.input_nodes(node):
            self.fix(self.channels[arg], reason)
        self.fresh(node, reason)

    def whole_space(self, channels: _Channels) -> int | None:
        """The space index when `channels` is exactly one producer's channels, in order, one column each."""
        if len(channels.segments) == 1 and channels.factor == 1:
            return channels.segments[0][0]
        return None

    # the walk -------------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder":
                self.fresh(node, "the model input")
            elif node.op == "get_attr":
                self.fresh(node, f"a tensor attribute ({node.target}) enters the computation")
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    self.fix(self.channels.get(arg), "a model output")
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call_function(node)

    def call_module(self, node: torch.fx.Node) -> None:
        module = self.graph_module.get_submodule(node.target)
        path = node.target
        inputs = self.input_nodes(node)
        incoming = self.channels.get(inputs[0]) if inputs else None
        adapter = get_channel_adapter(module)
        role = adapter.role if adapter is not None else None
        if role == "conv" or (role is None and isinstance(module, nn.Conv2d)):
            self.convolution(node, module, path, incoming)
        elif role is None and isinstance(module, nn.Linear):
            self.linear(node, module, path, incoming)
        elif role == "norm" or (role is None and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))):
            self.norm(node, module, path, incoming, adapter)
        elif role is None and isinstance(module, nn.Flatten):
            self.reshape(node, inputs[0] if inputs else None)
        elif role is None and isinstance(module, nn.PReLU) and module.num_parameters > 1:
            self.prelu(node, module, path, incoming)
        elif role != "opaque" and _module_preserves_zero(module):
            self.pass_through(node, incoming)
        else:
            self.opaque(node, f"module {path!r} ({type(module).__name__})")

    def pass_through(self, node: torch.fx.Node, incoming: _Channels | None) -> None:
        shape = self.shape(node)
        if incoming is not None and shape is not None and len(shape) >= 2 and shape[1] == incoming.size:
            self.channels[node] = incoming
        else:
            self.opaque(node, f"{node.name} (changes the channel count)")

    def convolution(self, node: torch.fx.Node, module: nn.Module, path: str, incoming: _Channels | None) -> None:
        groups = getattr(module, "groups", 1)
        if groups == 1:
            self.consume(module, path, incoming)
            self.produce(node, module, path)
            return
        space = self.whole_space(incoming) if incoming is not None else None
        if groups == module.in_channels == module.out_channels and space is not None:
            # Depthwise: channel i in, channel i out; its filter and bias join the group of the incoming channel.
            target = self.spaces[space]
            target.members.append(ZIGMember(f"{path}.weight", 0))
            if getattr(module, "bias", None) is not None:
                target.members.append(ZIGMember(f"{path}.bias", 0))
            self.channels[node] = incoming
            return
        reason = (
            f"grouped convolution {path!r} (groups={groups}): slicing would break its equal split into groups"
            if groups != module.in_channels or groups != module.out_channels
            else f"depthwise convolution {path!r} after a concatenation"
        )
        self.fix(incoming, reason)
        self.fresh(node, reason)

    def linear(self, node: torch.fx.Node, module: nn.Linear, path: str, incoming: _Channels | None) -> None:
        shape = self.shape(node)
        if shape is None or len(shape) != 2:
            self.opaque(node, f"linear layer {path!r} on a tensor of rank {len(shape) if shape else '?'}")
            return
        self.consume(module, path, incoming)
        self.produce(node, module, path)

    def consume(self, module: nn.Module, path: str, incoming: _Channels | None) -> None:
        """Records the input columns of a conv/linear that read each incoming space (dim 1 of its weight)."""
        if incoming is None:
            return
        width = module.weight.shape[1] * getattr(module, "groups", 1)
        if incoming.size * incoming.factor != width:
            self.fix(incoming, f"{path!r} reads {width} input columns, not one block per channel")
            return
        offset = 0
        for index, size in incoming.segments:
            length = size * incoming.factor
            self.spaces[index].dependents.append(ZIGMember(f"{path}.weight", 1, offset, length))
            offset += length

    def produce(self, node: torch.fx.Node, module: nn.Module, path: str) -> None:
        channels = self.new_space(module.weight.shape[0], path)
        space = self.spaces[channels.segments[0][0]]
        space.producer_node = node
        space.producer_members.append(ZIGMember(f"{path}.weight", 0))
        if getattr(module, "bias", None) is not None:
            space.producer_members.append(ZIGMember(f"{path}.bias", 0))
        self.channels[node] = channels

    def norm(
        self,
        node: torch.fx.Node,
        module: nn.Module,
        path: str,
        incoming: _Channels | None,
        adapter: ChannelAdapter | None,
    ) -> None:
        space = self.whole_space(incoming) if incoming is not None else None
        reason = None
        if getattr(module, "weight", None) is None or getattr(module, "bias", None) is None:
            reason = f"normalisation {path!r} has no affine weight and bias, so it maps a zero channel to -mean/std"
        elif adapter is not None and not adapter.preserves_zero(module):
            reason = f"normalisation {path!r} is fused with an activation that does not map zero to zero"
        elif space is None:
            reason = f"per-channel parameters of {path!r} after a concatenation are not supported"
        if reason is not None:
            if incoming is None:
                self.fresh(node, reason)
            else:
                self.fix(incoming, reason)
                self.channels[node] = incoming
            return
        target = self.spaces[space]
        source = node.args[0] if node.args else None
        if source is not None and source is target.producer_node and len(source.users) == 1:
            target.normalized_directly = True  # conv -> BN with nothing else reading the conv's output
        target.members += [ZIGMember(f"{path}.weight", 0), ZIGMember(f"{path}.bias", 0)]
        buffers = adapter.buffers if adapter is not None else ("running_mean", "running_var")
        target.buffers += [f"{path}.{name}" for name in buffers if getattr(module, name, None) is not None]
        self.channels[node] = incoming

    def prelu(self, node: torch.fx.Node, module: nn.PReLU, path: str, incoming: _Channels | None) -> None:
        space = self.whole_space(incoming) if incoming is not None else None
        if space is None:
            self.opaque(node, f"per-channel PReLU {path!r} after a concatenation")
            return
        self.spaces[space].dependents.append(ZIGMember(f"{path}.weight", 0))
        self.channels[node] = incoming

    def call_function(self, node: torch.fx.Node) -> None:
        target = node.target
        shape = self.shape(node)
        if shape is None:
            return  # sizes, tuples, flags: no channels
        inputs = self.input_nodes(node)
        first = node.args[0] if node.args else None
        incoming = self.channels.get(first) if isinstance(first, torch.fx.Node) else None
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if target in _ZERO_PRESERVING_FUNCTIONS or (node.op == "call_method" and target in _ZERO_PRESERVING_METHODS):
            self.pass_through(node, incoming)
        elif target in _ADD_LIKE:
            self.elementwise(node, inputs, zero_scalar_only=True, name=name)
        elif target in _MUL_LIKE:
            self.elementwise(node, inputs, zero_scalar_only=False, name=name)
        elif target in _DIV_LIKE and len(inputs) == 1 and inputs[0] is first:
            self.pass_through(node, incoming)
        elif target in _CAT:
            self.concatenate(node)
        elif target in _RESHAPE_FUNCTIONS or (node.op == "call_method" and target in _RESHAPE_METHODS):
            self.reshape(node, first if isinstance(first, torch.fx.Node) else None)
        elif target in _REDUCE_FUNCTIONS or (node.op == "call_method" and target in _REDUCE_METHODS):
            self.reduce(node, incoming, name)
        elif target is torch.nn.functional.pad:
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            if (value in (None, 0, 0.0)) and node.kwargs.get("mode", "constant") == "constant":
                self.pass_through(node, incoming)
            else:
                self.opaque(node, "padding with a non-zero value")
        else:
            self.opaque(node, f"operation {name!r}")

    def elementwise(
        self, node: torch.fx.Node, inputs: list[torch.fx.Node], *, zero_scalar_only: bool, name: str
    ) -> None:
        shape = self.shape(node)
        others = [arg for arg in (*node.args, *node.kwargs.values()) if not isinstance(arg, torch.fx.Node)]
        operands = [self.channels[arg] for arg in inputs]
        if len(operands) == 1:
            constants_ok = all(isinstance(c, (int, float)) for c in others) and (
                not zero_scalar_only or all(c == 0 for c in others)
            )
            extra_nodes = [arg for arg in node.all_input_nodes if arg not in self.channels]
            if constants_ok and not extra_nodes:
                self.pass_through(node, operands[0])
            else:
                self.opaque(node, f"{name!r} with a constant that is not a zero-preserving scalar")
            return
        if len(shape) < 2 or not operands:
            self.opaque(node, f"{name!r} on tensors without channels")
            return
        full = [ch for ch in operands if ch.size == shape[1]]
        broadcast = [ch for ch in operands if ch.size != shape[1]]
        if not full or (broadcast and (zero_scalar_only or any(ch.size != 1 for ch in broadcast))):
            self.opaque(node, f"{name!r} broadcasting over channels")
            return
        reference = full[0]
        for other in full[1:]:
            if other == reference:
                continue
            a, b = self.whole_space(reference), self.whole_space(other)
            if a is None or b is None:
                for ch in full:
                    self.fix(ch, f"{name!r} ties channels of a concatenation or a flatten, which is not supported")
                continue
            self.union(a, b)  # a residual add: channel i of both operands is one group
        self.channels[node] = reference

    def concatenate(self, node: torch.fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = self.shape(node)
        parts = [self.channels.get(arg) for arg in tensors] if isinstance(tensors, (list, tuple)) else []
        if dim < 0:
            dim += len(shape)
        if dim != 1 or not parts or any(part is None or part.factor != 1 for part in parts):
            self.opaque(node, f"concatenation along dim {dim}")
            return
        self.channels[node] = _Channels(tuple(segment for part in parts for segment in part.segments))

    def reshape(self, node: torch.fx.Node, source: torch.fx.Node | None) -> None:
        incoming = self.channels.get(source) if source is not None else None
        before, after = self.shape(source) if source is not None else None, self.shape(node)
        if incoming is None or before is None or after is None:
            self.opaque(node, f"reshape {node.name}")
        elif after == before:
            self.channels[node] = incoming
        elif len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
            # flatten [B, C, H, W] -> [B, C*H*W]: each channel owns H*W consecutive columns
            self.channels[node] = _Channels(incoming.segments, incoming.factor * math.prod(before[2:]))
        else:
            self.opaque(node, f"reshape {node.name} to {list(after)}")

    def reduce(self, node: torch.fx.Node, incoming: _Channels | None, name: str) -> None:
        before = self.shape(node.args[0]) if node.args else None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if incoming is None or before is None or dims is None:
            self.opaque(node, f"reduction {name!r} over all dimensions")
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d + len(before) if d < 0 else d for d in dims]
        if 0 in dims or 1 in dims or incoming.factor != 1:
            self.opaque(node, f"reduction {name!r} over the batch or channel dimension")
            return
        self.pass_through(node, incoming)

    # families -------------------------------------------------------------------------------------------------
    def families(self) -> tuple[list[ZIGFamily], dict[str, str]]:
        """The channel families, and the reason each kept-dense producer is kept dense."""
        classes: dict[int, list[_Space]] = {}
        for space in self.spaces:
            classes.setdefault(self.find(space.index), []).append(space)
        families, dense = [], {}
        for spaces in classes.values():
            producers = [space for space in spaces if space.members or space.producer_members]
            reasons = list(dict.fromkeys(space.fixed for space in spaces if space.fixed))
            if not producers:
                continue
            name = f"{producers[0].producer}.channels"
            if reasons:
                dense[name] = "; ".join(reasons)
                continue
            penalty = self.channel_penalty
            members = [member for space in spaces for member in space.penalised(penalty)]
            modules = sorted({member.param_name.rpartition(".")[0] for member in members})
            families.append(
                ZIGFamily(
                    name=name,
                    kind="channels",
                    num_groups=producers[0].size,
                    members=tuple(members),
                    dependents=tuple(member for space in spaces for member in space.sliced_along(penalty)),
                    module=producers[0].producer,
                    meta={
                        "buffers": [buffer for space in spaces for buffer in space.buffers],
                        "producers": [space.producer for space in producers],
                        "modules": modules,
                    },
                )
            )
        return families, dense


CHANNEL_PENALTIES = ("conv_and_norm", "norm")
"""What a channel group penalises: the paper's filter + bias + batch-norm weight and bias, or the norm's alone."""


def channel_families(
    model: nn.Module,
    example_inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    channel_penalty: str = "conv_and_norm",
) -> tuple[list[ZIGFamily], dict[str, str]]:
    """Traces `model` and returns its channel families, plus `{family name: reason}` for the channels kept dense.

    Args:
        model (`nn.Module`):
            A convolutional network: a transformers model (traced with transformers' `HFTracer`) or any
            `nn.Module` that `torch.fx` can trace, with adapters for the module types it cannot.
        example_inputs (`torch.Tensor` or `dict`, *optional*):
            An input batch for the model's main input, used once (in eval mode, without gradients) to read the
            shapes of every step. Defaults to [`default_example_inputs`].
        channel_penalty (`str`, *optional*, defaults to `"conv_and_norm"`):
            `"conv_and_norm"` (the paper): a group penalises the filter, its bias and the batch-norm weight and
            bias. `"norm"`: where a batch norm reads a convolution's output directly (and nothing else reads it), the
            group penalises only the norm's weight and bias; they alone make the channel zero, and the filter is
            sliced along with them. A filter followed by batch norm is scale-invariant (the loss has no gradient
            along it), so the group lasso shrinks it without resistance until the norm works in its `eps` regime;
            penalising the norm's parameters avoids that. The families and the layout are the same in both modes.

    Returns:
        `tuple[list[ZIGFamily], dict[str, str]]`: the families in graph order, and the dense channel sets.
    """
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    if isinstance(example_inputs, Mapping):
        example_inputs = example_inputs[_main_input_name(model)]
    was_training = model.training
    model.eval()
    try:
        graph_module = _trace(model)
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_inputs)
    except ValueError:
        raise
    except RuntimeError as error:
        raise ValueError(
            f"Running {type(model).__name__} on example inputs of shape {tuple(example_inputs.shape)} to read its "
            f"shapes failed ({error}). Pass `example_inputs` that the model accepts."
        ) from error
    finally:
        model.train(was_training)
    if channel_penalty not in CHANNEL_PENALTIES:
        raise ValueError(f"channel_penalty must be one of {list(CHANNEL_PENALTIES)}; got {channel_penalty!r}.")
    walk = _ChannelGraph(graph_module, channel_penalty)
    walk.run()
    return walk.families()


def describe_dense_channels(dense: Mapping[str, str]) -> Iterable[str]:
    """One line per channel set kept dense, with its reason."""
    for name, reason in dense.items():
        yield f"{name}: kept dense ({reason})"
