"""Half-Space Stochastic Projected Gradient (HSPG), the optimizer of "Only Train Once" (Chen et al., NeurIPS 2021).

HSPG minimises `f(x) + lmbda * sum_g ||x_g||_2` over the zero-invariant groups (ZIGs) of a model. It runs in two
stages (Algorithm 2 of the paper):

1. **Initialization stage** (the first `init_steps` calls of `step()`): stochastic subgradient steps, i.e. the base
   direction of `f` (SGD with momentum or AdamW) plus `lmbda * x_g / ||x_g||` on every penalised group.
2. **Half-space stage**: the same trial point `x~ = x - lr * d`, followed by the half-space projection (eq. 6): a
   non-zero group whose trial point leaves the half-space `x~_g^T x_g >= epsilon * ||x_g||^2` is set to exactly zero,
   and groups that are zero stay zero for the rest of training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from transformers.utils import logging

from ..zig.groups import ZIGSet


logger = logging.get_logger(__name__)

VARIANTS = ("sgd", "adamw")
INITIALIZATION = "initialization"
HALF_SPACE = "half_space"


@dataclass
class _Member:
    """Working record of one penalised parameter during one `step()` (never stored beyond it)."""

    param: torch.Tensor
    family: int
    dim: int
    num_groups: int
    group: dict[str, Any]
    squared_norm: torch.Tensor  # [num_groups], ||x_{m,g}||^2 at x_k
    direction: torch.Tensor | None = None  # base direction (adamw: m_hat / (sqrt(v_hat) + eps) without 1/bc1)
    direction_scale: float = 1.0  # adamw: 1 / bias_correction1; sgd: 1
    exp_avg: torch.Tensor | None = None  # adamw, while `direction` is not materialised (initialization stage)
    denominator: torch.Tensor | None = None
    dot: torch.Tensor | None = None  # [num_groups], direction_g^T x_g
    state: dict[str, Any] | None = None


def _grouped(tensor: torch.Tensor, dim: int, num_groups: int) -> torch.Tensor:
    """A view of `tensor` whose group axis is explicit: `[num_groups, -1]` for `dim == 0`, else unflattened."""
    if dim == 0:
        return tensor.view(num_groups, -1)
    return tensor.unflatten(dim, (num_groups, -1))


def _per_group(values: torch.Tensor, grouped: torch.Tensor, dim: int) -> torch.Tensor:
    """`values` (`[num_groups]`) shaped to broadcast against `_grouped(tensor, dim, num_groups)`."""
    if dim == 0:
        return values.view(-1, 1)
    shape = [1] * grouped.dim()
    shape[dim] = values.numel()
    return values.view(shape)


def _row_dot(a: torch.Tensor, b: torch.Tensor, dim: int, num_groups: int) -> torch.Tensor:
    """`[num_groups]` tensor of the per-group dot products `a_g^T b_g`, accumulated in float32 at least."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    if dim == 0:
        a2, b2 = a.view(num_groups, 1, -1), b.view(num_groups, -1, 1)
        if a.dtype != dtype:
            a2, b2 = a2.to(dtype), b2.to(dtype)
        return torch.bmm(a2, b2).view(num_groups)
    product = _grouped(a, dim, num_groups).to(dtype) * _grouped(b, dim, num_groups).to(dtype)
    dims = [d for d in range(product.dim()) if d != dim]
    return product.sum(dim=dims)


def _row_squared_norm(a: torch.Tensor, dim: int, num_groups: int) -> torch.Tensor:
    if dim == 0:
        view = a.view(num_groups, -1)
        if view.dtype not in (torch.float32, torch.float64):
            view = view.float()
        return torch.linalg.vector_norm(view, dim=1).square()
    return _row_dot(a, a, dim, num_groups)


class HSPG(Optimizer):
    r"""Half-Space Stochastic Projected Gradient over the zero-invariant groups of a model.

    Minimises `f(x) + lmbda * sum_g ||x_g||_2`, where the sum runs over the groups of `zigs` and `x_g` gathers the
    `g`-th slice of every penalised member of a family (dependents are not penalised and, like every parameter
    outside the ZIGs, receive the plain base step).

    **Stages.** While `step_count < init_steps` HSPG takes subgradient steps (`d = base + lmbda * x_g / ||x_g||`,
    the subgradient of a zero group taken as 0); it never sets a group to zero by itself. From then on every step is
    a half-space step: with the trial point `x~ = x - lr * d`, each non-zero group with
    `x~_g^T x_g < epsilon * ||x_g||^2` (the sums run over all members of the family, each with the `lr` of its own
    param group) is set to exactly zero, and groups that are zero stay exactly zero (their rows of the momentum /
    Adam moments are zeroed too, so nothing can resurrect them).

    **Base directions.**

    - `variant="sgd"`: `torch.optim.SGD` semantics: `nu = grad + weight_decay * x + lmbda * zeta`,
      `buf = momentum * buf + nu` (`buf = nu` on the first step), `d = buf`, or `nu + momentum * buf` with
      `nesterov=True`.
    - `variant="adamw"`: Adam moments of the gradient of `f` only (bias-corrected), with the weight decay *and the
      group-lasso subgradient applied decoupled*: `x <- x - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * x +
      lmbda * zeta)`. Adam's normalisation would otherwise rescale the penalty by the inverse gradient magnitude;
      decoupled, `lmbda` means the same thing whatever the scale of the loss, and `lmbda=0` with no half-space step is
      exactly `torch.optim.AdamW`.

    **Missing gradients.** Parameters whose `grad` is `None` are skipped, as in torch. A family none of whose
    members has a gradient is skipped entirely (it keeps its values, and its zero groups stay zero); a penalised
    member without gradient whose family-mates have one is updated with a zero gradient of `f` (so it still feels
    the penalty and takes part in the half-space test).

    **State.** Everything lives in `self.state[p]` (`"step"`, `"momentum_buffer"` or `"exp_avg"`/`"exp_avg_sq"`)
    and in the param groups: `"step_count"` (number of `step()` calls) and the ZIG membership of every parameter as
    lists parallel to `group["params"]`: `"zig_family"` (family index, `-1` outside the ZIGs), `"zig_dim"` and
    `"zig_num_groups"`. Membership is computed once at construction by matching tensors, so the optimizer survives
    Accelerate swapping the parameter objects and `state_dict()` / `load_state_dict()` resumes the identical
    trajectory. Parameter groups added later with `add_param_group` are treated as outside the ZIGs.

    Args:
        params (`Iterable`):
            Parameters or param-group dicts, as every torch optimizer accepts them (e.g. the Trainer's groups with
            and without weight decay). Every penalised member of `zigs` must be in it.
        zigs ([`ZIGSet`]):
            The zero-invariant groups, e.g. from [`build_zigs`].
        lr (`float`, *optional*, defaults to 1e-3):
            Learning rate; read from each param group at every step, so any LR scheduler works.
        lmbda (`float`, *optional*, defaults to 1e-3):
            Weight of the group-lasso term. A param group may override it (e.g. `0` to exempt its members).
        epsilon (`float`, *optional*, defaults to 0.0):
            Aggressiveness of the half-space projection, in `[0, 1)`; larger zeros more groups.
        init_steps (`int`, *optional*, defaults to 0):
            Number of `step()` calls of the initialization stage. Optimizer-wide.
        variant (`str`, *optional*, defaults to `"adamw"`):
            Base direction: `"adamw"` or `"sgd"`.
        momentum (`float`, *optional*, defaults to 0.9):
            Momentum of the `"sgd"` variant, in `[0, 1)`.
        nesterov (`bool`, *optional*, defaults to `False`):
            Nesterov momentum for the `"sgd"` variant.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`):
            Adam coefficients of the `"adamw"` variant, each in `[0, 1)`.
        eps (`float`, *optional*, defaults to 1e-8):
            Adam's denominator term.
        weight_decay (`float`, *optional*, defaults to 0.0):
            L2 penalty added to the gradient (`"sgd"`) or decoupled weight decay (`"adamw"`).
        max_group_sparsity (`float`, *optional*):
            Upper bound in `(0, 1]` on the fraction of zero groups over the whole ZIGSet. When a half-space step would
            exceed it, only the groups with the smallest `x~_g^T x_g / ||x_g||^2` (ranked globally) are zeroed.
            Optimizer-wide.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_oto import build_zigs
    >>> from hf_oto.optim import HSPG

    >>> config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    >>> model = BertForSequenceClassification(config)
    >>> optimizer = HSPG(model.parameters(), build_zigs(model), lr=1e-3, lmbda=1e-2, init_steps=100)
    >>> inputs = {"input_ids": torch.randint(0, 100, (2, 8)), "labels": torch.tensor([0, 1])}
    >>> model(**inputs).loss.backward()
    >>> optimizer.step()
    >>> optimizer.stage, optimizer.step_count
    ('initialization', 1)
    ```
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        zigs: ZIGSet,
        lr: float = 1e-3,
        *,
        lmbda: float = 1e-3,
        epsilon: float = 0.0,
        init_steps: int = 0,
        variant: str = "adamw",
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_group_sparsity: float | None = None,
    ):
        if not isinstance(zigs, ZIGSet):
            raise ValueError(
                f"`zigs` must be a ZIGSet (e.g. from `hf_oto.build_zigs(model)`); got {type(zigs).__name__}."
            )
        if variant not in VARIANTS:
            raise ValueError(f"Unknown variant {variant!r}; choose one of {VARIANTS}.")
        if not isinstance(init_steps, int) or isinstance(init_steps, bool) or init_steps < 0:
            raise ValueError(
                f"init_steps must be a non-negative integer (number of step() calls); got {init_steps!r}."
            )
        if max_group_sparsity is not None and not 0.0 < max_group_sparsity <= 1.0:
            raise ValueError(
                f"max_group_sparsity must be in (0, 1] (a fraction of the groups) or None; got {max_group_sparsity}."
            )
        defaults = dict(
            lr=lr,
            lmbda=lmbda,
            epsilon=epsilon,
            init_steps=init_steps,
            variant=variant,
            momentum=momentum,
            nesterov=nesterov,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            max_group_sparsity=max_group_sparsity,
        )
        _validate_hyperparameters(defaults, where="")
        param_groups = _materialise(params)
        super().__init__(param_groups, defaults)
        for index, group in enumerate(self.param_groups):
            _validate_hyperparameters(group, where=f" (param group {index})")
            for key in ("init_steps", "max_group_sparsity", "variant"):
                if group[key] != defaults[key]:
                    raise ValueError(
                        f"{key} is optimizer-wide: param group {index} sets {key}={group[key]!r} but the optimizer "
                        f"uses {defaults[key]!r}. Pass it to HSPG(...) instead of a param group."
                    )
        self.zigs = zigs
        self._assign_zig_membership(zigs)

    # ------------------------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        count = len(group["params"])
        group.setdefault("zig_family", [-1] * count)
        group.setdefault("zig_dim", [-1] * count)
        group.setdefault("zig_num_groups", [0] * count)
        group.setdefault("step_count", max((g.get("step_count", 0) for g in self.param_groups), default=0))

    def _assign_zig_membership(self, zigs: ZIGSet) -> None:
        # A map from tensor identity to position, used only here, at construction.
        position = {}
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                position[id(param)] = (group_index, param_index)
        missing = []
        for family_index, family in enumerate(zigs.families):
            for member in family.members:
                param = zigs.parameter(member.param_name)
                if id(param) not in position:
                    missing.append(member.param_name)
                    continue
                group_index, param_index = position[id(param)]
                group = self.param_groups[group_index]
                group["zig_family"][param_index] = family_index
                group["zig_dim"][param_index] = member.dim
                group["zig_num_groups"][param_index] = family.num_groups
        if missing:
            shown = ", ".join(repr(name) for name in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(
                f"The ZIGSet penalises parameters that are not in `params`: {shown}{more}. Pass all the model's "
                "trainable parameters to HSPG (e.g. `model.parameters()` or the Trainer's param groups), or build "
                "the ZIGSet with `exclude=` so that it leaves the frozen parts out."
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            count = len(group["params"])
            group.setdefault("lmbda", 1e-3)
            group.setdefault("epsilon", 0.0)
            group.setdefault("init_steps", 0)
            group.setdefault("variant", "adamw")
            group.setdefault("momentum", 0.9)
            group.setdefault("nesterov", False)
            group.setdefault("betas", (0.9, 0.999))
            group.setdefault("eps", 1e-8)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("max_group_sparsity", None)
            group.setdefault("zig_family", [-1] * count)
            group.setdefault("zig_dim", [-1] * count)
            group.setdefault("zig_num_groups", [0] * count)
            group.setdefault("step_count", 0)

    # ------------------------------------------------------------------------------------------------------------
    # Read-only helpers
    # ------------------------------------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Number of `step()` calls so far (restored by `load_state_dict`)."""
        return max(group["step_count"] for group in self.param_groups)

    @property
    def init_steps(self) -> int:
        return self.param_groups[0]["init_steps"]

    @property
    def stage(self) -> str:
        """`"initialization"` or `"half_space"`: the stage the *next* `step()` runs."""
        return HALF_SPACE if self.step_count >= self.init_steps else INITIALIZATION

    def group_sparsity(self) -> float:
        """Fraction of the ZIGSet's groups that are exactly zero now."""
        return self.zigs.group_sparsity()

    # ------------------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Performs one HSPG step.

        Args:
            closure (`Callable`, *optional*):
                Re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        count = self.step_count
        half_space = count >= self.init_steps
        if half_space and count == self.init_steps:
            logger.info(
                f"HSPG: half-space stage starts at step {count} (group sparsity so far: {self._sparsity():.3f})."
            )

        # Families with at least one gradient take part in this step.
        active: set[int] = set()
        for group in self.param_groups:
            for param, family in zip(group["params"], group["zig_family"]):
                if family >= 0 and param.grad is not None:
                    active.add(family)

        # Phase 0: group norms at x_k, batched per parameter and accumulated per family.
        members: list[_Member] = []
        family_squared: dict[int, torch.Tensor] = {}
        family_size: dict[int, int] = {}
        for group in self.param_groups:
            for param, family, dim, num_groups in zip(
                group["params"], group["zig_family"], group["zig_dim"], group["zig_num_groups"]
            ):
                if family < 0:
                    continue
                squared = _row_squared_norm(param.detach(), dim, num_groups)
                family_squared[family] = squared if family not in family_squared else family_squared[family] + squared
                family_size[family] = num_groups
                if family in active:
                    members.append(_Member(param, family, dim, num_groups, group, squared))
        inverse_norm = {
            family: torch.where(squared > 0, squared.rsqrt(), torch.zeros_like(squared))
            for family, squared in family_squared.items()
        }
        by_param = {id(member.param): member for member in members}  # local to this call

        # Phase A: base directions; parameters outside the ZIGs are updated right away.
        for group in self.param_groups:
            if group["variant"] == "adamw":
                self._adamw_directions(group, by_param, half_space)
            else:
                self._sgd_directions(group, by_param, inverse_norm)

        # Phase B: the half-space test, per family.
        keep: dict[int, torch.Tensor] = {}
        if half_space and members:
            keep = self._half_space_keep(members, family_squared, family_size, inverse_norm)

        # Phase C: update the penalised members, then zero the rows of the dropped groups (new and old) in the
        # parameters and in the optimizer state. Indices come from one `nonzero` over all families: the only host
        # syncs of a step, and the cost of the zeroing is proportional to the number of zero groups.
        zero_rows: dict[int, torch.Tensor] = {}
        if keep:
            families = sorted(keep)
            dropped = torch.cat([~keep[family] for family in families])
            counts = torch.stack([(~keep[family]).sum() for family in families]).tolist()
            if sum(counts):
                starts = torch.tensor([0] + [family_size[f] for f in families[:-1]]).cumsum(0).tolist()
                indices = dropped.nonzero().squeeze(1).split(counts)
                for family, start, index, size in zip(families, starts, indices, counts):
                    if size:
                        zero_rows[family] = index - start
        for member in members:
            self._apply(member, inverse_norm[member.family], zero_rows.get(member.family))

        for group in self.param_groups:
            group["step_count"] = count + 1
        return loss

    def _sparsity(self) -> float:
        try:
            return self.zigs.group_sparsity()
        except Exception:  # the model may have been swapped; logging must not fail
            return float("nan")

    def _gather(
        self, group: dict[str, Any], by_param: dict[int, _Member]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[_Member | None]]:
        params, grads, records = [], [], []
        for param in group["params"]:
            member = by_param.get(id(param))
            grad = param.grad
            if grad is None:
                if member is None:
                    continue
                grad = torch.zeros_like(param)
            if grad.is_sparse:
                raise RuntimeError("HSPG does not support sparse gradients.")
            params.append(param)
            grads.append(grad)
            records.append(member)
        return params, grads, records

    def _adamw_directions(self, group: dict[str, Any], by_param: dict[int, _Member], half_space: bool) -> None:
        params, grads, records = self._gather(group, by_param)
        if not params:
            return
        beta1, beta2 = group["betas"]
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for param in params:
            state = self.state[param]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        torch._foreach_add_(steps, 1.0)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_values = [step.item() for step in steps]  # CPU scalars, as torch's non-capturable AdamW
        bias_correction1 = [1 - beta1**step for step in step_values]
        bias_correction2_sqrt = [math.sqrt(1 - beta2**step) for step in step_values]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, bias_correction2_sqrt)
        torch._foreach_add_(denominators, eps)

        plain = [i for i, record in enumerate(records) if record is None]
        if plain:
            plain_params = [params[i] for i in plain]
            if weight_decay != 0:
                torch._foreach_mul_(plain_params, 1 - lr * weight_decay)
            torch._foreach_addcdiv_(
                plain_params,
                [exp_avgs[i] for i in plain],
                [denominators[i] for i in plain],
                [-lr / bias_correction1[i] for i in plain],
            )
        penalised = [i for i, record in enumerate(records) if record is not None]
        if penalised:
            # The half-space test needs d^T x: materialise the direction; otherwise update with addcdiv as torch.
            if half_space:
                directions = [torch.div(exp_avgs[i], denominators[i], out=denominators[i]) for i in penalised]
            for position, i in enumerate(penalised):
                record = records[i]
                if half_space:
                    record.direction = directions[position]
                else:
                    record.exp_avg, record.denominator = exp_avgs[i], denominators[i]
                record.direction_scale = 1.0 / bias_correction1[i]
                record.state = self.state[params[i]]

    def _sgd_directions(
        self, group: dict[str, Any], by_param: dict[int, _Member], inverse_norm: dict[int, torch.Tensor]
    ) -> None:
        params, grads, records = self._gather(group, by_param)
        if not params:
            return
        lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        lmbda, nesterov = group["lmbda"], group["nesterov"]
        # nu = grad + weight_decay * x (+ lmbda * zeta for penalised members)
        nus = list(grads)
        for i, record in enumerate(records):
            if record is not None:
                coefficient = lmbda * inverse_norm[record.family] + weight_decay
                grouped = _grouped(params[i], record.dim, record.num_groups)
                nus[i] = torch.addcmul(
                    _grouped(grads[i], record.dim, record.num_groups),
                    grouped,
                    _per_group(coefficient.to(params[i].dtype), grouped, record.dim),
                ).view_as(params[i])
        plain = [i for i, record in enumerate(records) if record is None]
        if weight_decay != 0 and plain:
            decayed = torch._foreach_add([grads[i] for i in plain], [params[i] for i in plain], alpha=weight_decay)
            for i, nu in zip(plain, decayed):
                nus[i] = nu
        if momentum != 0:
            new, old = [], []
            for i, param in enumerate(params):
                state = self.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.clone(nus[i]).detach()
                    new.append(i)
                else:
                    old.append(i)
            if old:
                buffers = [self.state[params[i]]["momentum_buffer"] for i in old]
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, [nus[i] for i in old])
            buffers = [self.state[param]["momentum_buffer"] for param in params]
            if nesterov:
                directions = torch._foreach_add(nus, buffers, alpha=momentum)
            else:
                directions = buffers
        else:
            directions = nus
        for param in params:
            state = self.state[param]
            state["step"] = state.get("step", torch.tensor(0.0, dtype=torch.float32)) + 1
        if plain:
            torch._foreach_add_([params[i] for i in plain], [directions[i] for i in plain], alpha=-lr)
        for i, record in enumerate(records):
            if record is not None:
                record.direction = directions[i]
                record.direction_scale = 1.0
                record.state = self.state[params[i]]

    def _half_space_keep(
        self,
        members: list[_Member],
        family_squared: dict[int, torch.Tensor],
        family_size: dict[int, int],
        inverse_norm: dict[int, torch.Tensor],
    ) -> dict[int, torch.Tensor]:
        """Per active family, a boolean `[num_groups]` mask of the groups that stay (non-zero) after this step."""
        # trial[g] = x~_g^T x_g = sum_m ||x_{m,g}||^2 - lr_m * d_{m,g}^T x_{m,g}; test[g] = trial[g] - eps_m ||x_m,g||^2
        trial: dict[int, torch.Tensor] = {}
        test: dict[int, torch.Tensor] = {}
        for member in members:
            group = member.group
            lr = group["lr"]
            dot = _row_dot(member.direction, member.param, member.dim, member.num_groups)
            if group["variant"] == "adamw":
                # d = scale * dir + (weight_decay + lmbda / ||x_g||) * x  (decoupled terms)
                coefficient = group["weight_decay"] + group["lmbda"] * inverse_norm[member.family]
                d_dot_x = member.direction_scale * dot + coefficient * member.squared_norm
            else:
                d_dot_x = dot
            member_trial = member.squared_norm - lr * d_dot_x
            member_test = member_trial - group["epsilon"] * member.squared_norm
            f = member.family
            trial[f] = member_trial if f not in trial else trial[f] + member_trial
            test[f] = member_test if f not in test else test[f] + member_test
        families = sorted(trial)
        nonzero = {f: family_squared[f] > 0 for f in families}
        candidates = {f: nonzero[f] & (test[f] < 0) for f in families}

        max_group_sparsity = self.param_groups[0]["max_group_sparsity"]
        if max_group_sparsity is not None:
            total = sum(family_size.values())
            zeros = sum((family_squared[f] == 0).sum() for f in family_squared)
            budget = (math.floor(max_group_sparsity * total + 1e-9) - zeros).clamp(min=0)
            flat_candidates = torch.cat([candidates[f] for f in families])
            ratio = torch.cat(
                [trial[f] / family_squared[f].clamp(min=torch.finfo(trial[f].dtype).tiny) for f in families]
            )
            score = torch.where(flat_candidates, ratio, torch.full_like(ratio, math.inf))
            order = torch.argsort(score, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel(), device=order.device)
            allowed = flat_candidates & (rank < budget)
            start = 0
            for f in families:
                candidates[f] = allowed[start : start + family_size[f]]
                start += family_size[f]
        return {f: nonzero[f] & ~candidates[f] for f in families}

    def _apply(self, member: _Member, inverse_norm: torch.Tensor, zero_rows: torch.Tensor | None) -> None:
        """x <- x - lr * d on one penalised member, then the zeroing of the groups `zero_rows`."""
        group, param, dim, num_groups = member.group, member.param, member.dim, member.num_groups
        lr = group["lr"]
        grouped = _grouped(param, dim, num_groups)
        if group["variant"] == "adamw":
            # x <- (1 - lr * weight_decay - lr * lmbda / ||x_g||) * x - lr / bc1 * dir
            base = 1 - lr * group["weight_decay"]
            if group["lmbda"] != 0:
                shrink = base - (lr * group["lmbda"]) * inverse_norm
                grouped.mul_(_per_group(shrink.to(param.dtype), grouped, dim))
            elif base != 1:
                param.mul_(base)
            if member.direction is None:
                param.addcdiv_(member.exp_avg, member.denominator, value=-lr * member.direction_scale)
            else:
                param.add_(member.direction, alpha=-lr * member.direction_scale)
        else:
            param.add_(member.direction, alpha=-lr)
        if zero_rows is not None:
            axis = 0 if dim == 0 else dim
            grouped.index_fill_(axis, zero_rows, 0)
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                buffer = member.state.get(key)
                if buffer is not None:
                    _grouped(buffer, dim, num_groups).index_fill_(axis, zero_rows, 0)


def _materialise(params: Any) -> list[dict[str, Any]] | list[torch.Tensor]:
    """Turns `params` into a list (of tensors or of group dicts with listed params), checking for duplicates."""
    if isinstance(params, torch.Tensor):
        raise ValueError("`params` must be an iterable of parameters or of param-group dicts, not a single tensor.")
    items = list(params)
    if len(items) == 0:
        raise ValueError("HSPG got an empty parameter list.")
    groups = [dict(item) for item in items] if isinstance(items[0], dict) else [{"params": items}]
    seen: dict[int, int] = {}
    for index, group in enumerate(groups):
        group_params = group["params"]
        group_params = [group_params] if isinstance(group_params, torch.Tensor) else list(group_params)
        group["params"] = group_params
        for param in group_params:
            if id(param) in seen:
                raise ValueError(
                    f"A parameter of shape {tuple(param.shape)} appears twice (param groups {seen[id(param)]} and "
                    f"{index}); every parameter may be passed once."
                )
            seen[id(param)] = index
    return groups if isinstance(items[0], dict) else groups[0]["params"]


def _validate_hyperparameters(values: dict[str, Any], where: str) -> None:
    if values["lr"] < 0:
        raise ValueError(f"Invalid learning rate{where}: {values['lr']}; it must be >= 0.")
    if values["lmbda"] < 0:
        raise ValueError(f"Invalid lmbda{where}: {values['lmbda']}; the group-lasso weight must be >= 0.")
    if not 0.0 <= values["epsilon"] < 1.0:
        raise ValueError(f"Invalid epsilon{where}: {values['epsilon']}; the half-space parameter must be in [0, 1).")
    if not 0.0 <= values["momentum"] < 1.0:
        raise ValueError(f"Invalid momentum{where}: {values['momentum']}; it must be in [0, 1).")
    if values["nesterov"] and values["momentum"] <= 0:
        raise ValueError(f"Nesterov momentum needs momentum > 0{where}; got momentum={values['momentum']}.")
    betas = values["betas"]
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"Invalid betas{where}: {betas}; pass two coefficients, each in [0, 1).")
    if values["eps"] < 0:
        raise ValueError(f"Invalid eps{where}: {values['eps']}; it must be >= 0.")
    if values["weight_decay"] < 0:
        raise ValueError(f"Invalid weight_decay{where}: {values['weight_decay']}; it must be >= 0.")
