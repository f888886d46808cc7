"""Exact pruning of zero groups: the slim model gives the group-sparse model's outputs on every architecture."""

import inspect
import io
import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, PretrainedConfig

from hf_oto import build_zigs
from hf_oto.flops import count_flops, count_parameters
from hf_oto.pruning import PrunedAttention, PruningReport, apply_layout, current_layout
from hf_oto.report import prune_and_measure

from .tiny_models import TINY_MODEL_FACTORIES, tiny_inputs, tiny_model


GQA_MODELS = ("llama", "llama-cls", "mistral", "qwen2")
SEQ = 16  # FLOPs sequence length (the tiny models accept 64 positions)


def main_output(outputs) -> torch.Tensor:
    """Logits of task models (both QA heads stacked), last hidden state of base models."""
    if getattr(outputs, "start_logits", None) is not None:
        return torch.stack([outputs.start_logits, outputs.end_logits])
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    return outputs.last_hidden_state


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return main_output(model(**inputs))


def sparse_masks(zigs, seed=0, all_zero_heads_layer=0, all_zero_ffn_layer=1):
    """A random half of the groups, plus one layer whose heads are all zero and one whose FFN is all zero."""
    masks = zigs._split_mask(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(seed)))
    for family in zigs.families:
        if family.kind == "heads" and family.layer == all_zero_heads_layer:
            masks[family.name] = torch.ones(family.num_groups, dtype=torch.bool)
        if family.kind == "ffn" and family.layer == all_zero_ffn_layer:
            masks[family.name] = torch.ones(family.num_groups, dtype=torch.bool)
    return masks


def expected_removed(zigs, masks) -> int:
    """Parameters the zero groups hold: every member and dependent loses numel / num_groups per zero group."""
    removed = 0
    for family in zigs.families:
        zero = int(masks[family.name].sum())
        per_group = sum(
            zigs.parameter(m.param_name).numel() // family.num_groups for m in (*family.members, *family.dependents)
        )
        removed += zero * per_group
    return removed


@pytest.mark.parametrize("name", sorted(TINY_MODEL_FACTORIES))
def test_slim_model_equals_group_sparse_model(name):
    model = tiny_model(name)
    zigs = build_zigs(model)
    masks = sparse_masks(zigs)
    zigs.set_zero(masks)
    inputs = tiny_inputs(model)
    reference = run(model, inputs)
    params_before = count_parameters(model)
    removed = expected_removed(zigs, masks)

    slim, report = prune_and_measure(model, zigs, seq_length=SEQ, inplace=False)

    torch.testing.assert_close(run(slim, inputs), reference, atol=1e-5, rtol=1e-5)
    assert count_parameters(model) == params_before, "inplace=False must leave the model untouched"
    assert count_parameters(slim) == params_before - removed
    assert report.params_before == params_before and report.params_after == params_before - removed
    assert report.flops_after < report.flops_before
    assert report.flops_before == count_flops(model, seq_length=SEQ)
    assert report.flops_after == count_flops(slim, seq_length=SEQ)

    # Per-layer sizes: kept groups (x query heads per group for heads).
    num_layers = len(report.num_attention_heads_before)
    heads_after, ffn_after = [None] * num_layers, [None] * num_layers
    for family in zigs.families:
        kept = int((~masks[family.name]).sum())
        if family.kind == "heads":
            heads_after[family.layer] = kept * family.meta["queries_per_group"]
        else:
            ffn_after[family.layer] = kept
    assert report.num_attention_heads_after == heads_after
    assert report.intermediate_size_after == ffn_after
    assert report.num_attention_heads_before == [4] * num_layers
    assert report.intermediate_size_before == [37] * num_layers
    assert heads_after[0] == 0 and ffn_after[1] == 0
    assert slim.config.oto_layout == current_layout(slim)
    assert slim.config.oto_layout["num_attention_heads"] == heads_after
    json.dumps(slim.config.to_dict())  # the layout must serialise
    if name in GQA_MODELS:
        assert report.num_key_value_heads_before == [2] * num_layers
        assert report.num_key_value_heads_after == [h // 2 for h in heads_after]
    else:
        assert report.num_key_value_heads_before is None
    stand_ins = [module for module in slim.modules() if isinstance(module, PrunedAttention)]
    assert len(stand_ins) == sum(1 for h in heads_after if h == 0)
    # Parameter names are unchanged: a pruned layer keeps its 0-row q/k/v tensors.
    assert set(dict(slim.named_parameters())) == set(dict(model.named_parameters()))


@pytest.mark.parametrize("name", GQA_MODELS)
def test_gqa_partial_patterns(name):
    """Every pattern of the 2 key/value groups (each with 2 query heads) in every layer."""
    patterns = [[False, False], [True, False], [False, True], [True, True]]
    for shift in range(len(patterns)):
        model = tiny_model(name)
        zigs = build_zigs(model, families=("heads",))
        masks = {f.name: torch.tensor(patterns[(f.layer + shift) % 4]) for f in zigs.families}
        zigs.set_zero(masks)
        inputs = tiny_inputs(model)
        reference = run(model, inputs)
        slim, report = prune_and_measure(model, zigs, seq_length=SEQ)
        torch.testing.assert_close(run(slim, inputs), reference, atol=1e-5, rtol=1e-5)
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        for layer, family in zip(slim.model.layers, zigs.families):
            kept = int((~masks[family.name]).sum())
            assert layer.self_attn.q_proj.out_features == 2 * kept * head_dim
            assert layer.self_attn.k_proj.out_features == kept * head_dim
            assert layer.self_attn.o_proj.in_features == 2 * kept * head_dim
            assert report.num_key_value_heads_after[family.layer] == kept


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_generate_with_a_layer_without_heads(name):
    model = tiny_model(name)
    zigs = build_zigs(model)
    masks = sparse_masks(zigs, seed=3, all_zero_heads_layer=0, all_zero_ffn_layer=2)
    zigs.set_zero(masks)
    input_ids = tiny_inputs(model, batch_size=1)["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(input_ids, **kwargs)
        slim, _ = prune_and_measure(model, zigs, seq_length=SEQ, inplace=False)
        generated = slim.generate(input_ids, **kwargs)
    assert isinstance(slim.model.layers[0].self_attn, PrunedAttention)
    assert generated.shape == (1, input_ids.shape[1] + 6)
    torch.testing.assert_close(generated, reference, atol=0, rtol=0)
    # The head-less layer's cache counts the tokens too: transformers 5 passes it as `cache=`, 4.x as
    # `past_key_values=`; a stand-in that missed it left that layer's cache empty and the static cache below wrong.
    with torch.no_grad():
        cache = slim(input_ids, use_cache=True).past_key_values
    assert [cache.get_seq_length(layer) for layer in range(3)] == [input_ids.shape[1]] * 3
    # Token by token with the cache and no positions given: the model reads the next position from layer 0's cache.
    cache_kwarg = "cache" if "cache" in inspect.signature(type(slim).forward).parameters else "past_key_values"
    with torch.no_grad():
        step = slim(input_ids[:, :-1], use_cache=True)
        last = slim(input_ids[:, -1:], **{cache_kwarg: step.past_key_values}, use_cache=True)
        torch.testing.assert_close(last.logits[:, -1], model(input_ids).logits[:, -1], atol=1e-5, rtol=1e-5)
    # The stand-in's class (`PrunedLlamaAttention`) is made at run time; a pickled model still loads. (transformers 5
    # cannot pickle a model once it has recorded outputs: its recording hooks are local functions.)
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    assert type(reloaded.model.layers[0].self_attn) is type(slim.model.layers[0].self_attn)
    torch.testing.assert_close(reloaded.generate(input_ids, **kwargs), reference, atol=0, rtol=0)
    # A static cache allocates its layers from the first key/value states it sees.
    with torch.no_grad():
        static = slim.generate(input_ids, cache_implementation="static", **kwargs)
    torch.testing.assert_close(static, reference, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["bert", "distilbert", "vit", "llama"])
def test_output_attentions_with_a_layer_without_heads(name):
    """One attention entry per layer, in layer order: the head-less layer gives `[batch, 0, T, T]` (transformers 4
    collects what each layer returns, transformers 5 records with hooks on the attention class)."""
    model = tiny_model(name)
    model.set_attn_implementation("eager")
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs))
    inputs = tiny_inputs(model)
    with torch.no_grad():
        dense = model(**inputs, output_attentions=True)
    slim, _ = prune_and_measure(model, zigs, seq_length=SEQ, inplace=False)
    with torch.no_grad():
        outputs = slim(**inputs, output_attentions=True)
    torch.testing.assert_close(main_output(outputs), main_output(dense), atol=1e-5, rtol=1e-5)
    heads = slim.config.oto_layout["num_attention_heads"]
    assert heads[0] == 0 and len(outputs.attentions) == len(heads) == len(dense.attentions)
    for layer, (attention, reference) in enumerate(zip(outputs.attentions, dense.attentions)):
        batch, _, queries, keys = reference.shape
        assert attention.shape == (batch, heads[layer], queries, keys), f"layer {layer}"


def test_output_attentions_recorded_before_pruning_still_cover_every_layer():
    """transformers 5 installs its recording hooks once per model: a stand-in takes over the hooks of the module it
    replaces, so a model that returned attentions before pruning still returns one per layer after."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs))
    inputs = tiny_inputs(model)
    with torch.no_grad():
        model(**inputs, output_attentions=True)
        prune_and_measure(model, zigs, seq_length=SEQ)
        outputs = model(**inputs, output_attentions=True)
    heads = model.config.oto_layout["num_attention_heads"]
    assert [a.shape[1] for a in outputs.attentions] == heads
    stand_in = model.model.layers[0].self_attn
    assert isinstance(stand_in, PrunedAttention) and isinstance(stand_in, type(model.model.layers[1].self_attn))


def test_slim_model_trains():
    """Sliced parameters are leaves with gradients; a pruned layer's 0-size tensors do not break backward."""
    model = tiny_model("bert")
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs))
    slim, _ = prune_and_measure(model, zigs, seq_length=SEQ)
    slim.train()
    loss = slim(**tiny_inputs(slim), labels=torch.tensor([0, 2])).loss
    loss.backward()
    query = slim.bert.encoder.layer[2].attention.self.query
    assert query.weight.requires_grad and query.weight.grad is not None
    assert query.weight.grad.shape == query.weight.shape


def test_no_zero_group_changes_nothing():
    model = tiny_model("bert")
    zigs = build_zigs(model)
    inputs = tiny_inputs(model)
    reference = run(model, inputs)
    slim, report = prune_and_measure(model, zigs, seq_length=SEQ)
    torch.testing.assert_close(run(slim, inputs), reference, atol=0, rtol=0)
    assert report.params_after == report.params_before and report.flops_after == report.flops_before


def test_exclusions_keep_full_size():
    model = tiny_model("bert")
    zigs = build_zigs(model, exclude=["*.layer.2.*"])
    zigs.set_zero(torch.ones(len(zigs), dtype=torch.bool))
    slim, report = prune_and_measure(model, zigs, seq_length=SEQ)
    assert report.num_attention_heads_after == [0, 0, 4]
    assert report.intermediate_size_after == [0, 0, 37]


def test_stale_zigs_raise():
    model = tiny_model("llama")
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs))
    prune_and_measure(model, zigs, seq_length=SEQ)
    with pytest.raises(ValueError, match="stale"):
        prune_and_measure(model, zigs, seq_length=SEQ)


def test_report_to_dict_and_str():
    model = tiny_model("mistral")
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs))
    _, report = prune_and_measure(model, zigs, seq_length=SEQ)
    assert isinstance(report, PruningReport)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["params_ratio"] == pytest.approx(report.params_after / report.params_before)
    assert as_dict["num_key_value_heads_after"][0] == 0
    text = str(report)
    assert "kv heads" in text and "4 -> 0" in text and f"{report.params_after:,}" in text


def test_flops_formula_bert():
    """Hand count: q/k/v/o + FFN linears, attention products 4 T^2 x width, the pooler on one token."""
    hidden, inter, layers, heads, seq = 32, 37, 2, 4, 10
    model = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=16,
        )
    ).eval()

    def expected(kept_heads, kept_ffn):
        total = 2 * hidden * hidden  # pooler on the first token
        for h, f in zip(kept_heads, kept_ffn):
            width = h * hidden // heads
            total += 2 * seq * (3 * hidden * width + width * hidden)  # q, k, v, output
            total += 4 * seq * seq * width  # scores and context
            total += 2 * seq * 2 * hidden * f  # FFN up and down
        return total

    assert count_flops(model, seq_length=seq) == expected([4, 4], [37, 37])
    assert count_flops(model, seq_length=seq, batch_size=3) == 3 * expected([4, 4], [37, 37])
    zigs = build_zigs(model)
    zigs.set_zero({f.name: torch.arange(f.num_groups) < (f.num_groups if f.layer == 0 else 1) for f in zigs})
    _, report = prune_and_measure(model, zigs, seq_length=seq)
    assert report.flops_before == expected([4, 4], [37, 37])
    assert report.flops_after == expected([0, 3], [0, 36])


class TinyConvNet(nn.Module):
    main_input_name = "pixel_values"

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(image_size=6, num_channels=3)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=4))

    def forward(self, pixel_values):
        return self.body(pixel_values)


def test_flops_counts_conv_and_rejects_too_long_sequences():
    # 6x6 output x 8 channels x (3 in x 9), then 4x4 x 8 x (2 in per group x 9); the model type has no layout.
    assert count_flops(TinyConvNet()) == 2 * 8 * 36 * 3 * 9 + 2 * 8 * 16 * 2 * 9
    with pytest.raises(ValueError, match="seq_length"):
        count_flops(tiny_model("bert"), seq_length=500)


def test_apply_layout_reproduces_pruned_shapes():
    model = tiny_model("qwen2")
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs))
    slim, _ = prune_and_measure(model, zigs, seq_length=SEQ, inplace=False)
    fresh = apply_layout(tiny_model("qwen2", seed=1), slim.config.oto_layout)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in slim.state_dict().items()}
    assert [type(m).__name__ for m in fresh.modules()] == [type(m).__name__ for m in slim.modules()]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 9}, "format_version"),
        ({"intermediate_size": [37, 37]}, "one size per layer"),
        ({"num_attention_heads": [4, 5, 4]}, r"\[0, 4\]"),
        ({"num_attention_heads": [4, 3, 4]}, "not a multiple"),  # llama: 2 query heads per key/value head
    ],
)
def test_apply_layout_rejects_bad_layouts(change, message):
    layout = {"format_version": 1, "num_attention_heads": [4, 4, 4], "intermediate_size": [37, 37, 37]}
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        apply_layout(model, {**layout, **change})


def test_apply_layout_rejects_inconsistent_gqa_layout():
    layout = {
        "format_version": 1,
        "num_attention_heads": [4, 2, 4],
        "num_key_value_heads": [2, 2, 2],
        "intermediate_size": [37, 37, 37],
    }
    with pytest.raises(ValueError, match="key/value heads"):
        apply_layout(tiny_model("llama"), layout)


@pytest.mark.parametrize("name", ["bert", "llama", "distilbert"])
def test_a_second_pruning_round_is_exact(name, tmp_path):
    """`build_zigs` reads the heads from the modules: a pruned (or reloaded) model gets whole-head groups again."""
    from hf_oto.modeling import load_pruned_model, save_pruned_model

    model = tiny_model(name)
    inputs = tiny_inputs(model)
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs))
    slim, _ = prune_and_measure(model, zigs, seq_length=SEQ)
    save_pruned_model(slim, tmp_path / "round1")
    reloaded = load_pruned_model(tmp_path / "round1", type(slim))
    for candidate in (slim, reloaded):
        layout = current_layout(candidate)
        zigs2 = build_zigs(candidate)
        heads = {family.layer: family for family in zigs2.families if family.kind == "heads"}
        kv_heads = layout.get("num_key_value_heads", layout["num_attention_heads"])
        assert {layer: family.num_groups for layer, family in heads.items()} == {
            layer: count for layer, count in enumerate(kv_heads) if count > 0
        }
        assert all(family.meta["head_dim"] == 8 for family in heads.values())
        zigs2.set_zero(zigs2.random_zero_mask(0.5, generator=torch.Generator().manual_seed(1)))
        reference = run(candidate, inputs)
        slim2, report = prune_and_measure(candidate, zigs2, seq_length=SEQ, inplace=False)
        assert report.num_attention_heads_before == layout["num_attention_heads"]
        assert (run(slim2, inputs) - reference).abs().max() < 1e-5
        assert current_layout(slim2)["num_attention_heads"] == report.num_attention_heads_after


def test_modules_that_disagree_with_each_other_are_refused():
    model = tiny_model("bert")
    model.bert.encoder.layer[1].attention.self.num_attention_heads = 3
    with pytest.raises(ValueError, match=r"layer\.1.*num_attention_heads=3.*4 heads of 8"):
        build_zigs(model)
    model = tiny_model("llama")
    model.model.layers[2].self_attn.k_proj = nn.Linear(32, 12, bias=False)
    with pytest.raises(ValueError, match=r"layers\.2.*key/value"):
        build_zigs(model)


def test_a_config_that_disagrees_with_the_modules_does_not_change_the_groups():
    model = tiny_model("bert")
    model.config.num_attention_heads = 8  # the modules still compute 4 heads of 8
    assert {family.num_groups for family in build_zigs(model).families if family.kind == "heads"} == {4}


def test_the_flops_side_pass_never_fails_pruning():
    """The default `seq_length=128` is longer than the tiny models' 64 positions: FLOPs are counted at 64."""
    from hf_oto.costs import GroupCosts
    from hf_oto.flops import clamp_flops_seq_length

    model = tiny_model("bert")
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs))
    assert GroupCosts.measure(zigs).seq_length == 64
    slim, report = prune_and_measure(model, zigs)
    assert report.seq_length == 64 and "at seq_length=64" in str(report)
    assert report.flops_after == count_flops(slim, seq_length=64)
    assert clamp_flops_seq_length(slim, 16) == 16
    assert clamp_flops_seq_length(nn.Linear(2, 2), 1000) == 1000
