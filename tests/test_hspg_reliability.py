"""HSPG's state never changes what is optimized, and no setting gives silently wrong numbers: resuming only from HSPG
state of the same groups, finite hyper-parameters, float16 / bfloat16 parameters, frozen parameters."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from hf_oto import build_zigs
from hf_oto.optim import HSPG, PruningTarget
from hf_oto.trainer import hspg_param_groups
from hf_oto.training_args import OTOTrainingArguments
from tests.test_hspg import SETTINGS, lm_loss, single_thread, train, trainer_param_groups  # noqa: F401 (autouse)
from tests.test_hspg_target import target_hspg
from tests.tiny_models import tiny_model


@pytest.fixture
def hspg_warnings(caplog):
    """The warnings of `hf_oto.optim.hspg` so far."""
    caplog.set_level(logging.WARNING, logger="hf_oto.optim.hspg")
    return lambda: [
        record.getMessage()
        for record in caplog.records
        if record.name == "hf_oto.optim.hspg" and record.levelno >= logging.WARNING
    ]


def finite(model: torch.nn.Module) -> bool:
    return all(bool(param.isfinite().all()) for param in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# load_state_dict: membership and settings come from this run; foreign state is refused
# ----------------------------------------------------------------------------------------------------------------
def trained_state(variant: str = "adamw", steps: int = 3, **kwargs) -> tuple[torch.nn.Module, HSPG]:
    model = tiny_model("bert")
    optimizer = HSPG(trainer_param_groups(model, 0.01), build_zigs(model), **{**SETTINGS[variant], **kwargs})
    train(model, optimizer, steps)
    return model, optimizer


@pytest.mark.parametrize(
    "torch_optimizer, name",
    [
        (torch.optim.AdamW, "torch.optim.AdamW"),
        (torch.optim.Adam, "torch.optim.Adam"),
        (torch.optim.SGD, "torch.optim.SGD"),
    ],
)
def test_state_of_another_optimizer_is_refused(torch_optimizer, name):
    model = tiny_model("bert")
    other = torch_optimizer(trainer_param_groups(model, 0.01), lr=1e-3)
    train(model, other, 2)
    optimizer = HSPG(trainer_param_groups(model, 0.01), build_zigs(model))
    with pytest.raises(ValueError, match=rf"saved by {name}.*not HSPG.*delete `optimizer.pt`"):
        optimizer.load_state_dict(other.state_dict())
    assert optimizer.step_count == 0 and not optimizer.state


@pytest.mark.parametrize(
    "zig_kwargs, message",
    [
        (dict(exclude=["*.layer.0.*"]), "'bert.encoder.layer.0.attention.self.query.weight' is a member of family 0"),
        (dict(families=["heads"]), "other zero-invariant groups: 'bert.encoder.layer.0.intermediate.dense.weight'"),
    ],
)
def test_state_for_other_groups_is_refused(zig_kwargs, message):
    model, saved = trained_state()
    optimizer = HSPG(trainer_param_groups(model, 0.01), build_zigs(model, **zig_kwargs), **SETTINGS["adamw"])
    membership = [list(group["zig_family"]) for group in optimizer.param_groups]
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(saved.state_dict())
    assert [list(group["zig_family"]) for group in optimizer.param_groups] == membership


def test_state_for_other_parameters_mode_or_variant_is_refused():
    model, saved = trained_state()
    state = saved.state_dict()
    zigs = build_zigs(model)
    one_group = HSPG(model.parameters(), zigs, **SETTINGS["adamw"])
    with pytest.raises(ValueError, match="has 2 param groups, this HSPG has 1"):
        one_group.load_state_dict(state)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    fewer = HSPG(hspg_param_groups(model, 0.01), zigs, **SETTINGS["adamw"])
    with pytest.raises(ValueError, match="Param group 0 .* has 23 parameters, this HSPG's has 22"):
        fewer.load_state_dict(state)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    sgd = HSPG(trainer_param_groups(model, 0.01), zigs, **SETTINGS["sgd"])
    with pytest.raises(ValueError, match="saved with variant='adamw'; this run uses variant='sgd'"):
        sgd.load_state_dict(state)
    _, target = target_hspg(model, zigs)
    with pytest.raises(ValueError, match="saved with mode='paper'; this run uses mode='target'"):
        target.load_state_dict(HSPG(model.parameters(), zigs).state_dict())
    bigger = copy.deepcopy(state)
    first = bigger["param_groups"][0]["params"][0]  # the word embeddings
    bigger["state"][first]["exp_avg"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match=r"exp_avg of shape \(5, 32\) for 'bert.embeddings.word_embeddings.weight'"):
        HSPG(trainer_param_groups(model, 0.01), zigs, **SETTINGS["adamw"]).load_state_dict(bigger)


def test_settings_come_from_this_run_and_the_trajectory_from_the_checkpoint(hspg_warnings):
    model, saved = trained_state(lmbda=1.0, init_steps=10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(saved, lambda step: 0.5)
    state = copy.deepcopy(saved.state_dict())
    optimizer = HSPG(trainer_param_groups(model, 0.01), build_zigs(model), **{**SETTINGS["adamw"], "lmbda": 2.0})
    optimizer.load_state_dict(state)
    assert optimizer.step_count == 3 and optimizer.init_steps == 0
    for group, old in zip(optimizer.param_groups, saved.param_groups):
        assert group["lmbda"] == 2.0 and group["lr"] == old["lr"] == 5e-3 and group["initial_lr"] == 1e-2
    pooler = model.bert.pooler.dense.weight
    index = [id(param) for group in optimizer.param_groups for param in group["params"]].index(id(pooler))
    assert torch.equal(optimizer.state[pooler]["exp_avg"], state["state"][index]["exp_avg"])
    (message,) = hspg_warnings()
    assert "this run's settings" in message and "init_steps=0 (checkpoint: 10)" in message
    assert "lmbda=2.0 (checkpoint: 1.0)" in message
    del scheduler


# ----------------------------------------------------------------------------------------------------------------
# Non-finite hyper-parameters
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["lr", "lmbda", "epsilon", "momentum", "eps", "weight_decay", "betas"])
def test_non_finite_hyperparameters_are_refused(name, bad):
    model = tiny_model("bert")
    zigs = build_zigs(model)
    value = (0.9, bad) if name == "betas" else bad
    label = "betas[1]" if name == "betas" else name
    with pytest.raises(ValueError, match=rf"{re_escape(label)} must be a finite number; got"):
        HSPG(model.parameters(), zigs, **{name: value})
    with pytest.raises(ValueError, match=rf"{re_escape(label)} \(param group 0\) must be a finite number"):
        HSPG([{"params": list(model.parameters()), name: value}], zigs)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_target_mode_knobs_are_refused(bad):
    model = tiny_model("bert")
    for kwargs in (dict(flops=bad), dict(params=bad), dict(max_kind_sparsity={"heads": bad})):
        with pytest.raises(ValueError, match="must be a fraction"):
            PruningTarget(**kwargs)
    with pytest.raises(ValueError, match="max_family_sparsity must be in"):
        target_hspg(model, max_family_sparsity=bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize(
    "name, mode",
    [
        ("oto_lambda", "paper"),
        ("oto_epsilon", "paper"),
        ("oto_init_fraction", "paper"),
        ("oto_momentum", "paper"),
        ("oto_max_group_sparsity", "paper"),
        ("oto_max_family_sparsity", "paper"),
        ("oto_target_flops", "target"),
        ("oto_target_params", "target"),
        ("oto_pruning_fraction", "target"),
    ],
)
def test_non_finite_oto_arguments_are_refused(tmp_path, name, mode, bad):
    with pytest.raises(ValueError, match=name.replace("oto_target_", "")):
        OTOTrainingArguments(output_dir=str(tmp_path), oto_mode=mode, report_to="none", use_cpu=True, **{name: bad})


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_a_non_finite_lr_set_later_is_refused_by_step(variant):
    model = tiny_model("bert")
    optimizer = HSPG(trainer_param_groups(model, 0.01), build_zigs(model), **SETTINGS[variant])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 2 else math.nan)
    for step in range(2):
        optimizer.zero_grad()
        lm_loss(model, seed=step).backward()
        optimizer.step()
        scheduler.step()
    before = copy.deepcopy(model.state_dict())
    optimizer.zero_grad()
    lm_loss(model, seed=2).backward()
    with pytest.raises(
        ValueError, match="lr of param group 0 at step 2 .nothing was updated. must be a finite number"
    ):
        optimizer.step()
    assert optimizer.step_count == 2
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# float16 / bfloat16
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_low_precision_models_stay_finite_and_zero_groups_stay_zero(dtype, variant):
    model = tiny_model("bert").to(dtype)
    zigs = build_zigs(model)
    zeroed = zigs.random_zero_mask(0.3, generator=torch.Generator().manual_seed(0))
    zigs.set_zero(zeroed)
    optimizer = HSPG(model.parameters(), zigs, **{**SETTINGS[variant], "lmbda": 0.5})
    for step in range(8):
        optimizer.zero_grad()
        loss = lm_loss(model, seed=step % 4)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and finite(model), step
        assert bool(zigs.zero_mask()[zeroed].all()), step
    assert optimizer.skipped_steps == 0 and zigs.num_zero_groups() >= int(zeroed.sum())
    if variant == "adamw":  # the moments are float32
        assert all(state["exp_avg_sq"].dtype == torch.float32 for state in optimizer.state.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_adamw_matches_torch_fused_adamw_and_stays_finite(dtype):
    """lmbda = 0 outside the half-space stage is AdamW. With zero and tiny gradient rows, torch's foreach AdamW turns a
    float16 parameter into NaN (eps = 1e-8 rounds to 0); HSPG computes, like torch's fused AdamW, in float32."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(6, 8, generator=generator)
    grads = [torch.randn(6, 8, generator=generator) for _ in range(5)]
    for grad in grads:
        grad[0] = 0.0  # a zero gradient row
    params = {key: torch.nn.Parameter(start.to(dtype)) for key in ("hspg", "fused", "foreach")}
    mlp = torch.nn.Linear(8, 6)
    zigs = build_zigs_for_linear(mlp)
    optimizers = {
        "hspg": HSPG([params["hspg"], *mlp.parameters()], zigs, lr=1e-2, lmbda=0.0, init_steps=100, weight_decay=0.1),
        "fused": torch.optim.AdamW([params["fused"]], lr=1e-2, weight_decay=0.1, fused=True),
        "foreach": torch.optim.AdamW([params["foreach"]], lr=1e-2, weight_decay=0.1, foreach=True),
    }
    for grad in grads:
        for key, optimizer in optimizers.items():
            params[key].grad = grad.to(dtype)
            optimizer.step()
    assert bool(params["hspg"].isfinite().all())
    torch.testing.assert_close(params["hspg"], params["fused"], rtol=0, atol=2e-2)
    if dtype == torch.float16:
        assert not bool(params["foreach"].isfinite().all())  # what HSPG no longer does


def build_zigs_for_linear(linear: torch.nn.Linear):
    from hf_oto.zig import ZIGFamily, ZIGMember, ZIGSet

    family = ZIGFamily(name="rows", kind="neurons", num_groups=6, members=(ZIGMember("weight", 0),))
    return ZIGSet(linear, [family])


def test_autocast_bfloat16_training_stays_finite():
    model = tiny_model("bert")
    zigs = build_zigs(model)
    optimizer = HSPG(model.parameters(), zigs, **SETTINGS["adamw"])
    for step in range(25):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, seed=step % 4)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and finite(model), step
    assert zigs.num_zero_groups() > 0 and optimizer.skipped_steps == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_low_precision_resume_is_bit_identical(dtype):
    model = tiny_model("bert").to(dtype)
    make = lambda net: HSPG(trainer_param_groups(net, 0.01), build_zigs(net), **SETTINGS["adamw"])  # noqa: E731
    optimizer = make(model)
    train(model, optimizer, 4)
    resumed = copy.deepcopy(model)
    resumed_optimizer = make(resumed)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert all(state["exp_avg"].dtype == torch.float32 for state in resumed_optimizer.state.values())
    train(model, optimizer, 4, start=4)
    train(resumed, resumed_optimizer, 4, start=4)
    for (name, param), other in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(param, other), name


# ----------------------------------------------------------------------------------------------------------------
# Frozen parameters are never changed
# ----------------------------------------------------------------------------------------------------------------
QUERY = "bert.encoder.layer.0.attention.self.query.weight"
HEADS_0 = "bert.encoder.layer.0.heads"


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
@pytest.mark.parametrize("passed", ["all parameters", "trainable parameters"])
def test_a_frozen_member_is_never_changed_and_its_family_never_zeroed(variant, passed, hspg_warnings):
    model = tiny_model("bert")
    frozen = model.get_parameter(QUERY)
    frozen.requires_grad_(False)
    zigs = build_zigs(model)
    params = model.parameters() if passed == "all parameters" else hspg_param_groups(model, 0.01)
    optimizer = HSPG(params, zigs, **SETTINGS[variant])
    before = frozen.detach().clone()
    key = model.get_parameter(QUERY.replace("query", "key"))
    key_before = key.detach().clone()
    train(model, optimizer, 30)
    frozen.grad = torch.ones_like(frozen)  # a stale gradient does not move it either
    optimizer.step()
    assert torch.equal(frozen, before)
    assert not torch.equal(key, key_before)  # its family's trainable members train (plain step)
    assert zigs.sparsity_by_family()[HEADS_0] == 0.0
    assert zigs.num_zero_groups() > 0  # the other families do get zero groups
    messages = [message for message in hspg_warnings() if "frozen member" in message]
    assert len(messages) == 1 and HEADS_0 in messages[0]


def test_a_member_frozen_during_training_is_not_changed_from_then_on():
    model = tiny_model("bert")
    zigs = build_zigs(model)
    optimizer = HSPG(model.parameters(), zigs, **SETTINGS["adamw"])
    train(model, optimizer, 5)
    frozen = model.get_parameter(QUERY)
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    train(model, optimizer, 25, start=5)
    assert torch.equal(frozen, before)
    assert zigs.num_zero_groups() > 0


def test_target_mode_leaves_a_family_with_a_frozen_member_alone():
    model = tiny_model("bert")
    frozen = model.get_parameter(QUERY)
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    zigs = build_zigs(model)
    optimizer = HSPG(
        hspg_param_groups(model, 0.0),
        zigs,
        mode="target",
        lr=1e-3,
        init_steps=4,
        pruning_steps=8,
        pruning_periods=4,
        target=PruningTarget(flops=0.5),
        cost_seq_length=16,
    )
    train(model, optimizer, 14)
    assert torch.equal(frozen, before)
    assert zigs.sparsity_by_family()[HEADS_0] == 0.0
    assert zigs.num_zero_groups() > 0 and optimizer.kept_fraction()["flops"] <= 0.5 + 1e-6
