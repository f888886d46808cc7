"""Zero-invariant group builders for transformer models."""

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    DeiTConfig,
    DeiTForImageClassification,
    GPT2Config,
    GPT2LMHeadModel,
    SwinConfig,
    SwinForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_oto import ZIGFamily, ZIGMember, ZIGSet, build_zigs
from hf_oto.zig.transformers import TRANSFORMER_LAYOUTS

from .tiny_models import TINY_MODEL_FACTORIES, tiny_inputs, tiny_model


NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, FFN = 3, 4, 2, 37


@pytest.mark.parametrize("name", sorted(TINY_MODEL_FACTORIES))
def test_every_family_gets_heads_and_ffn_rows(name):
    model = tiny_model(name)
    zigs = build_zigs(model)
    gqa = model.config.model_type in ("llama", "mistral", "qwen2")
    heads_per_layer = NUM_KV_HEADS if gqa else NUM_HEADS
    assert zigs.num_groups_by_kind() == {"heads": NUM_LAYERS * heads_per_layer, "ffn": NUM_LAYERS * FFN}
    assert len(zigs) == NUM_LAYERS * (heads_per_layer + FFN)
    assert [family.layer for family in zigs] == [0, 0, 1, 1, 2, 2]

    heads, ffn = zigs.families[0], zigs.families[1]
    # q, k, v weights (and biases where the model has them) are penalised; the output projection is dependent.
    roles = [member.param_name.rsplit(".", 2)[-2] for member in heads.members]
    assert len({member.param_name for member in heads.members}) == len(heads.members)
    assert len(roles) in (3, 6)
    assert all(member.dim == 0 for member in heads.members)
    assert [member.dim for member in heads.dependents] == [1]
    assert heads.meta["head_dim"] == 8
    assert heads.meta["queries_per_group"] == (2 if gqa else 1)
    # FFN: up (and gate) rows; the down projection's columns are dependent.
    ffn_roles = sorted(
        member.param_name.split(".")[-2] + "." + member.param_name.split(".")[-1] for member in ffn.members
    )
    if gqa:  # gated FFN without biases: one row of the up and of the gate projection
        assert ffn_roles == ["gate_proj.weight", "up_proj.weight"]
    else:  # one row of the up projection with its bias
        assert [role.split(".")[1] for role in ffn_roles] == ["bias", "weight"]
    assert [member.dim for member in ffn.dependents] == [1]

    # Every penalised parameter really is a slice of the model, not a copy.
    parameters = dict(model.named_parameters())
    for _family, member, param in zigs.penalised_parameters():
        assert param is parameters[member.param_name]


def test_gqa_head_group_holds_one_kv_head_and_its_query_heads():
    model = tiny_model("llama")
    zigs = build_zigs(model, families=("heads",))
    family = zigs.families[0]
    mask = torch.tensor([False, True])  # zero KV group 1: query heads 2 and 3, key/value head 1
    zigs.set_zero({family.name: mask})
    attention = model.model.layers[0].self_attn
    head_dim = 8
    assert torch.count_nonzero(attention.q_proj.weight[2 * head_dim :]) == 0
    assert torch.count_nonzero(attention.q_proj.weight[: 2 * head_dim]) > 0
    assert torch.count_nonzero(attention.k_proj.weight[head_dim:]) == 0
    assert torch.count_nonzero(attention.v_proj.weight[:head_dim]) > 0
    assert zigs.family_zero_masks()[family.name].tolist() == [False, True]


def test_zeroing_a_group_silences_its_contribution():
    """Zero-invariance: zeroing every group equals a model whose attention and FFN add only their biases."""
    model = tiny_model("bert-base-model")
    inputs = tiny_inputs(model)
    zigs = build_zigs(model)
    zigs.set_zero(torch.ones(len(zigs), dtype=torch.bool))
    assert zigs.group_sparsity() == 1.0
    # With every head and FFN row zero, each layer's output depends only on its input and the biases, so scaling
    # the dependent output projections' weights must not change anything.
    before = model(**inputs).last_hidden_state
    with torch.no_grad():
        for family in zigs:
            for member in family.dependents:
                zigs.parameter(member.param_name).mul_(3.0)
    after = model(**inputs).last_hidden_state
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_norms_sparsity_and_set_zero():
    model = tiny_model("bert")
    zigs = build_zigs(model)
    assert zigs.num_zero_groups() == 0
    assert torch.all(zigs.group_norms() > 0)
    mask = zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0))
    assert int(mask.sum()) == round(0.5 * len(zigs))
    zigs.set_zero(mask)
    assert torch.equal(zigs.zero_mask(), mask)
    assert zigs.group_sparsity() == pytest.approx(int(mask.sum()) / len(zigs))
    by_kind = zigs.sparsity_by_kind()
    heads_mask = torch.cat([m for f, m in zip(zigs, zigs._split_mask(mask).values()) if f.kind == "heads"])
    assert by_kind["heads"] == pytest.approx(heads_mask.float().mean().item())
    kept = zigs.kept_groups()
    assert sum(kept.values()) == len(zigs) - int(mask.sum())
    assert "total" in zigs.summary()


def test_norms_match_a_per_group_loop():
    model = tiny_model("qwen2")
    zigs = build_zigs(model)
    family = zigs.families[0]
    expected = []
    for group in range(family.num_groups):
        squared = 0.0
        for member in family.members:
            chunk = zigs.parameter(member.param_name).detach().chunk(family.num_groups, dim=member.dim)[group]
            squared += chunk.pow(2).sum()
        expected.append(squared.sqrt())
    torch.testing.assert_close(zigs.family_norms()[0], torch.stack(expected))


def test_family_selection_and_exclude():
    model = tiny_model("bert")
    assert build_zigs(model, families=("ffn",)).num_groups_by_kind() == {"ffn": NUM_LAYERS * FFN}
    assert build_zigs(model, families="heads").num_groups_by_kind() == {"heads": NUM_LAYERS * NUM_HEADS}
    zigs = build_zigs(model, exclude=["*.layer.2.*"])
    assert [family.layer for family in zigs] == [0, 0, 1, 1]
    zigs = build_zigs(model, exclude=["*.heads"])
    assert zigs.num_groups_by_kind() == {"ffn": NUM_LAYERS * FFN}


def test_bad_arguments_raise_clear_errors():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="Unknown group families"):
        build_zigs(model, families=("channels_typo",))
    with pytest.raises(ValueError, match="matches no group family"):
        build_zigs(model, exclude=["*.layr.1.*"])
    with pytest.raises(ValueError, match="leave no group"):
        build_zigs(model, exclude=["*"])
    zigs = build_zigs(model)
    with pytest.raises(ValueError, match="entries"):
        zigs.set_zero(torch.zeros(3, dtype=torch.bool))


UNSUPPORTED_TRANSFORMERS = {
    # DeiT and Swin have a convolutional patch embedding: they must not be taken for convolutional networks.
    "deit": lambda: DeiTForImageClassification(
        DeiTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
        )
    ),
    "swin": lambda: SwinForImageClassification(
        SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1], num_heads=[2], window_size=4)
    ),
    "t5": lambda: T5ForConditionalGeneration(
        T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)
    ),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16)),
}


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED_TRANSFORMERS))
def test_unsupported_model_type_lists_the_supported_ones(model_type):
    model = UNSUPPORTED_TRANSFORMERS[model_type]()
    with pytest.raises(ValueError) as error:
        build_zigs(model)
    message = str(error.value)
    assert f"model_type={model_type!r}" in message and "torch.fx" not in message
    for supported in TRANSFORMER_LAYOUTS:
        assert supported in message
    assert "TRANSFORMER_LAYOUTS" in message


def test_plain_module_without_config_is_refused():
    with pytest.raises(ValueError, match="model_type=None"):
        build_zigs(nn.Sequential(nn.Linear(4, 4)))


def test_custom_code_with_other_module_names_names_the_missing_module():
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    model.encoder.layer[1].attention.self.query = nn.Identity()  # custom code: not a Linear where the table says
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.query"):
        build_zigs(model)
    del model.encoder.layer[1].intermediate.dense
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.intermediate\.dense.*missing"):
        build_zigs(model, families=("ffn",))


def test_zigset_validates_its_families():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    family = ZIGFamily(
        "hidden", "neurons", 6, (ZIGMember("0.weight"), ZIGMember("0.bias")), (ZIGMember("2.weight", 1),)
    )
    zigs = ZIGSet(model, [family])
    assert len(zigs) == 6
    with pytest.raises(ValueError, match="lacks"):
        ZIGSet(model, [ZIGFamily("x", "neurons", 6, (ZIGMember("5.weight"),))])
    with pytest.raises(ValueError, match="does not split"):
        ZIGSet(model, [ZIGFamily("x", "neurons", 4, (ZIGMember("0.weight"),))])
    with pytest.raises(ValueError, match="one family only"):
        ZIGSet(model, [family, ZIGFamily("y", "neurons", 3, (ZIGMember("0.weight"),))])
    with pytest.raises(ValueError, match="at least one family"):
        ZIGSet(model, [])
