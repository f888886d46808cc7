"""Model cards of pruned checkpoints."""

import torch
import yaml

from hf_oto import build_zigs
from hf_oto.model_card import PLOT_FILE, write_model_card
from hf_oto.pruning import prune_zero_groups

from .tiny_models import tiny_model


def _pruned_report(name: str):
    model = tiny_model(name)
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    _, report = prune_zero_groups(model, zigs, seq_length=32)
    return report


def test_card_has_metadata_sizes_layout_plot_and_loading_lines(tmp_path):
    report = _pruned_report("llama")
    path = write_model_card(
        tmp_path,
        report,
        model_name="tiny-llama-oto",
        repo_id="me/tiny-llama-oto",
        base_model="me/tiny-llama",
        datasets=["squad"],
        license="apache-2.0",
        auto_class="AutoModelForCausalLM",
        hyperparameters={"oto_mode": "paper", "oto_lambda": 0.01, "oto_variant": "adamw"},
        metrics={"exact_match": 71.25},
        has_onnx=True,
        training_data="Six questions about rivers.",
    )
    text = path.read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["base_model"] == "me/tiny-llama"
    assert metadata["datasets"] == ["squad"]
    assert metadata["license"] == "apache-2.0"
    assert {"pruning", "oto"} <= set(metadata["tags"])
    assert f"| parameters | {report.params_before:,} | {report.params_after:,} |" in text
    assert f"| {report.flops_before:,} | {report.flops_after:,} |" in text
    assert "| oto_lambda | 0.01 |" in text
    assert "drove whole attention heads and FFN rows of `me/tiny-llama` to exactly zero under a group-lasso" in text
    assert "## Training\n\nSix questions about rivers.\n" in text
    assert "| exact_match | 71.25 |" in text
    assert 'load_pruned_model("me/tiny-llama-oto", auto_class=AutoModelForCausalLM)' in text
    assert "from transformers import AutoModelForCausalLM" in text
    assert 'ORTModelForCausalLM.from_pretrained("me/tiny-llama-oto", subfolder="onnx")' in text
    for layer, (heads, kv, ffn) in enumerate(
        zip(report.num_attention_heads_after, report.num_key_value_heads_after, report.intermediate_size_after)
    ):
        assert f"| {layer} | {heads} / 4 | {kv} / 2 | {ffn} / 37 |" in text
    plot = tmp_path / PLOT_FILE
    assert f"]({PLOT_FILE})" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_says_how_the_target_mode_chose_the_groups(tmp_path):
    report = _pruned_report("bert")
    for stated, default_note in ((True, False), (False, True)):
        text = write_model_card(
            tmp_path / str(stated),
            report,
            hyperparameters={"oto_mode": "target", "oto_target_flops": 0.5, "oto_target_stated": stated},
        ).read_text()
        assert "target mode" in text and "to keep 50% of the dense model's FLOPs" in text
        assert "group-lasso penalty" not in text
        assert ("the default target: none was stated" in text) is default_note


def test_card_without_optional_sections(tmp_path):
    report = _pruned_report("bert")
    text = write_model_card(tmp_path, report).read_text()
    assert "## Measured speedup" not in text
    assert "## Evaluation" not in text
    assert "onnx/" not in text
    assert "(not recorded)" in text
