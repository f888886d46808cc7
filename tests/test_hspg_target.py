"""HSPG's target mode: the stated FLOPs / parameter target is reached with exact zeros, the choice follows the loss
(not the norms), ramps do not depend on a group's size, caps and floors hold, and resume is bit-identical."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_oto import build_zigs
from hf_oto.costs import GroupCosts
from hf_oto.flops import count_flops, count_parameters
from hf_oto.optim import HSPG, PruningTarget
from hf_oto.optim.target import Schedule, parse_kind_caps
from hf_oto.pruning import prune_zero_groups
from hf_oto.report import prune_and_measure
from tests.test_hspg import lm_loss, single_thread, train  # noqa: F401 (single_thread: autouse fixture)
from tests.tiny_convnets import images, tiny_vgg
from tests.tiny_models import tiny_inputs, tiny_model


SEQ = 16


def target_hspg(model, zigs=None, *, init_steps=4, pruning_steps=8, periods=4, target=None, **kwargs):
    zigs = zigs if zigs is not None else build_zigs(model)
    optimizer = HSPG(
        model.parameters(),
        zigs,
        lr=kwargs.pop("lr", 1e-3),
        mode="target",
        init_steps=init_steps,
        pruning_steps=pruning_steps,
        pruning_periods=periods,
        target=target or PruningTarget(flops=0.5),
        cost_seq_length=SEQ,
        **kwargs,
    )
    return zigs, optimizer


def largest_group_fraction(costs: GroupCosts) -> float:
    return max(costs.per_group("flops").values()) / costs.dense["flops"]


@pytest.mark.parametrize("name", ["bert", "llama", "distilbert"])
@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_target_is_reached_with_exact_zeros_and_exact_pruning(name, variant):
    torch.manual_seed(0)
    model = tiny_model(name)
    zigs, optimizer = target_hspg(model, variant=variant)
    dense_flops = count_flops(model, seq_length=SEQ)
    train(model, optimizer, steps=14)
    assert optimizer.schedule.end == 12
    kept = optimizer.kept_fraction()
    # Every selected group is exactly zero by the end of the window; the cost is at the target, within one group.
    costs = optimizer._selection.costs
    assert 0.5 - largest_group_fraction(costs) - 1e-9 <= kept["flops"] <= 0.5 + 1e-9
    zero = zigs.zero_mask()
    assert int(zero.sum()) > 0
    # every family keeps at least one group (the default floor)
    assert all(kept_groups >= 1 for kept_groups in zigs.kept_groups().values())
    model.eval()
    inputs = tiny_inputs(model, batch_size=3, seq_length=SEQ, seed=11)
    with torch.no_grad():
        reference = model(**inputs).logits
    slim, report = prune_and_measure(model, zigs, seq_length=SEQ)
    with torch.no_grad():
        torch.testing.assert_close(slim(**inputs).logits, reference, rtol=0, atol=1e-5)
    assert count_flops(slim, seq_length=SEQ) / dense_flops == pytest.approx(kept["flops"], abs=1e-9)


def test_parameter_target_and_both_targets():
    torch.manual_seed(0)
    model = tiny_model("bert")
    zigs, optimizer = target_hspg(model, target=PruningTarget(flops=0.7, params=0.8))
    train(model, optimizer, steps=12)
    kept = optimizer.kept_fraction()
    assert kept["flops"] <= 0.7 + 1e-9 and kept["params"] <= 0.8 + 1e-9
    slim, _ = prune_and_measure(model.eval(), zigs, seq_length=SEQ)
    assert count_parameters(slim) / optimizer._selection.costs.dense["params"] == pytest.approx(kept["params"])


def test_selection_follows_the_loss_not_the_norm():
    """FFN rows whose down-projection columns are zero do nothing, however large their own weights: they must go
    first, although magnitude pruning would keep them (they have the largest norms)."""
    torch.manual_seed(0)
    model = tiny_model("bert")
    layer = model.bert.encoder.layer[0]
    useless = torch.arange(0, 37, 2)  # 19 rows
    with torch.no_grad():
        layer.output.dense.weight[:, useless] = 0
        layer.intermediate.dense.weight[useless] *= 50
    zigs = build_zigs(model, families=("ffn",))
    family = zigs.families[0]
    zigs, optimizer = target_hspg(model, zigs, init_steps=3, pruning_steps=3, periods=1, lr=0.0)
    costs = optimizer._selection.costs
    # a target that removes exactly 10 rows of layer 0's FFN
    removed = [0] * len(zigs.families)
    removed[0] = 10
    optimizer.target.flops = costs.flops(removed) / costs.dense["flops"] + 1e-12
    train(model, optimizer, steps=6)
    zero_rows = zigs.family_zero_masks()[family.name].nonzero().squeeze(1)
    assert len(zero_rows) == 10
    assert set(zero_rows.tolist()) <= set(useless.tolist())
    assert all(int(mask.sum()) == 0 for name, mask in zigs.family_zero_masks().items() if name != family.name)


def test_ramp_zeroes_a_selected_group_in_one_period_whatever_its_norm():
    torch.manual_seed(0)
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight.mul_(1000)  # huge groups: still one period
    zigs, optimizer = target_hspg(model, init_steps=2, pruning_steps=5, periods=1)
    norms_at = {}

    def record(step):
        norms_at[step] = torch.cat(list(zigs.family_norms()))

    for step in range(8):
        optimizer.zero_grad()
        lm_loss(model, seed=step).backward()
        optimizer.step()
        record(step)
    state_start = torch.cat(
        [optimizer._selection.family_state(f)["oto_ramp_start"] for f in range(len(zigs.families))]
    )
    selected = state_start >= 0
    assert int(selected.sum()) > 0 and bool((state_start[selected] == 2).all())
    # radius after the k-th ramp step (k = 0..4) is at most (4 - k) / 5 of the norm at selection; zero at k = 4
    initial = torch.cat([optimizer._selection.family_state(f)["oto_ramp_norm"] for f in range(len(zigs.families))])
    for k in range(5):
        bound = initial[selected] * (4 - k) / 5
        assert bool((norms_at[2 + k][selected] <= bound * (1 + 1e-5) + 1e-7).all())
    assert bool((norms_at[6][selected] == 0).all()) and bool((norms_at[7][selected] == 0).all())
    assert bool((norms_at[7][~selected] > 0).all())  # unselected groups are not penalised away


def test_kind_caps_and_family_floor():
    torch.manual_seed(0)
    model = tiny_model("bert")
    target = PruningTarget(flops=0.3, max_kind_sparsity={"heads": 0.25}, min_kept_per_family=2)
    zigs, optimizer = target_hspg(model, target=target)
    train(model, optimizer, steps=12)
    masks = zigs.family_zero_masks()
    heads = [family for family in zigs.families if family.kind == "heads"]
    zero_heads = sum(int(masks[family.name].sum()) for family in heads)
    assert zero_heads <= math.floor(0.25 * sum(family.num_groups for family in heads))
    assert all(family.num_groups - int(masks[family.name].sum()) >= 2 for family in zigs.families)


def test_unreachable_target_warns_and_keeps_the_floor(caplog):
    torch.manual_seed(0)
    model = tiny_model("bert")
    target = PruningTarget(flops=0.05, max_kind_sparsity={"heads": 0.0, "ffn": 0.5})
    zigs, optimizer = target_hspg(model, target=target)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level("WARNING"):
        train(model, optimizer, steps=12)
    assert "cannot be reached" in caplog.text
    assert zigs.sparsity_by_kind()["heads"] == 0.0
    assert zigs.sparsity_by_kind()["ffn"] <= 0.5


def test_resume_is_bit_identical():
    torch.manual_seed(0)
    model = tiny_model("bert")
    twin = copy.deepcopy(model)
    _, optimizer = target_hspg(model)
    train(model, optimizer, steps=14)

    _, first = target_hspg(twin)
    train(twin, first, steps=7)  # stops in the middle of the pruning window (ramps and scores in flight)
    state = copy.deepcopy(first.state_dict())
    resumed_model = copy.deepcopy(twin)
    _, resumed = target_hspg(resumed_model)
    resumed.load_state_dict(state)
    train(resumed_model, resumed, steps=7, start=7)
    for (name, a), (_, b) in zip(model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name


def test_nonfinite_step_is_skipped_without_touching_scores():
    torch.manual_seed(0)
    model = tiny_model("bert")
    _, optimizer = target_hspg(model)
    train(model, optimizer, steps=2)
    saliency = [optimizer._selection.family_state(f)["oto_saliency"].clone() for f in range(3)]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    lm_loss(model, seed=0).backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    optimizer.step()
    assert optimizer.skipped_steps == 1 and optimizer.step_count == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(s, optimizer._selection.family_state(f)["oto_saliency"]) for f, s in enumerate(saliency))


def test_conv_net_reaches_its_target_and_prunes_exactly():
    torch.manual_seed(0)
    model = tiny_vgg()
    zigs = build_zigs(model)
    optimizer = HSPG(
        model.parameters(), zigs, lr=1e-3, mode="target", init_steps=2, pruning_steps=4, pruning_periods=2,
        target=PruningTarget(flops=0.6),
    )  # fmt: skip
    dense = count_flops(model)
    for step in range(8):
        optimizer.zero_grad()
        pixels = images(model, batch=4, seed=step)
        labels = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(step))
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
    kept = optimizer.kept_fraction()["flops"]
    assert kept <= 0.6 + 1e-9
    model.eval()
    pixels = images(model, batch=3, seed=99)
    with torch.no_grad():
        reference = model(pixel_values=pixels).logits
    slim, _ = prune_zero_groups(model, zigs)
    with torch.no_grad():
        torch.testing.assert_close(slim(pixel_values=pixels).logits, reference, rtol=0, atol=1e-5)
    assert count_flops(slim) / dense == pytest.approx(kept)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="fast"), "Unknown mode"),
        (dict(mode="target"), "needs `pruning_steps`"),
        (dict(mode="target", pruning_steps=2, pruning_periods=4), "needs `pruning_steps`"),
        (dict(mode="target", pruning_steps=8, pruning_periods=0), "pruning_periods must be an integer >= 1"),
        (dict(mode="target", pruning_steps=8, max_group_sparsity=0.5), "max_group_sparsity counts groups"),
        (dict(mode="target", pruning_steps=8, target=0.5), "must be a PruningTarget"),
        (dict(mode="target", pruning_steps=8, target=PruningTarget(max_kind_sparsity={"wings": 0.5})), "wings"),
        (dict(pruning_steps=8), "belong to the target mode"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=message):
        HSPG(model.parameters(), build_zigs(model), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(flops=0.0), r"fraction in \(0, 1\]"),
        (dict(flops=1.5), r"fraction in \(0, 1\]"),
        (dict(params=float("nan")), r"fraction in \(0, 1\]"),
        (dict(max_kind_sparsity={"heads": 2.0}), r"max_kind_sparsity\['heads'\]"),
        (dict(min_kept_per_family=-1), "min_kept_per_family must be >= 0"),
        (dict(min_kept_per_family=1.5), "must be an integer"),
    ],
)
def test_bad_targets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningTarget(**kwargs)


def test_kind_caps_parse():
    assert parse_kind_caps("heads=0.75, ffn=0.9") == {"heads": 0.75, "ffn": 0.9}
    assert parse_kind_caps(None) == {}
    with pytest.raises(ValueError, match="kind=fraction"):
        parse_kind_caps("heads:0.75")
    assert PruningTarget().flops == 0.5 and PruningTarget(params=0.6).flops is None


def test_schedule():
    schedule = Schedule(start=10, period=5, periods=3)
    assert [step for step in range(40) if schedule.selection_index(step) is not None] == [10, 15, 20]
    assert [step for step in range(40) if schedule.scoring(step)] == list(range(5, 20))
    assert schedule.end == 25
