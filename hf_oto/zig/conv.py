"""Zero-invariant channel groups of convolutional networks, found by tracing the model with `torch.fx`.

OTO section 3.1: a group is one output channel of a convolution (its filter row and bias) together with the matching
weight and bias of the batch norm that follows it, so that a zero group produces an all-zero channel. The channel is
then only ever multiplied by the input columns of the layers that consume it (the next convolution, or the first
linear layer after a flatten), which are pruned along with it (*dependents*).

The model is traced with plain `torch.fx` (no `transformers.utils.fx`), every step run on the example inputs as it is
recorded, so shapes are concrete: Python control flow on shapes (input checks, TensorFlow-style "SAME" padding)
resolves as on the example inputs. The builder then reads the graph instead of a per-model table:

- every convolution with `groups=1` (and every `nn.Linear`, on `[batch, features]` or channels-last inputs)
  *produces* a new channel space; batch norms and depthwise convolutions attach their per-channel parameters to the
  space they receive;
- zero-preserving operations (ReLU-like activations, pooling, dropout, upsampling, flatten) pass a space through;
  a flatten to `[batch, C * H * W]` makes each channel own `H * W` consecutive input columns of the next linear; a
  permute moves the channel dimension (ConvNeXt's channels-last MLPs);
- a residual add (or an elementwise product) *ties* the channels of its operands: channel `i` of every producer
  feeding the add is one group, and the whole tied set is one family. A sigmoid gate (squeeze-excite) maps zero to
  `0.5`, but the product of a zero channel and its gate is zero, so the gate's channels join the gated family; no
  layer may read the gate's channels directly;
- a concatenation along channels places several spaces side by side for its consumers.

Channels are kept dense (never grouped, never pruned), with the reason logged, when something could make a zero
group matter: a model input or output, an operation not known to keep zeros zero (a `LayerNorm` or `GroupNorm`
that normalises over channels, ConvNeXt-V2's global response norm, an unknown function), a layer reading a sigmoid's
output, a batch norm without affine parameters, a grouped (non-depthwise) convolution, per-channel parameters or a
residual add after a concatenation.

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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
from torch import nn
from transformers.utils import logging

from ..flops import image_size
from .groups import ZIGFamily, ZIGMember


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Adapters: the extension point for module types the tracer must not (or cannot) trace into
# ----------------------------------------------------------------------------------------------------------------
ADAPTER_ROLES = ("conv", "norm", "elementwise", "response_norm", "opaque")


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
            - `"response_norm"`: a global response norm on channels-last inputs (ConvNeXt-V2's `GRN`:
              `weight * x * N + bias + x` with `N = G / (mean over channels of G + eps)`, `G` the spatial L2 norm
              of each channel). A zero channel with a zero `bias` stays zero, and its `G = 0` adds nothing to the
              mean's sum but counts in its divisor, so `stand_in` replaces the pruned module by one that divides by
              the original channel count;
            - `"opaque"`: anything else; channels flowing in and out of it are kept dense.
        zero_preserving (`Callable[[nn.Module], bool]`, *optional*):
            For `"norm"` and `"elementwise"`: whether this module instance maps an all-zero channel (with zero
            affine parameters) to an all-zero channel, e.g. whether the fused activation of a `BatchNormAct2d` is
            ReLU-like. Defaults to always true.
        buffers (`tuple[str, ...]`, *optional*, defaults to `("running_mean", "running_var")`):
            For `"norm"`: per-channel buffers sliced with the channels (missing ones are skipped).
        size_attrs (`tuple[str, ...]`, *optional*, defaults to `("num_features",)`):
            For `"norm"`: attributes set to the new channel count after pruning.
        stand_in (`Callable[[nn.Module, int], nn.Module]`, *optional*):
            Called as `stand_in(module, channels_before)` after the module's channels were sliced; the module is
            replaced by what it returns (the same parameter names, so checkpoints load). Reloading a pruned model
            slices and replaces again.

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
    stand_in: Callable[[nn.Module, int], nn.Module] | None = None

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


class PrunedGlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's global response norm after pruning: the mean over channels divides by the channel count of the
    dense model, where the pruned channels were zero (`G = 0`), so the outputs are those of the group-sparse model.

    Args:
        grn (`nn.Module`): The sliced GRN (its `weight` and `bias`, `[1, 1, 1, channels]`, are taken over).
        mean_channels (`int`): The channel count of the dense model.
        eps (`float`, *optional*, defaults to 1e-6): transformers' `ConvNextV2GRN` epsilon.

    Example:

    ```python
    >>> import torch
    >>> from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN
    >>> from hf_oto.zig.conv import PrunedGlobalResponseNorm

    >>> grn = ConvNextV2GRN(4)
    >>> _ = grn.weight.data.normal_()
    >>> x = torch.randn(1, 2, 2, 4)
    >>> x[..., 3] = 0  # channel 3 is zero: prune it
    >>> kept = ConvNextV2GRN(3)
    >>> kept.weight.data = grn.weight.data[..., :3]
    >>> slim = PrunedGlobalResponseNorm(kept, mean_channels=4)
    >>> torch.allclose(slim(x[..., :3]), grn(x)[..., :3])
    True
    >>> torch.allclose(kept(x[..., :3]), grn(x)[..., :3])  # the plain module divides by 3, not 4
    False
    ```
    """

    def __init__(self, grn: nn.Module, mean_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = grn.weight
        self.bias = grn.bias
        self.mean_channels = int(mean_channels)
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        global_features = torch.linalg.vector_norm(hidden_states, ord=2, dim=(1, 2), keepdim=True)
        mean = global_features.sum(dim=-1, keepdim=True) / self.mean_channels
        norm_features = global_features / (mean + self.eps)
        return self.weight * (hidden_states * norm_features) + self.bias + hidden_states

    def extra_repr(self) -> str:
        return f"{self.weight.shape[-1]}, mean_channels={self.mean_channels}"


def _pruned_response_norm(module: nn.Module, channels_before: int) -> nn.Module:
    if isinstance(module, PrunedGlobalResponseNorm):
        return module  # pruned again: it already divides by the dense count
    return PrunedGlobalResponseNorm(module, channels_before)


_CHANNEL_ADAPTERS: dict[type | str, ChannelAdapter] = {
    # ConvNeXt-V2's global response norm: exact on pruned channels once the mean keeps the dense divisor.
    "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2GRN": ChannelAdapter(
        "response_norm", stand_in=_pruned_response_norm
    ),
    PrunedGlobalResponseNorm: ChannelAdapter("response_norm", stand_in=_pruned_response_norm),
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


DEPTHWISE_MARK = "oto_depthwise"
"""Attribute set on a depthwise convolution sliced to one channel (then `groups == 1`, like a 1 -> 1 convolution), so
the pruned model traces to the families of the dense one; reloading sets it again (same slicing code)."""


def is_depthwise(module: nn.Module) -> bool:
    """Whether a conv-like module is depthwise: `groups == in_channels == out_channels > 1`, or marked so by pruning."""
    groups = getattr(module, "groups", 1)
    if groups > 1:
        return groups == getattr(module, "in_channels", None) == getattr(module, "out_channels", None)
    return bool(getattr(module, DEPTHWISE_MARK, False))


# ----------------------------------------------------------------------------------------------------------------
# What keeps a zero channel zero
# ----------------------------------------------------------------------------------------------------------------
_SPATIAL_MODULES: tuple[type, ...] = (
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
"""Zero-preserving modules that act along the trailing dimensions: channel-wise only with channels in dimension 1."""
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
    *_SPATIAL_MODULES,
)
"""Channel-wise modules that map an all-zero channel to an all-zero channel (`f(0) = 0`)."""

_SPATIAL_FUNCTIONS: set[Any] = {
    torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool1d,
    torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.interpolate,
}
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
    *_SPATIAL_FUNCTIONS,
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

_GATE_MODULES: tuple[type, ...] = (nn.Sigmoid, nn.Hardsigmoid)
"""Channel-wise modules that do not map zero to zero (`sigmoid(0) = 0.5`): a zero group is zero again only where the
result multiplies it (a squeeze-excite gate), so its channels may be pruned, but no layer may read them."""
_GATE_FUNCTIONS: set[Any] = {torch.sigmoid, torch.nn.functional.sigmoid, torch.nn.functional.hardsigmoid}
_GATE_METHODS = {"sigmoid", "sigmoid_"}
_PERMUTE_FUNCTIONS: set[Any] = {torch.permute, torch.transpose}
_PERMUTE_METHODS = {"permute", "transpose"}
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
_VALUE = "oto_example_value"
"""Node metadata key: the value the node computed on the example inputs while the model was traced."""

_SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_floating_point"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "is_floating_point", "is_contiguous", "get_device"})
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class ExampleRunError(RuntimeError):
    """The model failed on the example inputs while being traced (the inputs do not fit the model)."""


class _ShapedProxy(torch.fx.Proxy):
    """A proxy that knows the shape of the tensor it stands for, on the example inputs.

    `x.shape`, `x.size()`, `x.dim()`, `len(x)` return concrete values, so Python control flow on shapes (input
    checks, TensorFlow-style "SAME" padding, `if H % stride`) resolves as it would on the example inputs. Control
    flow on tensor *values* still fails, as with plain `torch.fx`.
    """

    def _example_value(self) -> Any:
        node = self.__dict__.get("node")
        return node.meta.get(_VALUE) if node is not None else None

    def __getattr__(self, name: str) -> Any:
        if name in _SHAPE_ATTRIBUTES:
            value = self._example_value()
            if isinstance(value, torch.Tensor):
                return getattr(value, name)
        return super().__getattr__(name)

    def __len__(self) -> int:
        value = self._example_value()
        if isinstance(value, (torch.Tensor, tuple, list)):
            return len(value)
        return super().__len__()


def _maybe_revert_patches() -> contextlib.AbstractContextManager:
    """Undoes torch.fx's patches of `nn.Module.__call__` (and wrapped functions) while running a step for real.
    Without that (private) helper, the tracer's `_running` guard makes the patched calls run plainly."""
    revert = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


class _ChannelTracer(torch.fx.Tracer):
    """A `torch.fx` tracer that runs every step on the example inputs as it records it.

    - adapter modules, and modules whose `forward` is a `torch.nn` one (`nn.Conv2d`, `nn.BatchNorm2d`, and their
      subclasses that keep that `forward`, such as transformers' `EfficientNetDepthwiseConv2d`), are single steps;
    - shapes are concrete (see [`_ShapedProxy`]), so the forward of a transformers model traces with plain
      `torch.fx` (no `transformers.utils.fx`);
    - the path of the module being traced is kept, to name it when tracing fails.
    """

    def __init__(self, example_inputs: Mapping[str, Any]):
        super().__init__()
        self.example_inputs = dict(example_inputs)
        self.oto_module_stack: list[tuple[str, type]] = []
        self._running = False  # running a step on the example values: record nothing

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if get_channel_adapter(m) is not None:
            return True
        if isinstance(m, _CONTAINERS):
            return False
        forward_module = getattr(type(m).forward, "__module__", "") or ""
        return forward_module.startswith("torch.nn.") or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if self._running:
            return forward(*args, **kwargs)
        self.oto_module_stack.append((self.path_of_module(m), type(m)))
        result = super().call_module(m, forward, args, kwargs)
        self.oto_module_stack.pop()
        return result

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ShapedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_method" and target in _SHAPE_METHODS:
            value = _example_values(args[0])
            if isinstance(value, torch.Tensor):
                return getattr(value, target)(*_example_values(args[1:]), **_example_values(kwargs))
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, torch.fx.Proxy):
            proxy.node.meta[_VALUE] = self._run(kind, target, args, kwargs)
        return proxy

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """What the step computes on the example inputs (`None` for values tracing does not need)."""
        if kind == "placeholder":
            return self.example_inputs.get(target)
        args, kwargs = _example_values(args), _example_values(kwargs)
        self._running = True
        try:
            with _maybe_revert_patches(), torch.no_grad():
                if kind == "get_attr":
                    value = self.root
                    for atom in target.split("."):
                        value = getattr(value, atom)
                    return value.detach().clone() if isinstance(value, torch.Tensor) else value
                if kind == "call_module":
                    return self.root.get_submodule(target)(*args, **kwargs)
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
        except Exception as error:  # noqa: BLE001 - the step fails on the example inputs: say so
            raise ExampleRunError(f"{kind} {target}: {type(error).__name__}: {error}") from error
        finally:
            self._running = False
        return None


def _example_values(value: Any) -> Any:
    return torch.fx.node.map_aggregate(
        value, lambda item: item.node.meta.get(_VALUE) if isinstance(item, torch.fx.Proxy) else item
    )


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


class _Entry(nn.Module):
    """The traced root: shares the model's modules, parameters and buffers (so every path is the model's) and calls
    the model's `forward` with its main input and fixed keyword arguments (decorated forwards, such as transformers'
    `@can_return_tuple` ones, take their keywords as keywords)."""

    def __init__(self, model: nn.Module, main: str, fixed: Mapping[str, Any]):
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.__dict__["oto_call"] = lambda inputs: type(model).forward(model, **{main: inputs}, **fixed)

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.oto_call(inputs)


def _trace(model: nn.Module, example_inputs: torch.Tensor) -> torch.fx.GraphModule:
    """Traces `model` with plain `torch.fx`, shapes made concrete by `example_inputs` (its main input).

    Every argument of `forward` but the main input is fixed to its default (`return_dict=False` where there is one,
    so a transformers model returns a tuple).
    """
    main = _main_input_name(model)
    signature = inspect.signature(model.forward)
    fixed = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name != main
        and parameter.default is not inspect.Parameter.empty
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    if "return_dict" in fixed:
        fixed["return_dict"] = False
    root = _Entry(model, main, fixed)
    tracer = _ChannelTracer({"inputs": example_inputs})
    with _quiet_fx_warnings():
        try:
            graph = tracer.trace(root)
        except ExampleRunError:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised with the module that failed
            _raise_trace_error(model, tracer.oto_module_stack, error)
    return torch.fx.GraphModule(root, graph)


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
    size = image_size(config, default=32)
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
    """Which spaces a tensor's channel dimension carries: `(space, size)` segments, `factor` columns each.

    `dim` is the channel dimension (1, or the last one after a permute to channels-last, as in ConvNeXt's MLPs);
    `zero` says whether a zero group is still all-zero here (false after a sigmoid gate: `sigmoid(0) = 0.5`).
    """

    segments: tuple[tuple[int, int], ...]
    factor: int = 1
    dim: int = 1
    zero: bool = True

    def same_channels(self, other: _Channels) -> bool:
        return (self.segments, self.factor, self.dim) == (other.segments, other.factor, other.dim)

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
        value = node.meta.get(_VALUE) if isinstance(node, torch.fx.Node) else None
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def input_nodes(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [arg for arg in node.all_input_nodes if arg in self.channels]

    def fresh(self, node: torch.fx.Node, reason: str, dim: int = 1) -> None:
        """New dense channels for `node` (along `dim`: an opaque step keeps its input's channel dimension)."""
        shape = self.shape(node)
        if shape is not None and len(shape) > max(dim, 1):
            self.channels[node] = replace(self.new_space(shape[dim], node.name, fixed=reason), dim=dim)

    def opaque(self, node: torch.fx.Node, what: str) -> None:
        reason = f"{what} is not known to keep a zero channel zero"
        inputs = self.input_nodes(node)
        for arg in inputs:
            self.fix(self.channels[arg], reason)
        shape, before = self.shape(node), self.shape(inputs[0]) if inputs else None
        dim = self.channels[inputs[0]].dim if inputs else 1
        self.fresh(node, reason, dim if shape is not None and before is not None and len(shape) == len(before) else 1)

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
        if role in ("conv", "norm") or (
            role is None and isinstance(module, (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d))
        ):
            incoming = self.channels_first(incoming, path)
        if role == "conv" or (role is None and isinstance(module, nn.Conv2d)):
            self.convolution(node, module, path, incoming)
        elif role is None and isinstance(module, nn.Linear):
            self.linear(node, module, path, incoming)
        elif role == "norm" or (role is None and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))):
            self.norm(node, module, path, incoming, adapter)
        elif role == "response_norm":
            self.response_norm(node, module, path, incoming)
        elif role is None and isinstance(module, nn.Flatten):
            self.reshape(node, inputs[0] if inputs else None)
        elif role is None and isinstance(module, nn.PReLU) and module.num_parameters > 1:
            self.prelu(node, module, path, incoming)
        elif role is None and isinstance(module, _GATE_MODULES):
            self.pass_through(node, incoming, zero=False)
        elif role != "opaque" and _module_preserves_zero(module):
            self.pass_through(node, incoming, spatial=isinstance(module, _SPATIAL_MODULES))
        else:
            self.opaque(node, f"module {path!r} ({type(module).__name__})")

    def pass_through(
        self, node: torch.fx.Node, incoming: _Channels | None, *, spatial: bool = False, zero: bool | None = None
    ) -> None:
        """A channel-wise step: pointwise (any channel dimension) or `spatial` (pooling, padding: dim 1 only).
        `zero=False` marks a step that maps zero elsewhere (a sigmoid gate)."""
        shape = self.shape(node)
        if (
            incoming is not None
            and shape is not None
            and len(shape) > incoming.dim
            and shape[incoming.dim] == incoming.size
            and not (spatial and incoming.dim != 1)
        ):
            self.channels[node] = incoming if zero is None else replace(incoming, zero=incoming.zero and zero)
        else:
            self.opaque(node, f"{node.name} (changes the channel count or mixes channels)")

    def channels_first(self, incoming: _Channels | None, path: str) -> _Channels | None:
        """`incoming` if its channels are dimension 1; otherwise keeps them dense and returns `None`."""
        if incoming is not None and incoming.dim != 1:
            self.fix(incoming, f"{path!r} reads channels-last data along dimension 1")
            return None
        return incoming

    def convolution(self, node: torch.fx.Node, module: nn.Module, path: str, incoming: _Channels | None) -> None:
        groups = getattr(module, "groups", 1)
        depthwise = is_depthwise(module)
        if groups == 1 and not depthwise:
            self.consume(module, path, incoming)
            self.produce(node, module, path)
            return
        space = self.whole_space(incoming) if incoming is not None else None
        if depthwise and space is not None:
            # Depthwise: channel i in, channel i out; its filter and bias join the group of the incoming channel.
            target = self.spaces[space]
            target.members.append(ZIGMember(f"{path}.weight", 0))
            if getattr(module, "bias", None) is not None:
                target.members.append(ZIGMember(f"{path}.bias", 0))
            self.channels[node] = replace(incoming, zero=True)  # a zero filter and bias output zeros, whatever in
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
        if shape is None or len(shape) < 2:
            self.opaque(node, f"linear layer {path!r} on a tensor of rank {len(shape) if shape else '?'}")
            return
        if incoming is not None and incoming.dim != len(shape) - 1:
            self.fix(incoming, f"linear layer {path!r} reads the last dimension, not the channels")
            incoming = None
        self.consume(module, path, incoming)
        self.produce(node, module, path, dim=len(shape) - 1)

    def consume(self, module: nn.Module, path: str, incoming: _Channels | None) -> None:
        """Records the input columns of a conv/linear that read each incoming space (dim 1 of its weight)."""
        if incoming is None:
            return
        if not incoming.zero:
            self.fix(incoming, f"{path!r} reads channels that a zero group does not make zero (after a gate)")
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

    def produce(self, node: torch.fx.Node, module: nn.Module, path: str, dim: int = 1) -> None:
        channels = replace(self.new_space(module.weight.shape[0], path), dim=dim)
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
        self.channels[node] = replace(incoming, zero=True)  # zero weight and bias output zeros, whatever comes in

    def response_norm(self, node: torch.fx.Node, module: nn.Module, path: str, incoming: _Channels | None) -> None:
        """A global response norm: its bias joins the group (a zero channel then stays zero), its weight is sliced
        along; the pruned module keeps the dense channel count in its mean (the adapter's stand-in)."""
        shape = self.shape(node)
        space = self.whole_space(incoming) if incoming is not None else None
        if space is None or shape is None or incoming.dim != len(shape) - 1 or not incoming.zero:
            self.opaque(node, f"global response norm {path!r} off the channels-last channels of one producer")
            return
        last = module.weight.dim() - 1
        self.spaces[space].members.append(ZIGMember(f"{path}.bias", last))
        self.spaces[space].dependents.append(ZIGMember(f"{path}.weight", last))
        self.channels[node] = incoming

    def prelu(self, node: torch.fx.Node, module: nn.PReLU, path: str, incoming: _Channels | None) -> None:
        incoming = self.channels_first(incoming, path)
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
            self.pass_through(node, incoming, spatial=target in _SPATIAL_FUNCTIONS)
        elif target in _GATE_FUNCTIONS or (node.op == "call_method" and target in _GATE_METHODS):
            self.pass_through(node, incoming, zero=False)
        elif target in _PERMUTE_FUNCTIONS or (node.op == "call_method" and target in _PERMUTE_METHODS):
            self.permute(node, incoming)
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
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            if (value in (None, 0, 0.0)) and mode == "constant":
                self.pass_through(node, incoming, spatial=True)
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
        dims = {ch.dim for ch in operands}
        dim = dims.pop() if len(dims) == 1 else None
        if dim is None or len(shape) <= dim:
            self.opaque(node, f"{name!r} on tensors with channels along different dimensions")
            return
        full = [ch for ch in operands if ch.size == shape[dim]]
        broadcast = [ch for ch in operands if ch.size != shape[dim]]
        if not full or (broadcast and (zero_scalar_only or any(ch.size != 1 for ch in broadcast))):
            self.opaque(node, f"{name!r} broadcasting over channels")
            return
        reference = full[0]
        # A sum is zero where every term is; a product where any factor is (a gate times a zero channel).
        zero = all(ch.zero for ch in full) if zero_scalar_only else any(ch.zero for ch in full)
        for other in full[1:]:
            if other.same_channels(reference):
                continue
            a, b = self.whole_space(reference), self.whole_space(other)
            if a is None or b is None:
                for ch in full:
                    self.fix(ch, f"{name!r} ties channels of a concatenation or a flatten, which is not supported")
                continue
            self.union(a, b)  # a residual add: channel i of both operands is one group
        self.channels[node] = replace(reference, zero=zero)

    def concatenate(self, node: torch.fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = self.shape(node)
        parts = [self.channels.get(arg) for arg in tensors] if isinstance(tensors, (list, tuple)) else []
        if dim < 0:
            dim += len(shape)
        if dim != 1 or not parts or any(part is None or part.factor != 1 or part.dim != 1 for part in parts):
            self.opaque(node, f"concatenation along dim {dim}")
            return
        for part in parts:
            if not part.zero:
                self.fix(part, "a concatenation of channels that a zero group does not make zero (after a gate)")
        self.channels[node] = _Channels(tuple(segment for part in parts for segment in part.segments))

    def reshape(self, node: torch.fx.Node, source: torch.fx.Node | None) -> None:
        incoming = self.channels.get(source) if source is not None else None
        before, after = self.shape(source) if source is not None else None, self.shape(node)
        if incoming is None or before is None or after is None:
            self.opaque(node, f"reshape {node.name}")
        elif after == before:
            self.channels[node] = incoming
        elif incoming.dim == 1 and len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
            # flatten [B, C, H, W] -> [B, C*H*W]: each channel owns H*W consecutive columns
            self.channels[node] = replace(incoming, factor=incoming.factor * math.prod(before[2:]))
        else:
            self.opaque(node, f"reshape {node.name} to {list(after)}")

    def permute(self, node: torch.fx.Node, incoming: _Channels | None) -> None:
        """`permute`/`transpose`: the channels move to another dimension (ConvNeXt's channels-last MLPs)."""
        before, after = (self.shape(node.args[0]) if node.args else None), self.shape(node)
        if incoming is None or before is None or after is None or incoming.factor != 1:
            self.opaque(node, f"permutation {node.name}")
            return
        rank = len(before)
        args = list(node.args[1:])
        if node.target in ("transpose", torch.transpose):
            a, b = (args + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
            order = list(range(rank))
            a, b = a % rank, b % rank
            order[a], order[b] = order[b], order[a]
        else:
            order = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            order = list(order or node.kwargs.get("dims", ()))
            order = [d % rank for d in order]
        if sorted(order) != list(range(rank)):
            self.opaque(node, f"permutation {node.name}")
            return
        self.channels[node] = replace(incoming, dim=order.index(incoming.dim))

    def reduce(self, node: torch.fx.Node, incoming: _Channels | None, name: str) -> None:
        before = self.shape(node.args[0]) if node.args else None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if incoming is None or before is None or dims is None:
            self.opaque(node, f"reduction {name!r} over all dimensions")
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d + len(before) if d < 0 else d for d in dims]
        if 0 in dims or incoming.dim in dims or incoming.factor != 1 or any(d < incoming.dim for d in dims):
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
            A convolutional network (a transformers model or any `nn.Module`) that `torch.fx` can trace once shapes
            are concrete (Python control flow on shapes is fine, on tensor values is not), with adapters for the
            module types it cannot.
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
        graph_module = _trace(model, example_inputs)
    except ExampleRunError as error:
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
