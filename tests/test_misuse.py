"""Misuses a new user tries that no other test file covers (the README table "Bad input: what each misuse gives" links
every row to its test, here or elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_oto import HSPG, OTOTrainingArguments, build_zigs, load_pruned_model, prune_and_measure, save_pruned_model

from .test_hspg import lm_loss
from .testing_utils import load_script, reviews, write_csv, write_tiny_classifier
from .tiny_models import tiny_inputs, tiny_model


def test_every_group_of_a_layer_excluded_keeps_that_layer_whole(one_thread):
    """`exclude` covering all the groups of a layer: the layer is neither penalised nor zeroed nor pruned; the other
    layers are."""
    model = tiny_model("bert").train()
    zigs = build_zigs(model, exclude=["*.layer.0.*"])
    assert {family.layer for family in zigs} == {1, 2}
    layer0 = {name: param.detach().clone() for name, param in model.named_parameters() if ".layer.0." in name}
    optimizer = HSPG(model.parameters(), zigs, lr=1e-2, lmbda=20.0, init_steps=2)
    for step in range(10):
        optimizer.zero_grad()
        lm_loss(model, seed=step % 4).backward()
        optimizer.step()
    assert zigs.num_zero_groups() > 0
    # Layer 0 trained on the loss alone: it moved, but none of its heads or FFN rows is zero.
    assert any(not torch.equal(model.get_parameter(name), value) for name, value in layer0.items())
    all_groups = build_zigs(model)
    assert all(all_groups.sparsity_by_family()[f.name] == 0.0 for f in all_groups if f.layer == 0)
    model.eval()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    slim, report = prune_and_measure(model, zigs, seq_length=16, inplace=True)
    assert report.num_attention_heads_after[0] == 4 and report.intermediate_size_after[0] == 37
    assert report.intermediate_size_after[1] < 37 or report.intermediate_size_after[2] < 37
    with torch.no_grad():
        torch.testing.assert_close(slim(**inputs).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("damage", "expected_error"),
    [
        ("truncated", "incomplete metadata"),
        ("header", "invalid JSON in header"),
        ("empty", "header too small"),
    ],
)
def test_truncated_or_corrupt_weights_fail_loudly(tmp_path, damage, expected_error):
    model = tiny_model("bert")
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.3, generator=torch.Generator().manual_seed(0)))
    slim, _ = prune_and_measure(model, zigs, seq_length=16)
    save_pruned_model(slim, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "header": data[:8] + b"{garbage" + data[16:], "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match=rf"model\.safetensors' \(SafetensorError: .*{expected_error}.*\): it is "
                       "truncated or corrupt. Download it again"):  # fmt: skip
        load_pruned_model(tmp_path, AutoModelForSequenceClassification)
    with pytest.raises(Exception, match=expected_error):  # transformers' own loader fails too
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [({"fsdp": "full_shard"}, "FSDP"), ({"deepspeed": "ds_config.json"}, "DEEPSPEED")],
)
def test_fsdp_and_deepspeed_arguments_are_refused(tmp_path, arguments, name):
    """Refused when the arguments are built: before the Trainer would build an FSDP plugin or import DeepSpeed
    (which would make its own optimizer and silently bypass HSPG)."""
    with pytest.raises(ValueError, match=f"OTO does not support {name}: .*Train with data parallel"):
        OTOTrainingArguments(output_dir=str(tmp_path), report_to="none", **arguments)


def test_trainer_script_refuses_a_slim_folder_of_an_earlier_run_before_training(tmp_path):
    """The slim model is saved after training: a folder that holds one is refused at the start, not at the end."""
    model_dir = write_tiny_classifier(tmp_path / "model")
    data = write_csv(tmp_path / "train.csv", reviews())
    pruned = tmp_path / "out" / "pruned"
    pruned.mkdir(parents=True)
    (pruned / "config.json").write_text(json.dumps({"model_type": "bert"}))
    argv = [
        "--model_name_or_path", str(model_dir), "--train_file", str(data), "--label_column_name", "sentiment",
        "--output_dir", str(tmp_path / "out"), "--do_train", "--max_steps", "2", "--report_to", "none", "--use_cpu",
    ]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"slim-model folder .*pruned' already holds config\.json .*--overwrite_output_dir"
    ):
        load_script("run_text_classification_oto").main(argv)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["pruned"]  # nothing was trained or written


def test_from_pretrained_forced_with_ignore_mismatched_sizes_is_another_model(tmp_path):
    """Plain `from_pretrained` refuses a pruned folder (see tests/test_modeling.py); forcing it with
    `ignore_mismatched_sizes=True` gives the dense architecture with re-initialised tensors, and transformers warns."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    model = tiny_model("bert")
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.3, generator=torch.Generator().manual_seed(0)))
    slim, _ = prune_and_measure(model, zigs, seq_length=16)
    save_pruned_model(slim, tmp_path)
    with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
        forced = AutoModelForSequenceClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    # transformers 4: "... found shape ... newly initialized"; 5: a load report with "Reinit due to size mismatch"
    assert ("found shape" in captured.out and "newly initialized" in captured.out) or (
        "Reinit due to size mismatch" in captured.out
    )
    assert sum(p.numel() for p in forced.parameters()) > sum(p.numel() for p in slim.parameters())
    reloaded = load_pruned_model(tmp_path, AutoModelForSequenceClassification)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in slim.parameters())
