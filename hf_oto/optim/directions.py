"""The base directions of HSPG: the step of `f` alone (SGD with momentum, AdamW), behind one small contract.

[`HSPG`] orchestrates a step: it finds the ZIG members, computes their group norms, the group-lasso penalty and the
sparsity bounds, runs the half-space test and projection, and zeroes dropped groups in the parameters and in the
optimizer state. What is left is the *base direction* `d` of the paper, "the direction without the penalty": how
the gradient of `f` becomes an update. A [`BaseDirection`] provides it, and owns the per-parameter state that goes
with it (momentum buffers, Adam moments), in `optimizer.state[param]` under its `state_keys`.

A direction works at two grains:

- parameters outside the ZIGs take `plain_step`, the optimizer's own update (`torch.optim.SGD`, `torch.optim.AdamW`),
  batched with torch's foreach kernels;
- each penalised member is cut by HSPG into blocks of whole groups, and for each [`Block`] the direction returns its
  base direction as `numerator / denominator` (`denominator` `None`: the numerator alone). HSPG takes the half-space
  dot products, applies the regularisation and the update `x <- x - lr / divisor * d`.

The weight decay and the group-lasso subgradient, `c_g x_g` with one coefficient per group, are computed by HSPG. A
direction declares how they enter: **decoupled** (`decoupled = True`, as AdamW), HSPG scales `x_g` by
`1 - lr * c_g` itself and the direction never sees them; **coupled** (`decoupled = False`, as SGD), the direction must
treat `grad + block.penalty * x` as its gradient (it may add the term at any point of its recursion).

**How to add a base direction** (e.g. Lion): write one subclass of [`BaseDirection`] with a `name` (the `variant=`
of [`HSPG`]), its `state_keys`, `decoupled`, and the methods `prepare` (create and advance the state of one param
group's parameters), `plain_step` (the update of the parameters outside the ZIGs) and `block` (the base direction of
one block of a member, zero on the groups where `block.live` is 0, whose state rows it keeps at zero); override
`divisor` if the direction has a per-parameter scale (Adam's bias correction) and `compute_dtype` if it computes in
another dtype than the parameter's. Decorate it with [`register_direction`], and `HSPG(..., variant=name)` uses it;
nothing in `hspg.py` changes. It reads its hyper-parameters from the param group (`lr`, `weight_decay`, `momentum`,
`nesterov`, `betas`, `eps`, or keys of its own given in the param-group dicts).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

DIRECTIONS: dict[str, type[BaseDirection]] = {}
"""The registered base directions, by name (the `variant=` of `HSPG`)."""


class Block:
    """One block of whole groups of a penalised member, as HSPG hands it to [`BaseDirection.block`].

    Attributes:
        x (`torch.Tensor`):
            The block of the parameter at `x_k`, in the direction's `compute_dtype` (HSPG writes it back).
        state (`dict[str, torch.Tensor]`):
            The same block of each of the direction's `state_keys` present in the parameter's state (views: update
            them in place).
        live (`torch.Tensor`, *optional*):
            Per group, 1 for the non-zero groups and 0 for the zero ones, broadcastable against `x`; `None` when the
            block has no group to keep at zero. The direction and its state rows must be 0 where it is 0.
        penalty (`torch.Tensor`, *optional*):
            Coupled directions only: the per-group coefficient `c_g` (weight decay plus `lmbda / ||x_g||`),
            broadcastable against `x`; the direction's gradient is `grad + penalty * x`.
        penalised (`bool`):
            Whether `penalty` can be non-zero (a coupled direction may skip adding it otherwise).

    Example:

    ```python
    >>> import torch
    >>> from hf_oto.optim.directions import Block

    >>> block = Block(torch.ones(2, 3), lambda tensor: tensor, torch.zeros(2, 3), {}, None, None, False)
    >>> block.grad.shape
    torch.Size([2, 3])
    ```
    """

    __slots__ = ("x", "state", "live", "penalty", "penalised", "_view", "_grad")

    def __init__(
        self,
        x: torch.Tensor,
        view: Any,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        live: torch.Tensor | None,
        penalty: torch.Tensor | None,
        penalised: bool,
    ):
        self.x, self._view, self._grad = x, view, grad
        self.state, self.live, self.penalty, self.penalised = state, live, penalty, penalised

    @property
    def grad(self) -> torch.Tensor:
        """The same block of the gradient of `f` (cut on demand: a direction that updated its state from the whole
        gradient in `prepare` need not read it)."""
        return self._view(self._grad)


@dataclass
class Batch:
    """The parameters of one param group that take this step, as HSPG hands them to a [`BaseDirection`].

    Attributes:
        group (`dict`):
            The param group (its hyper-parameters: `lr`, `weight_decay`, `momentum`, `betas`, ...).
        params (`list[torch.Tensor]`):
            The trainable parameters of the group that take the step.
        grads (`list[torch.Tensor]`):
            Their gradients of `f` (zeros for a penalised member without one).
        states (`list[dict]`):
            Their optimizer state, `optimizer.state[param]`.
        members (`list[bool]`):
            Whether each is a penalised member (updated by blocks) rather than a parameter outside the ZIGs.

    Example:

    ```python
    >>> import torch
    >>> from hf_oto.optim.directions import Batch

    >>> batch = Batch({"lr": 0.1}, [torch.zeros(2)], [torch.ones(2)], [{}], [False])
    >>> len(batch.subset([0]).params)
    1
    ```
    """

    group: dict[str, Any]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[dict[str, Any]]
    members: list[bool]

    def subset(self, indices: Sequence[int]) -> Batch:
        """The parameters at `indices` (in that order), with the same group."""
        params, grads, states, members = ([values[i] for i in indices] for values in self._columns())
        return Batch(self.group, params, grads, states, members)

    def _columns(self) -> tuple[list[Any], ...]:
        """The per-parameter lists, in the order of the fields."""
        return self.params, self.grads, self.states, self.members


class BaseDirection(ABC):
    """The contract of a base direction of HSPG (see the module docstring for how one is added).

    A direction is stateless: the per-parameter state lives in `optimizer.state[param]` (under `state_keys`, plus
    `"step"`), the hyper-parameters in the param group, and what one step computes per parameter in the context that
    `prepare` returns.

    Example:

    ```python
    >>> from hf_oto.optim.directions import get_direction

    >>> direction = get_direction("adamw")
    >>> direction.name, direction.state_keys, direction.decoupled
    ('adamw', ('exp_avg', 'exp_avg_sq'), True)
    ```
    """

    name: ClassVar[str]
    """The `variant=` of `HSPG` that selects this direction."""
    state_keys: ClassVar[tuple[str, ...]]
    """The per-parameter state tensors shaped like the parameter: cut into blocks, zeroed with the groups HSPG drops,
    checked against the parameter's shape on resume."""
    decoupled: ClassVar[bool]
    """Whether HSPG applies the weight decay and the penalty to `x` directly (`True`) or the direction adds them to
    its gradient (`False`)."""

    def compute_dtype(self, param: torch.Tensor) -> torch.dtype:
        """The dtype in which a member's blocks are updated (by default the parameter's)."""
        return param.dtype

    @abstractmethod
    def prepare(self, batch: Batch) -> list[Any]:
        """Creates and advances the state of the parameters of `batch`; returns one context per parameter, handed
        back to `plain_step`, `divisor` and `block`."""

    @abstractmethod
    def plain_step(self, batch: Batch, contexts: list[Any]) -> None:
        """`x <- x - lr * d` for parameters outside the ZIGs (no penalty), with the optimizer's own weight decay."""

    def divisor(self, context: Any) -> float:
        """The per-parameter scale of a member's direction, `d = numerator / denominator / divisor` (by default 1)."""
        return 1.0

    @abstractmethod
    def block(self, group: dict[str, Any], block: Block, context: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base direction of one block of a penalised member, as `(numerator, denominator)`.

        The direction is `numerator / denominator` (`numerator` alone when `denominator` is `None`), to be divided
        by `divisor(context)`; HSPG may overwrite `denominator` with the quotient, and reads but never writes
        `numerator`. On the groups where `block.live` is 0 it must be 0, and the state rows stay 0."""


def register_direction(cls: type[BaseDirection]) -> type[BaseDirection]:
    """Class decorator: makes a [`BaseDirection`] available to `HSPG(..., variant=cls.name)`.

    Example:

    ```python
    >>> from hf_oto.optim.directions import DIRECTIONS, SGDDirection, register_direction

    >>> register_direction(SGDDirection) is SGDDirection and "sgd" in DIRECTIONS
    True
    ```
    """
    registered = DIRECTIONS.get(cls.name)
    if registered is not None and registered is not cls:
        logger.warning(f"HSPG: the base direction {cls.name!r} ({registered.__name__}) is replaced by {cls.__name__}.")
    DIRECTIONS[cls.name] = cls
    return cls


def get_direction(name: str) -> BaseDirection:
    """The registered base direction `name` (an instance).

    Raises:
        `ValueError`: if no direction is registered under `name`.

    Example:

    ```python
    >>> from hf_oto.optim.directions import get_direction

    >>> type(get_direction("sgd")).__name__
    'SGDDirection'
    ```
    """
    if name not in DIRECTIONS:
        raise ValueError(f"Unknown variant {name!r}; choose one of {tuple(DIRECTIONS)}.")
    return DIRECTIONS[name]()


def state_keys() -> tuple[str, ...]:
    """The per-parameter state tensors of every registered direction, in registration order.

    Example:

    ```python
    >>> from hf_oto.optim.directions import state_keys

    >>> state_keys()
    ('momentum_buffer', 'exp_avg', 'exp_avg_sq')
    ```
    """
    return tuple(dict.fromkeys(key for cls in DIRECTIONS.values() for key in cls.state_keys))


def _step_counters(states: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The `"step"` counter of each state (a float32 scalar tensor, created at 0), advanced by one."""
    steps = []
    for state in states:
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        steps.append(state["step"])
    torch._foreach_add_(steps, 1.0)
    return steps


@register_direction
class SGDDirection(BaseDirection):
    """`torch.optim.SGD` semantics: `nu = grad + weight_decay * x (+ lmbda * zeta)`, `buf = momentum * buf + nu`
    (`buf = nu` on the first step), `d = buf`, or `nu + momentum * buf` with `nesterov=True`; coupled.

    State: `"step"` and, with momentum, `"momentum_buffer"`.

    Example:

    ```python
    >>> from hf_oto.optim.directions import SGDDirection

    >>> SGDDirection().decoupled
    False
    ```
    """

    name = "sgd"
    state_keys = ("momentum_buffer",)
    decoupled = False

    def prepare(self, batch: Batch) -> list[bool]:
        """Advances the step counters and gives each member without a momentum buffer an uninitialised one; the
        context of a parameter says whether its buffer is new (filled by its first block)."""
        _step_counters(batch.states)
        new = []
        for param, state, member in zip(batch.params, batch.states, batch.members):
            created = member and batch.group["momentum"] != 0 and state.get("momentum_buffer") is None
            if created:
                state["momentum_buffer"] = torch.empty_like(param, memory_format=torch.contiguous_format)
            new.append(created)
        return new

    def plain_step(self, batch: Batch, contexts: list[Any]) -> None:
        """Torch's foreach SGD."""
        group, params, states = batch.group, batch.params, batch.states
        lr, weight_decay, momentum, nesterov = group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]
        directions = batch.grads
        if weight_decay != 0:
            directions = torch._foreach_add(directions, params, alpha=weight_decay)
        if momentum != 0:
            if all(state.get("momentum_buffer") is not None for state in states):
                buffers = [state["momentum_buffer"] for state in states]
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, directions)
            else:
                buffers = []
                for state, nu in zip(states, directions):
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = torch.clone(nu).detach()
                    else:
                        buffer.mul_(momentum).add_(nu)
                    buffers.append(buffer)
            directions = torch._foreach_add(directions, buffers, alpha=momentum) if nesterov else buffers
        torch._foreach_add_(params, directions, alpha=-lr)

    def block(self, group: dict[str, Any], block: Block, context: bool) -> tuple[torch.Tensor, None]:
        """`nu = grad + penalty * x`, the momentum recursion, `d = buf` (or Nesterov's `nu + momentum * buf`).

        With momentum and without Nesterov (the usual case) `nu` is never materialised: the penalty is added to the
        buffer in place, `buf = (momentum * buf + grad) + penalty * x`, and the buffer block is the direction."""
        momentum, nesterov, new = group["momentum"], group["nesterov"], context
        x, live = block.x, block.live
        buffer = block.state.get("momentum_buffer") if momentum != 0 else None
        if buffer is not None and not nesterov:
            if new:
                buffer.copy_(block.grad)
                if live is not None:
                    buffer.mul_(live)
            elif live is not None:
                buffer.mul_(momentum * live)
                buffer.addcmul_(block.grad, live)
            else:
                buffer.mul_(momentum).add_(block.grad)
            if block.penalised:
                buffer.addcmul_(x, block.penalty)
            return buffer, None
        nu = torch.addcmul(block.grad, x, block.penalty)
        if live is not None:
            nu.mul_(live)
        if buffer is None:
            return nu, None
        if new:
            buffer.copy_(nu)
        elif live is not None:
            buffer.mul_(momentum * live).add_(nu)
        else:
            buffer.mul_(momentum).add_(nu)
        return nu.add_(buffer, alpha=momentum), None  # Nesterov


def _low_precision(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is float16 or bfloat16, whose AdamW step HSPG computes in float32."""
    return tensor.dtype in (torch.float16, torch.bfloat16)


def _moment_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of the Adam moments of `param`: float32 for a float16 / bfloat16 parameter, else its own.

    In float16 the second moment of a gradient below ~1e-4 underflows to 0 while the first does not, and
    `eps = 1e-8` rounds to 0: the step `m / (sqrt(v) + eps)` is then huge, or `0 / 0 = NaN` in the zero groups
    (`torch.optim.AdamW` turns a float16 model into NaN in one step for that reason; its fused variant into weights of
    thousands). Float32 moments and a float32 update, rounded to the parameter's dtype once, stay finite.
    """
    return torch.float32 if _low_precision(param) else param.dtype


class _AdamStep(NamedTuple):
    """The bias corrections of one parameter at this step (CPU floats, as torch's non-capturable AdamW)."""

    bias_correction1: float
    bias_correction2_sqrt: float


@register_direction
class AdamWDirection(BaseDirection):
    """Adam moments of the gradient of `f` only (bias-corrected), `d = m_hat / (sqrt(v_hat) + eps)`; decoupled, so
    with `lmbda=0` and no half-space step it is exactly `torch.optim.AdamW`.

    State: `"step"`, `"exp_avg"`, `"exp_avg_sq"`. The moments of a float16 / bfloat16 parameter are float32 and its
    update is computed in float32, then rounded to the parameter's dtype once (see `_moment_dtype`).

    Example:

    ```python
    >>> import torch
    >>> from hf_oto.optim.directions import AdamWDirection

    >>> AdamWDirection().compute_dtype(torch.zeros(1, dtype=torch.bfloat16))
    torch.float32
    ```
    """

    name = "adamw"
    state_keys = ("exp_avg", "exp_avg_sq")
    decoupled = True

    def compute_dtype(self, param: torch.Tensor) -> torch.dtype:
        """Float32 for a float16 / bfloat16 parameter, else its own dtype."""
        return _moment_dtype(param)

    def prepare(self, batch: Batch) -> list[_AdamStep]:
        """Creates the moments (or casts them to the parameter's moment dtype) and updates them, as torch's foreach
        AdamW; returns the bias corrections of each parameter."""
        beta1, beta2 = batch.group["betas"]
        grads = list(batch.grads)
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for index, (param, state) in enumerate(zip(batch.params, batch.states)):
            dtype = _moment_dtype(param)
            if "exp_avg" not in state:  # (the target mode may have put its own entries in a member's state)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            elif state["exp_avg"].dtype != dtype:  # the model was cast to or from a low precision since
                state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].to(dtype), state["exp_avg_sq"].to(dtype)
            if grads[index].dtype != dtype:
                grads[index] = grads[index].to(dtype)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        torch._foreach_add_(steps, 1.0)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_values = [step.item() for step in steps]  # CPU scalars, as torch's non-capturable AdamW
        return [_AdamStep(1 - beta1**step, math.sqrt(1 - beta2**step)) for step in step_values]

    def plain_step(self, batch: Batch, contexts: list[_AdamStep]) -> None:
        """Torch's foreach AdamW update; a float16 / bfloat16 parameter is updated from its float32 moments in
        float32 and rounded to its dtype once."""
        group, params, states = batch.group, batch.params, batch.states
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        plain = []
        for index, (param, state, context) in enumerate(zip(params, states, contexts)):
            if not _low_precision(param):
                plain.append(index)
                continue
            denominator = state["exp_avg_sq"].sqrt().div_(context.bias_correction2_sqrt).add_(eps)
            update = torch.div(state["exp_avg"], denominator, out=denominator)
            param.copy_(param.float().mul_(1 - lr * weight_decay).add_(update, alpha=-(lr / context.bias_correction1)))
        if not plain:
            return
        plain_params = [params[i] for i in plain]
        denominators = torch._foreach_sqrt([states[i]["exp_avg_sq"] for i in plain])
        torch._foreach_div_(denominators, [contexts[i].bias_correction2_sqrt for i in plain])
        torch._foreach_add_(denominators, eps)
        if weight_decay != 0:
            torch._foreach_mul_(plain_params, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(
            plain_params,
            [states[i]["exp_avg"] for i in plain],
            denominators,
            [-(lr / contexts[i].bias_correction1) for i in plain],
        )

    def divisor(self, context: _AdamStep) -> float:
        """Adam's first bias correction."""
        return context.bias_correction1

    def block(self, group: dict[str, Any], block: Block, context: _AdamStep) -> tuple[torch.Tensor, torch.Tensor]:
        """`(m, sqrt(v / bc2) + eps)`, with the moments of the zero groups set to zero (and `0 / 1` there when
        `eps == 0`)."""
        eps, live = group["eps"], block.live
        exp_avg, exp_avg_sq = block.state["exp_avg"], block.state["exp_avg_sq"]
        if live is not None:  # zero groups: zero moments, hence a zero direction
            exp_avg.mul_(live)
            exp_avg_sq.mul_(live)
        denominator = torch.sqrt(exp_avg_sq.to(block.x.dtype))
        denominator.div_(context.bias_correction2_sqrt).add_(eps)
        if live is not None and eps == 0:
            denominator.add_(1 - live)  # 0 / 1 rather than 0 / 0 in the zero groups; + 0 elsewhere
        return exp_avg, denominator
