"""Models and paths that are not what hf_oto assumes: non-finite outputs at the pruning check, missing local folders
given to `load_pruned_model` (the README table "Bad input: what each misuse gives" links here)."""

from __future__ import annotations

import pytest
import torch

import hf_oto.pruning
from hf_oto import build_zigs
from hf_oto.trainer import prune_and_check

from .tiny_models import tiny_inputs, tiny_model


def _sparse_bert():
    model = tiny_model("bert")
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    return model, zigs


def test_nan_outputs_fail_the_pruning_check(monkeypatch):
    model, zigs = _sparse_bert()
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    with pytest.raises(RuntimeError, match=r"group-sparse model holds 2 NaN or infinite values.*diverged"):
        prune_and_check(model, zigs, tiny_inputs(model), seq_length=16)

    model, zigs = _sparse_bert()
    prune = hf_oto.pruning.prune_zero_groups

    def prune_into_nan(*args, **kwargs):
        slim, report = prune(*args, **kwargs)
        with torch.no_grad():
            slim.classifier.bias[0] = float("inf")
        return slim, report

    monkeypatch.setattr(hf_oto.pruning, "prune_zero_groups", prune_into_nan)
    with pytest.raises(RuntimeError, match=r"pruned model holds 2 NaN or infinite values.*not exact"):
        prune_and_check(model, zigs, tiny_inputs(model), seq_length=16)


@pytest.mark.parametrize(
    "path",
    [
        "./outputs/pruned",
        "../pruned",
        "outputs/run-1/pruned",  # more than owner/name
        "existing/pruned",  # its first part exists here
        "~/no-such-hf-oto-folder",
        "no such folder",  # not a valid repo id
        ".hidden",
        "C:\\runs\\pruned",
        "ABSOLUTE",
        "PATH_OBJECT",
    ],
)
def test_a_missing_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch, path):
    import huggingface_hub

    from hf_oto import load_pruned_model

    def no_network(*args, **kwargs):
        raise AssertionError(f"{path!r} was sent to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    if path == "ABSOLUTE":
        path = str(tmp_path / "missing")
    elif path == "PATH_OBJECT":
        path = tmp_path.relative_to(tmp_path) / "owner" / "name"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        load_pruned_model(path)
    assert repr(str(path)) in str(error.value)


def test_a_file_is_not_a_folder_and_a_repo_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from hf_oto import load_pruned_model

    calls = []

    def fake_snapshot_download(repo_id, revision=None, ignore_patterns=None):
        calls.append(repo_id)
        return str(tmp_path / "empty")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.safetensors").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        load_pruned_model("model.safetensors")
    for repo_id in ("owner/name", "bert-base-uncased"):
        with pytest.raises(ValueError, match="No config.json"):  # the fake snapshot is empty
            load_pruned_model(repo_id)
    assert calls == ["owner/name", "bert-base-uncased"]
