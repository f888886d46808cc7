"""hf_oto.hub.push_pruned_model with huggingface_hub.HfApi mocked: one repository, one upload, the slim files only."""

import json

import pytest
import torch

from hf_oto import build_zigs, prune_and_measure, save_pruned_model
from hf_oto.hub import push_pruned_model
from hf_oto.model_card import write_model_card

from .hub_mock import mock_hub
from .tiny_models import tiny_model


def test_push_uploads_the_folder_once_and_points_the_card_at_the_repo(tmp_path):
    model = tiny_model("bert")
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    slim, report = prune_and_measure(model, zigs, seq_length=16)
    folder = save_pruned_model(slim, tmp_path / "slim", write_extra=lambda staging: write_model_card(staging, report))
    (folder / "_hf_oto_run.lock").write_text("{}")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("")
    with mock_hub(namespace="alice") as hub:
        push_pruned_model(folder, "tiny-oto", private=True, commit_message="slim")
    assert hub.created == [{"repo_id": "alice/tiny-oto", "private": True, "exist_ok": True, "repo_type": "model"}]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "alice/tiny-oto" and upload["commit_message"] == "slim"
    assert upload["files"] == ["README.md", "config.json", "model.safetensors", "oto_layout.png"]
    assert 'load_pruned_model("alice/tiny-oto"' in upload["card"] and "path/to/this/folder" not in upload["card"]


def test_folders_that_are_not_slim_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        push_pruned_model(tmp_path / "missing", "me/x")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a slim-model folder"):
        push_pruned_model(tmp_path, "me/x")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "oto_layout": {}}))
    with pytest.raises(ValueError, match="holds no weights"):
        push_pruned_model(tmp_path, "me/x")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="without its model card"):
        push_pruned_model(tmp_path, "me/x")
