"""Group costs agree with the pruning report's counters: `GroupCosts.flops/params` of the removed groups equal
`count_flops` / `count_parameters` of the slim model, on every architecture the pruning claims."""

import pytest
import torch

from hf_oto import build_zigs
from hf_oto.costs import GroupCosts, removed_counts
from hf_oto.flops import count_flops, count_parameters
from hf_oto.report import prune_and_measure

from .test_pruning import SEQ, sparse_masks
from .tiny_convnets import (
    tiny_cifar_resnet,
    tiny_hf_convnext,
    tiny_hf_efficientnet,
    tiny_hf_mobilenet,
    tiny_hf_regnet,
    tiny_hf_resnet,
    tiny_vgg,
)
from .tiny_models import TINY_MODEL_FACTORIES, tiny_model


def check_costs(model, zigs, masks, seq_length=SEQ):
    costs = GroupCosts.measure(zigs, seq_length=seq_length)
    assert costs.flops([0] * len(zigs.families)) == count_flops(model, seq_length=seq_length)
    assert costs.params([0] * len(zigs.families)) == count_parameters(model)
    zigs.set_zero(masks)
    removed = removed_counts(zigs.family_zero_masks(), costs.family_names)
    slim, _ = prune_and_measure(model, zigs, seq_length=seq_length)
    assert costs.flops(removed) == pytest.approx(count_flops(slim, seq_length=seq_length), rel=1e-9, abs=1e-6)
    assert costs.params(removed) == pytest.approx(count_parameters(slim), rel=1e-9, abs=1e-6)
    return costs


@pytest.mark.parametrize("name", sorted(TINY_MODEL_FACTORIES))
def test_costs_equal_report_on_transformers(name):
    model = tiny_model(name).eval()
    zigs = build_zigs(model)
    masks = sparse_masks(zigs, seed=1)
    costs = check_costs(model, zigs, masks)
    per_group = costs.per_group("flops")
    assert all(value > 0 for value in per_group.values())


def keep_one(zigs, masks):
    """Masks that leave at least one channel per family (an all-zero conv family keeps a zero channel when sliced)."""
    for mask in masks.values():
        if bool(mask.all()):
            mask[0] = False
    return masks


@pytest.mark.parametrize(
    "factory",
    [tiny_vgg, tiny_cifar_resnet, tiny_hf_resnet, tiny_hf_regnet, tiny_hf_efficientnet, tiny_hf_convnext]
    + [lambda: tiny_hf_convnext(2), tiny_hf_mobilenet, lambda: tiny_hf_mobilenet(2)],
    ids=["vgg", "cifar-resnet", "hf-resnet", "hf-regnet", "hf-efficientnet", "hf-convnext", "hf-convnext-v2"]
    + ["hf-mobilenet-v1", "hf-mobilenet-v2"],
)
def test_costs_equal_report_on_conv_nets(factory):
    model = factory().eval()
    zigs = build_zigs(model)
    mask = zigs.random_zero_mask(0.4, generator=torch.Generator().manual_seed(0))
    check_costs(model, zigs, keep_one(zigs, zigs._split_mask(mask)))


def test_marginal_cost_of_a_head_includes_its_attention_products():
    model = tiny_model("bert").eval()
    zigs = build_zigs(model)
    costs = GroupCosts.measure(zigs, seq_length=SEQ)
    heads = zigs.families[0]
    assert heads.kind == "heads"
    removed = [0] * len(zigs.families)
    removed[0] = 1
    saving = costs.flops([0] * len(zigs.families)) - costs.flops(removed)
    assert costs.marginal("flops", [0] * len(zigs.families))[0] == pytest.approx(saving)
    hidden = model.config.hidden_size
    head_dim = hidden // model.config.num_attention_heads
    # q, k, v rows + output columns (2 * SEQ * hidden * head_dim each) + scores and context (4 * SEQ^2 * head_dim)
    assert saving == 4 * 2 * SEQ * hidden * head_dim + 4 * SEQ * SEQ * head_dim


def test_bad_counts_are_refused():
    model = tiny_model("bert")
    costs = GroupCosts.measure(build_zigs(model), seq_length=SEQ)
    with pytest.raises(ValueError, match="one count per family"):
        costs.flops([0])
    with pytest.raises(ValueError, match="kind must be one of"):
        costs.cost("latency", [0] * len(costs.family_names))
