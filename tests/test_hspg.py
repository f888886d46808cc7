"""Tests of the HSPG optimizer: validation, stages, the half-space rule, base steps, state, schedulers, Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_oto.optim import HSPG
from hf_oto.zig import ZIGFamily, ZIGMember, ZIGSet, build_zigs
from tests.tiny_models import tiny_inputs, tiny_model


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and do not stall when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    def __init__(self, hidden: int = 2, inputs: int = 2, outputs: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, outputs)
        self.head = nn.Linear(outputs, 1)  # outside the ZIGs


def mlp_zigs(mlp: MLP, bias: bool = True) -> ZIGSet:
    members = (ZIGMember("fc1.weight", 0), ZIGMember("fc1.bias", 0)) if bias else (ZIGMember("fc1.weight", 0),)
    family = ZIGFamily(
        name="fc1.neurons",
        kind="neurons",
        num_groups=mlp.fc1.out_features,
        members=members,
        dependents=(ZIGMember("fc2.weight", 1),),
    )
    return ZIGSet(mlp, [family])


def lm_loss(model: nn.Module, seed: int) -> torch.Tensor:
    inputs = tiny_inputs(model, batch_size=4, seq_length=8, seed=seed)
    if hasattr(model, "lm_head"):
        return model(**inputs, labels=inputs["input_ids"]).loss
    labels = torch.randint(0, model.config.num_labels, (4,), generator=torch.Generator().manual_seed(seed))
    return model(**inputs, labels=labels).loss


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0, callback=None) -> None:
    for step in range(start, start + steps):
        optimizer.zero_grad()
        lm_loss(model, seed=step % 4).backward()
        optimizer.step()
        if callback is not None:
            callback(step)


def trainer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The two groups the HF Trainer builds: with and without weight decay (biases and norms)."""
    no_decay = ("bias", "LayerNorm", "layernorm", "norm")
    decay = [p for n, p in model.named_parameters() if not any(key in n for key in no_decay)]
    rest = [p for n, p in model.named_parameters() if any(key in n for key in no_decay)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# Settings that zero groups within ~30 steps on the tiny models.
SETTINGS = {
    "adamw": dict(variant="adamw", lr=1e-2, lmbda=3.0),
    "sgd": dict(variant="sgd", lr=1e-2, lmbda=0.1, momentum=0.9),
}


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lmbda=-0.1), "lmbda"),
        (dict(epsilon=1.0), "epsilon"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(variant="adam"), "Unknown variant"),
        (dict(variant="sgd", momentum=1.0), "momentum"),
        (dict(variant="sgd", momentum=0.0, nesterov=True), "Nesterov"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(-0.1, 0.9)), "betas"),
        (dict(init_steps=-1), "init_steps"),
        (dict(init_steps=1.5), "init_steps"),
        (dict(max_group_sparsity=0.0), "max_group_sparsity"),
        (dict(max_group_sparsity=1.5), "max_group_sparsity"),
        (dict(max_family_sparsity=0.0), "max_family_sparsity"),
        (dict(max_family_sparsity=1.01), "max_family_sparsity"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(eps=-1.0), "eps"),
    ],
)
def test_invalid_arguments(kwargs, message):
    mlp = MLP()
    with pytest.raises(ValueError, match=message):
        HSPG(mlp.parameters(), mlp_zigs(mlp), **kwargs)


def test_invalid_zigs_and_params():
    mlp = MLP()
    zigs = mlp_zigs(mlp)
    with pytest.raises(ValueError, match="must be a ZIGSet"):
        HSPG(mlp.parameters(), zigs=[])
    with pytest.raises(ValueError, match="'fc1.bias'"):
        HSPG([p for n, p in mlp.named_parameters() if n != "fc1.bias"], zigs)
    with pytest.raises(ValueError, match="appears twice"):
        HSPG([{"params": list(mlp.parameters())}, {"params": [mlp.fc1.weight]}], zigs)
    with pytest.raises(ValueError, match="appears twice"):
        HSPG([mlp.fc1.weight, mlp.fc1.weight, mlp.fc1.bias], zigs)
    with pytest.raises(ValueError, match="param group 1"):
        HSPG([{"params": [mlp.fc1.weight]}, {"params": [mlp.fc1.bias], "lmbda": -1.0}], zigs)
    with pytest.raises(ValueError, match="optimizer-wide"):
        HSPG([{"params": [mlp.fc1.weight]}, {"params": [mlp.fc1.bias], "init_steps": 3}], zigs)


# ----------------------------------------------------------------------------------------------------------------
# The half-space rule, by hand
# ----------------------------------------------------------------------------------------------------------------
def _hand_problem(lmbda: float, epsilon: float = 0.0, momentum: float = 0.0):
    mlp = MLP(hidden=2)
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    optimizer = HSPG(
        mlp.parameters(),
        mlp_zigs(mlp, bias=False),
        lr=1.0,
        lmbda=lmbda,
        epsilon=epsilon,
        variant="sgd",
        momentum=momentum,
    )
    for param in mlp.parameters():
        param.grad = torch.zeros_like(param)
    return mlp, optimizer


def test_half_space_projection_by_hand():
    # group 0: x = (3, 4), ||x|| = 5, grad (1, 0), lmbda 0.5 -> d = (1 + 0.3, 0.4) -> x~ = (1.7, 3.6), x~.x = 19.5 > 0
    # group 1: x = (1, 0), grad (0.9, 0) -> d = (1.4, 0) -> x~ = (-0.4, 0), x~.x = -0.4 < 0 -> zero
    mlp, optimizer = _hand_problem(lmbda=0.5)
    mlp.fc1.weight.grad = torch.tensor([[1.0, 0.0], [0.9, 0.0]])
    mlp.fc2.weight.grad = torch.tensor([[0.5, -0.5]])
    fc2_before = mlp.fc2.weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(mlp.fc1.weight.detach(), torch.tensor([[1.7, 3.6], [0.0, 0.0]]))
    assert mlp.fc1.weight[1].eq(0).all()  # exactly zero
    # the dependent gets the plain step
    torch.testing.assert_close(mlp.fc2.weight.detach(), fc2_before - torch.tensor([[0.5, -0.5]]))
    assert optimizer.zigs.zero_mask().tolist() == [False, True]


def test_half_space_keeps_zero_groups_zero():
    mlp, optimizer = _hand_problem(lmbda=0.0, momentum=0.9)
    mlp.fc1.weight.grad = torch.tensor([[0.1, 0.1], [2.0, 0.0]])
    optimizer.step()
    assert optimizer.zigs.zero_mask().tolist() == [False, True]
    assert optimizer.state[mlp.fc1.weight]["momentum_buffer"][1].eq(0).all()
    for _ in range(3):  # gradients that would move the zero group away from zero
        mlp.fc1.weight.grad = torch.tensor([[0.1, 0.1], [-5.0, 3.0]])
        optimizer.step()
        assert mlp.fc1.weight[1].eq(0).all()
        assert optimizer.state[mlp.fc1.weight]["momentum_buffer"][1].eq(0).all()


def test_larger_epsilon_zeros_more():
    # group 0: x = (3, 4), grad (0, 2) -> x~ = (3, 2), x~.x / ||x||^2 = 17 / 25 = 0.68
    # group 1: x = (1, 0), grad (0.5, 0) -> x~ = (0.5, 0), x~.x / ||x||^2 = 0.5
    masks = []
    for epsilon in (0.0, 0.6, 0.7):
        mlp, optimizer = _hand_problem(lmbda=0.0, epsilon=epsilon)
        mlp.fc1.weight.grad = torch.tensor([[0.0, 2.0], [0.5, 0.0]])
        optimizer.step()
        masks.append(optimizer.zigs.zero_mask().tolist())
    assert masks == [[False, False], [False, True], [True, True]]


def test_initialization_stage_subgradient_by_hand():
    mlp, optimizer = _hand_problem(lmbda=0.5)
    optimizer.param_groups[0]["init_steps"] = 0  # (stays half-space) -> build a fresh one with init steps instead
    optimizer = HSPG(
        mlp.parameters(), mlp_zigs(mlp, bias=False), lr=1.0, lmbda=0.5, variant="sgd", momentum=0.0, init_steps=5
    )
    mlp.fc1.weight.grad = torch.tensor([[1.0, 0.0], [0.9, 0.0]])
    assert optimizer.stage == "initialization"
    optimizer.step()
    # no projection: group 1 becomes (-0.4, 0), not zero
    torch.testing.assert_close(mlp.fc1.weight.detach(), torch.tensor([[1.7, 3.6], [-0.4, 0.0]]))
    assert optimizer.step_count == 1


def test_member_split_along_dim_1():
    # the same problem as test_half_space_projection_by_hand, with the member stored transposed (groups = columns)
    module = nn.Module()
    module.w = nn.Parameter(torch.tensor([[3.0, 1.0], [4.0, 0.0]]))
    zigs = ZIGSet(module, [ZIGFamily(name="w.cols", kind="neurons", num_groups=2, members=(ZIGMember("w", 1),))])
    optimizer = HSPG(module.parameters(), zigs, lr=1.0, lmbda=0.5, variant="sgd", momentum=0.0)
    module.w.grad = torch.tensor([[1.0, 0.9], [0.0, 0.0]])
    optimizer.step()
    torch.testing.assert_close(module.w.detach(), torch.tensor([[1.7, 0.0], [3.6, 0.0]]))


def test_member_without_grad_is_treated_as_zero_grad():
    mlp = MLP(hidden=2)
    optimizer = HSPG(mlp.parameters(), mlp_zigs(mlp), lr=0.1, lmbda=0.5, variant="sgd", momentum=0.0, init_steps=10)
    mlp.fc1.weight.grad = torch.zeros_like(mlp.fc1.weight)
    bias = mlp.fc1.bias.detach().clone()
    head = mlp.head.weight.detach().clone()
    optimizer.step()
    # the bias has no grad but its family does: it still feels the penalty
    norms = (mlp.fc1.weight.detach().pow(2).sum(1) + bias.pow(2)).sqrt()  # (approximately the old norms)
    assert not torch.equal(mlp.fc1.bias.detach(), bias)
    assert (mlp.fc1.bias.detach().abs() <= bias.abs()).all()
    assert norms.gt(0).all()
    # a parameter outside the ZIGs without grad is skipped
    assert torch.equal(mlp.head.weight.detach(), head)


def test_closure():
    mlp = MLP()
    optimizer = HSPG(mlp.parameters(), mlp_zigs(mlp), lr=0.1, variant="sgd")

    def closure():
        optimizer.zero_grad()
        loss = mlp.head(mlp.fc2(torch.relu(mlp.fc1(torch.ones(3, 2))))).pow(2).mean()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and optimizer.step_count == 1


# ----------------------------------------------------------------------------------------------------------------
# Base steps equal torch's optimizers when the penalty is off
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant, reference",
    [
        ("adamw", lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.99), eps=1e-7)),
        ("sgd", lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9)),
        ("sgd-nesterov", lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9, nesterov=True)),
    ],
)
def test_lambda_zero_equals_torch_optimizer(variant, reference):
    model = tiny_model("bert")
    twin = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, lmbda=0.0, init_steps=100)
    if variant == "adamw":
        kwargs.update(variant="adamw", betas=(0.8, 0.99), eps=1e-7)
    else:
        kwargs.update(variant="sgd", momentum=0.9, nesterov=variant.endswith("nesterov"))
    optimizer = HSPG(trainer_param_groups(model, 0.1), build_zigs(model), **kwargs)
    expected = reference(trainer_param_groups(twin, 0.1))
    train(model, optimizer, 10)
    train(twin, expected, 10)
    for (name, param), other in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(param, other, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_parameters_outside_zigs_get_the_plain_step(variant):
    model = tiny_model("bert")
    zigs = build_zigs(model)
    twin = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    optimizer = HSPG(model.parameters(), zigs, lmbda=1.0, variant=variant, **kwargs)
    if variant == "adamw":
        reference = torch.optim.AdamW(twin.parameters(), **kwargs)
    else:
        reference = torch.optim.SGD(twin.parameters(), momentum=0.9, **kwargs)
    for net, opt in ((model, optimizer), (twin, reference)):  # one step from the same point, same gradients
        opt.zero_grad()
        lm_loss(net, seed=0).backward()
        opt.step()
    penalised = {member.param_name for family in zigs for member in family.members}
    changed = 0
    for (name, param), other in zip(model.named_parameters(), twin.parameters()):
        if name in penalised:
            changed += name.endswith("weight") and not torch.allclose(param, other)  # (biases start at 0)
        else:  # embeddings, norms, dependents (attention output, FFN down projection), classifier
            torch.testing.assert_close(param, other, rtol=1e-6, atol=1e-7, msg=name)
    assert changed == len([name for name in penalised if name.endswith("weight")])


# ----------------------------------------------------------------------------------------------------------------
# Stages on tiny transformers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_stages_on_tiny_models(name, variant):
    model = tiny_model(name)
    zigs = build_zigs(model)
    optimizer = HSPG(model.parameters(), zigs, init_steps=10, **SETTINGS[variant])
    assert optimizer.stage == "initialization"
    train(model, optimizer, 10)
    assert optimizer.step_count == 10 and optimizer.stage == "half_space"
    assert zigs.num_zero_groups() == 0  # the initialization stage never creates zeros

    masks = []
    train(model, optimizer, 25, start=10, callback=lambda step: masks.append(zigs.zero_mask()))
    assert masks[-1].any(), "the half-space stage should create zero groups"
    for before, after in zip(masks, masks[1:]):
        assert not (before & ~after).any(), "a zero group came back"
    for _, _, param in zigs.penalised_parameters():
        assert torch.isfinite(param).all()
    assert optimizer.group_sparsity() == zigs.group_sparsity()


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_sparsity_grows_with_lambda(variant):
    sparsity = []
    for factor in (0.0, 0.5, 1.0):
        model = tiny_model("bert")
        zigs = build_zigs(model)
        optimizer = HSPG(
            model.parameters(),
            zigs,
            init_steps=5,
            **{**SETTINGS[variant], "lmbda": factor * SETTINGS[variant]["lmbda"]},
        )
        train(model, optimizer, 25)
        sparsity.append(zigs.group_sparsity())
    assert sparsity[0] <= sparsity[1] <= sparsity[2]
    assert sparsity[2] > sparsity[0]


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_max_group_sparsity_is_never_exceeded(name):
    model = tiny_model(name)
    zigs = build_zigs(model)
    optimizer = HSPG(model.parameters(), zigs, init_steps=3, max_group_sparsity=0.25, **SETTINGS["sgd"])
    seen = []
    train(model, optimizer, 25, callback=lambda step: seen.append(zigs.group_sparsity()))
    assert max(seen) <= 0.25
    assert max(seen) >= 0.2  # the bound binds: without it these settings zero far more
    unbounded = tiny_model(name)
    other = HSPG(unbounded.parameters(), build_zigs(unbounded), init_steps=3, **SETTINGS["sgd"])
    train(unbounded, other, 25)
    assert other.group_sparsity() > 0.25


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_max_family_sparsity_keeps_every_family_partly_alive(variant):
    model = tiny_model("bert")
    zigs = build_zigs(model)
    optimizer = HSPG(model.parameters(), zigs, init_steps=3, max_family_sparsity=0.5, **SETTINGS[variant])
    worst = []
    train(model, optimizer, 25, callback=lambda step: worst.append(max(zigs.sparsity_by_family().values())))
    assert max(worst) <= 0.5
    zeros = {family.name: family.num_groups - kept for family, kept in zip(zigs.families, zigs.kept_groups().values())}
    full = {family.name for family in zigs.families if zeros[family.name] == family.num_groups // 2}
    assert len(full) >= 2  # the bound binds
    unbounded = tiny_model("bert")
    other_zigs = build_zigs(unbounded)
    train(unbounded, HSPG(unbounded.parameters(), other_zigs, init_steps=3, **SETTINGS[variant]), 25)
    assert max(other_zigs.sparsity_by_family().values()) > 0.5

    # A full family no longer feels the penalty: its members take the same step as with lmbda=0; a family below its
    # bound still feels it.
    twin = copy.deepcopy(model)
    twin_optimizer = HSPG(
        twin.parameters(), build_zigs(twin), init_steps=3, max_family_sparsity=0.5, **SETTINGS[variant]
    )
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for group in twin_optimizer.param_groups:
        group["lmbda"] = 0.0
    train(model, optimizer, 1, start=25)
    train(twin, twin_optimizer, 1, start=25)
    twin_params = dict(twin.named_parameters())
    same, different = 0, 0
    for family in zigs.families:
        for member in family.members:
            equal = torch.equal(zigs.parameter(member.param_name), twin_params[member.param_name])
            if family.name in full:
                assert equal, member.param_name
                same += 1
            elif zeros[family.name] < family.num_groups // 2:
                different += not equal
    assert same > 0 and different > 0


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_penalty_is_switched_off_once_the_bound_is_reached(variant):
    """Past the bound no group can be zeroed: the next step must equal the same step with lmbda=0."""
    model = tiny_model("bert")
    zigs = build_zigs(model)
    optimizer = HSPG(model.parameters(), zigs, init_steps=3, max_group_sparsity=0.25, **SETTINGS[variant])
    train(model, optimizer, 25)
    assert zigs.group_sparsity() == pytest.approx(0.25, abs=1 / len(zigs))
    zero_before = zigs.zero_mask()

    twin = copy.deepcopy(model)
    twin_optimizer = HSPG(
        twin.parameters(), build_zigs(twin), init_steps=3, max_group_sparsity=0.25, **SETTINGS[variant]
    )
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for group in twin_optimizer.param_groups:
        group["lmbda"] = 0.0
    train(model, optimizer, 1, start=25)
    train(twin, twin_optimizer, 1, start=25)
    for (name, param), twin_param in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(param, twin_param, rtol=0, atol=0, msg=name)
    assert torch.equal(zigs.zero_mask(), zero_before)


# ----------------------------------------------------------------------------------------------------------------
# State: state_dict round trip, schedulers, the Trainer's param groups
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["adamw", "sgd"])
@pytest.mark.parametrize("init_steps", [0, 30])
def test_state_dict_round_trip(variant, init_steps):
    model = tiny_model("llama")
    make = lambda net: HSPG(  # noqa: E731
        trainer_param_groups(net, 0.01),
        build_zigs(net),
        init_steps=init_steps,
        nesterov=variant == "sgd",
        **SETTINGS[variant],
    )
    optimizer = make(model)
    train(model, optimizer, 20)

    resumed = tiny_model("llama", seed=1)  # different weights, overwritten by the checkpoint
    resumed.load_state_dict(copy.deepcopy(model.state_dict()))
    resumed_optimizer = make(resumed)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed_optimizer.step_count == 20

    train(model, optimizer, 20, start=20)
    train(resumed, resumed_optimizer, 20, start=20)
    assert optimizer.group_sparsity() > 0
    for (name, param), other in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(param, other), name


def test_lr_scheduler_and_trainer_param_groups():
    model = tiny_model("bert")
    zigs = build_zigs(model)
    optimizer = HSPG(trainer_param_groups(model, 0.01), zigs, init_steps=2, **SETTINGS["sgd"])
    assert len(optimizer.param_groups) == 2
    # a ZIG family's weight and bias are in different param groups
    families = [set(g["zig_family"]) - {-1} for g in optimizer.param_groups]
    assert families[0] & families[1]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step < 3 else 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):  # lr = 0: nothing moves, nothing is zeroed (x~ = x)
        optimizer.zero_grad()
        lm_loss(model, seed=step).backward()
        optimizer.step()
        scheduler.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert optimizer.stage == "half_space"
    for step in range(25):
        optimizer.zero_grad()
        lm_loss(model, seed=step).backward()
        optimizer.step()
        scheduler.step()
    assert zigs.group_sparsity() > 0


def test_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert")
    zigs = build_zigs(model)
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 99, (8,), generator=generator), "labels": int(i % 3)} for i in range(32)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.01,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizer_cls_and_kwargs=(HSPG, {"zigs": zigs, "lr": 1e-2, "lmbda": 0.1, "variant": "sgd", "init_steps": 5}),
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, HSPG)
    assert len(optimizer.param_groups) == 2
    assert optimizer.step_count == 30
    assert zigs.group_sparsity() > 0


# ----------------------------------------------------------------------------------------------------------------
# The fused, blocked step against a by-definition implementation
# ----------------------------------------------------------------------------------------------------------------
class TwoFamilies(nn.Module):
    """fc1's 40 neurons (weight and bias, dim 0) and the 8 columns of `w` (dim 1), plus unpenalised parameters."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(30, 40)
        self.fc2 = nn.Linear(40, 5)
        self.w = nn.Parameter(torch.randn(6, 8))

    def loss(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hidden = self.fc2(torch.tanh(self.fc1(inputs)))
        return (hidden - target).pow(2).mean() + (inputs[:, :6] @ self.w).sin().mean()

    def zigs(self) -> ZIGSet:
        neurons = ZIGFamily(
            name="fc1.neurons",
            kind="neurons",
            num_groups=40,
            members=(ZIGMember("fc1.weight", 0), ZIGMember("fc1.bias", 0)),
            dependents=(ZIGMember("fc2.weight", 1),),
        )
        columns = ZIGFamily(name="w.columns", kind="neurons", num_groups=8, members=(ZIGMember("w", 1),))
        return ZIGSet(self, [neurons, columns])


def reference_step(model: TwoFamilies, zigs: ZIGSet, state: dict, cfg: dict, half_space: bool) -> None:
    """One HSPG step written from the definitions (whole tensors, per-group norms through `member_view`)."""
    lr, lmbda, wd, epsilon = cfg["lr"], cfg["lmbda"], cfg.get("weight_decay", 0.0), cfg.get("epsilon", 0.0)
    members = {member.param_name: (family, member.dim) for family in zigs for member in family.members}
    squared = {family.name: norm.square() for family, norm in zip(zigs.families, zigs.family_norms())}

    def per_group(name: str, values: torch.Tensor) -> torch.Tensor:
        family, dim = members[name]
        shape = [1] * zigs.parameter(name).dim()
        shape[dim] = family.num_groups
        return values.view(shape)

    trial: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        x, grad, s = param.detach(), param.grad, state.setdefault(name, {})
        penalty = torch.zeros_like(x)
        if name in members:
            family_name = members[name][0].name
            inverse = torch.where(squared[family_name] > 0, squared[family_name].rsqrt(), 0.0)
            penalty = lmbda * per_group(name, inverse) * x
        if cfg["variant"] == "sgd":
            nu = grad + wd * x + penalty
            momentum = cfg["momentum"]
            if momentum:
                s["buf"] = nu.clone() if "buf" not in s else momentum * s["buf"] + nu
                d = nu + momentum * s["buf"] if cfg.get("nesterov") else s["buf"]
            else:
                d = nu
        else:
            beta1, beta2 = cfg.get("betas", (0.9, 0.999))
            s["t"] = s.get("t", 0) + 1
            s["m"] = beta1 * s.get("m", torch.zeros_like(x)) + (1 - beta1) * grad
            s["v"] = beta2 * s.get("v", torch.zeros_like(x)) + (1 - beta2) * grad * grad
            m_hat, v_hat = s["m"] / (1 - beta1 ** s["t"]), s["v"] / (1 - beta2 ** s["t"])
            d = m_hat / (v_hat.sqrt() + cfg.get("eps", 1e-8)) + wd * x + penalty
        new = x - lr * d
        if name in members:
            family, dim = members[name]
            dot = family.member_view(new, dim).mul(family.member_view(x, dim)).sum(1)
            trial[family.name] = trial.get(family.name, 0) + dot
        param.data.copy_(new)
    if not half_space:
        return
    for family in zigs:
        fam_squared = squared[family.name]
        drop = (fam_squared == 0) | (trial[family.name] < epsilon * fam_squared)
        for member in family.members:
            keep = per_group(member.param_name, (~drop).float())
            zigs.parameter(member.param_name).data.mul_(keep)
            for key in ("buf", "m", "v"):
                if key in state[member.param_name]:
                    state[member.param_name][key].mul_(keep)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(variant="sgd", lr=0.05, lmbda=0.3, momentum=0.9),
        dict(variant="sgd", lr=0.05, lmbda=0.3, momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(variant="sgd", lr=0.1, lmbda=1.0, momentum=0.0, epsilon=0.1),
        dict(variant="adamw", lr=0.02, lmbda=3.0, weight_decay=0.01),
        dict(variant="adamw", lr=0.02, lmbda=3.0, eps=0.0),
    ],
    ids=["sgd", "sgd-nesterov-wd", "sgd-no-momentum-eps", "adamw-wd", "adamw-eps0"],
)
def test_blocked_step_matches_the_definition(cfg, monkeypatch):
    import hf_oto.optim.hspg as hspg_module

    monkeypatch.setattr(hspg_module, "_BLOCK", 64)  # fc1.weight: 2 rows per block, 20 blocks
    torch.manual_seed(0)
    model = TwoFamilies()
    twin = copy.deepcopy(model)
    zigs, twin_zigs = model.zigs(), twin.zigs()
    init_steps = 3
    kwargs = {k: v for k, v in cfg.items() if k != "variant"}
    optimizer = HSPG(model.parameters(), zigs, init_steps=init_steps, variant=cfg["variant"], **kwargs)
    state: dict = {}
    generator = torch.Generator().manual_seed(1)
    for step in range(15):
        if step == init_steps:  # two groups set to zero while their momentum / moments are not: they must stay zero
            for net in (zigs, twin_zigs):
                net.set_zero({"fc1.neurons": torch.isin(torch.arange(40), torch.tensor([3, 17]))})
        inputs, target = torch.randn(16, 30, generator=generator), torch.randn(16, 5, generator=generator)
        for net in (model, twin):
            net.zero_grad()
            net.loss(inputs, target).backward()
        optimizer.step()
        reference_step(twin, twin_zigs, state, cfg, half_space=step >= init_steps)
        assert torch.equal(zigs.zero_mask(), twin_zigs.zero_mask()), step
        for (name, param), other in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(param, other, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
            assert torch.isfinite(param).all()
    assert 2 < zigs.num_zero_groups() < 48, "the settings should drop some groups in the half-space stage"
    assert zigs.zero_mask()[[3, 17]].all()
