"""HSPG under faults: non-finite gradients, fp16 loss-scaling overflow, sharded parameters, and the property that
zero groups never come back, over random models, λ, ε, step counts, missing gradients and resumes."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hf_oto.optim import HSPG
from hf_oto.zig import ZIGFamily, ZIGMember, ZIGSet, build_zigs

from .test_hspg import MLP, lm_loss, mlp_zigs
from .tiny_models import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest)."""


def snapshot(model: nn.Module, optimizer: HSPG) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_same(model: nn.Module, optimizer: HSPG, expected: tuple[dict, dict]) -> None:
    weights, state = expected
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    actual = optimizer.state_dict()
    assert actual["param_groups"] == state["param_groups"]
    assert actual["state"].keys() == state["state"].keys()
    for index, values in state["state"].items():
        for key, tensor in values.items():
            assert torch.equal(actual["state"][index][key], tensor), (index, key)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite gradients
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["adamw", "sgd"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["penalised", "outside the groups"])
def test_a_non_finite_gradient_skips_the_whole_step(variant, bad, where, caplog):
    """In the half-space stage, with zero groups: the bad step changes nothing (weights, moments, zero groups, step
    count), warns, and the run then continues exactly as if the bad batch had never come."""
    torch.manual_seed(0)
    model = tiny_model("bert")
    twin = copy.deepcopy(model)
    options = dict(lr=1e-2, lmbda=3.0 if variant == "adamw" else 0.3, init_steps=3, variant=variant)
    optimizer = HSPG(model.parameters(), build_zigs(model), **options)
    twin_optimizer = HSPG(twin.parameters(), build_zigs(twin), **options)
    for step in range(12):
        for net, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            lm_loss(net, seed=step % 4).backward()
            opt.step()
    zero_groups = optimizer.zigs.num_zero_groups()
    assert optimizer.stage == "half_space" and zero_groups > 0

    before = snapshot(model, optimizer)
    optimizer.zero_grad()
    lm_loss(model, seed=7).backward()
    name = "bert.encoder.layer.1.intermediate.dense.weight" if where == "penalised" else "classifier.weight"
    model.get_parameter(name).grad[0, 0] = bad
    with caplog.at_level(logging.WARNING, logger="hf_oto.optim.hspg"):
        optimizer.step()
    assert "non-finite gradients (inf or NaN) in 1 of" in caplog.text and "the step is skipped" in caplog.text
    assert optimizer.skipped_steps == 1 and optimizer.step_count == 12
    before[1]["param_groups"][0]["skipped_steps"] = 1  # the only change: the counter
    assert_same(model, optimizer, before)
    assert optimizer.zigs.num_zero_groups() == zero_groups

    for step in range(12, 18):
        for net, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            lm_loss(net, seed=step % 4).backward()
            opt.step()
    for name, tensor in twin.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert optimizer.state_dict()["param_groups"][0]["skipped_steps"] == 1  # saved with the state: resumes keep it


def test_skipping_can_be_switched_off():
    mlp = MLP(hidden=4)
    optimizer = HSPG(mlp.parameters(), mlp_zigs(mlp), lr=0.1, skip_nonfinite=False)
    for param in mlp.parameters():
        param.grad = torch.ones_like(param)
    mlp.fc1.weight.grad[0, 0] = math.nan
    optimizer.step()
    assert optimizer.step_count == 1 and optimizer.skipped_steps == 0 and torch.isnan(mlp.fc1.weight).any()


def test_fp16_overflow_skipped_by_the_grad_scaler_leaves_hspg_untouched(fresh_accelerate_state):
    """Under Accelerate's fp16 path the `GradScaler` skips the step on overflow: HSPG's step count (its stage clock)
    does not advance, and the wrapper reports the skip (so the LR schedule does not advance either)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    mlp = MLP(hidden=4)
    hspg = HSPG(mlp.parameters(), mlp_zigs(mlp), lr=0.1, lmbda=0.1, init_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = AcceleratedOptimizer(hspg, device_placement=False, scaler=scaler)
    inputs = torch.randn(3, 2)

    def backward(overflow: bool) -> None:
        optimizer.zero_grad()
        scaler.scale(mlp.head(mlp.fc2(mlp.fc1(inputs))).sum()).backward()
        if overflow:
            mlp.fc1.weight.grad[0, 0] = math.inf

    backward(overflow=True)
    before = snapshot(mlp, hspg)
    optimizer.step()
    assert optimizer.step_was_skipped and scaler.get_scale() == 2.0**9
    assert_same(mlp, hspg, before)  # not even HSPG's own skip counter: the scaler never called step()
    backward(overflow=False)
    optimizer.step()
    assert not optimizer.step_was_skipped and hspg.step_count == 1 and hspg.stage == "half_space"


# ----------------------------------------------------------------------------------------------------------------
# Sharded parameters
# ----------------------------------------------------------------------------------------------------------------
def test_fsdp_sharded_parameters_are_refused(tmp_path):
    """FSDP2 (`fully_shard`, what Accelerate's FSDP plugin uses) turns parameters into DTensors, here in a real
    one-process gloo group: their local group norms would be those of a shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model("bert")
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        zigs = build_zigs(model)  # the names are unchanged; the tensors are not
        with pytest.raises(ValueError, match=r"sharded parameter \('bert\.encoder\.layer\.0\..*DTensor\).*DDP"):
            HSPG(model.parameters(), zigs)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Property: zero groups never come back
# ----------------------------------------------------------------------------------------------------------------
def random_zig_model(draw) -> tuple[nn.Module, ZIGSet]:
    """A small network with 1-3 group families: rows of a Linear (with its bias, the next Linear's columns as
    dependents), and optionally the input columns of a Linear (members along dim 1)."""
    width = draw(st.integers(2, 6))
    depth = draw(st.integers(1, 3))
    layers = nn.Sequential(*[nn.Linear(width if i else 3, width) for i in range(depth)], nn.Linear(width, 2))
    families = []
    for i in range(depth):
        if draw(st.booleans()) or i == 0:
            families.append(
                ZIGFamily(
                    f"{i}.rows",
                    "rows",
                    width,
                    (ZIGMember(f"{i}.weight", 0), ZIGMember(f"{i}.bias", 0)),
                    (ZIGMember(f"{i + 1}.weight", 1),),
                )
            )
    if draw(st.booleans()):  # the head's input columns as groups of their own (a member along dim 1)
        families.append(ZIGFamily("head.columns", "columns", width, (ZIGMember(f"{depth}.weight", 1),)))
    return layers, ZIGSet(layers, families)


def zero_state_rows(optimizer: HSPG, zigs: ZIGSet, mask: torch.Tensor) -> bool:
    """Whether the optimizer-state rows of the zero groups in `mask` are zero too (momentum, Adam moments)."""
    start = 0
    for family in zigs.families:
        rows = mask[start : start + family.num_groups]
        start += family.num_groups
        for member in family.members:
            state = optimizer.state.get(zigs.parameter(member.param_name), {})
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if state.get(key) is not None:
                    view = family.member_view(state[key], member.dim)
                    if view[rows].abs().sum() != 0:
                        return False
    return True


@st.composite
def runs(draw):
    model, zigs = random_zig_model(draw)
    variant = draw(st.sampled_from(["adamw", "sgd"]))
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9])) if variant == "sgd" else 0.9
    options = dict(
        lr=draw(st.floats(1e-3, 0.5)),
        lmbda=draw(st.sampled_from([0.0, 0.01, 0.3, 3.0, 30.0])),
        epsilon=draw(st.floats(0.0, 0.99)),
        init_steps=draw(st.integers(0, 4)),
        variant=variant,
        momentum=momentum,
        nesterov=variant == "sgd" and momentum > 0 and draw(st.booleans()),
        weight_decay=draw(st.sampled_from([0.0, 0.05])),
        max_group_sparsity=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
    )
    # Per step: a normal step, a step with a non-finite gradient, one where a parameter has no gradient, or a resume
    # from `state_dict()` into a new optimizer.
    events = draw(st.lists(st.sampled_from(["step"] * 6 + ["nan", "missing", "resume"]), min_size=1, max_size=20))
    prezeroed = draw(st.lists(st.booleans(), min_size=len(zigs), max_size=len(zigs)))
    return model, zigs, options, events, torch.tensor(prezeroed), draw(st.integers(0, 2**16))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(runs())
def test_zero_groups_never_come_back(run):
    model, zigs, options, events, prezeroed, seed = run
    generator = torch.Generator().manual_seed(seed)
    optimizer = HSPG(model.parameters(), zigs, **options)
    zigs.set_zero(prezeroed)  # groups may start at zero (e.g. from an earlier pruning-aware run)
    previous = None
    for event in events:
        if event == "resume":
            state = copy.deepcopy(optimizer.state_dict())
            optimizer = HSPG(model.parameters(), zigs, **options)
            optimizer.load_state_dict(state)
            continue
        half_space = optimizer.stage == "half_space"
        before = zigs.zero_mask()
        inputs = torch.randn(8, 3, generator=generator)
        optimizer.zero_grad()
        model(inputs).pow(2).mean().backward()
        if event == "nan":
            next(model.parameters()).grad.view(-1)[0] = math.nan
        elif event == "missing":
            list(model.parameters())[-1].grad = None
        optimizer.step()
        after = zigs.zero_mask()
        if half_space:
            assert bool((after | ~before).all()), f"a zero group came back: {before.tolist()} -> {after.tolist()}"
            assert zero_state_rows(optimizer, zigs, after)
        if event == "nan":
            assert torch.equal(after, before)
        previous = after
    if options["max_group_sparsity"] is not None and previous is not None and optimizer.stage == "half_space":
        # Newly zeroed groups respect the bound (groups already zero at the start may exceed it).
        allowed = max(int(prezeroed.sum()), math.floor(options["max_group_sparsity"] * len(zigs) + 1e-9))
        assert int(previous.sum()) <= allowed


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["bert", "distilbert", "llama", "qwen2", "electra"]),
    variant=st.sampled_from(["adamw", "sgd"]),
    lmbda=st.sampled_from([0.5, 3.0, 20.0]),
    epsilon=st.floats(0.0, 0.9),
    steps=st.integers(4, 10),
)
def test_zero_groups_never_come_back_in_transformers(kind, variant, lmbda, epsilon, steps):
    model = tiny_model(kind).train()
    zigs = build_zigs(model)
    optimizer = HSPG(model.parameters(), zigs, lr=1e-2, lmbda=lmbda, epsilon=epsilon, init_steps=2, variant=variant)
    zigs.set_zero(zigs.random_zero_mask(0.2, generator=torch.Generator().manual_seed(steps)))
    for step in range(steps):
        half_space = optimizer.stage == "half_space"
        before = zigs.zero_mask()
        optimizer.zero_grad()
        lm_loss(model, seed=step).backward()
        optimizer.step()
        if half_space:
            after = zigs.zero_mask()
            assert bool((after | ~before).all()), f"{kind}: a zero group came back at step {step}"
