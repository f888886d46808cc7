"""Pruned checkpoints: save in the Hub format, reload with identical outputs, fail loudly on misuse."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertTokenizerFast,
)

from hf_oto import build_zigs
from hf_oto.modeling import _save_pretrained_takes, load_pruned_model, save_pruned_model
from hf_oto.pruning import PrunedAttention
from hf_oto.report import prune_and_measure

from .test_pruning import SEQ, main_output, run, sparse_masks
from .tiny_models import FROM_PRETRAINED_SIZE_ERROR, TINY_MODEL_FACTORIES, tiny_inputs, tiny_model


WRITES_TORCH_BIN = _save_pretrained_takes("safe_serialization")  # transformers 4; 5 writes only safetensors


def to_torch_bin(folder):
    """Replaces `model.safetensors` by the `pytorch_model.bin` transformers 4 writes with `safe_serialization=False`."""
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def pruned(name, seed=0, **kwargs):
    model = tiny_model(name)
    zigs = build_zigs(model)
    zigs.set_zero(sparse_masks(zigs, seed=seed, **kwargs))
    slim, _ = prune_and_measure(model, zigs, seq_length=SEQ)
    return slim


@pytest.mark.parametrize("name", sorted(TINY_MODEL_FACTORIES))
def test_save_and_load_give_identical_outputs(name, tmp_path):
    slim = pruned(name)
    inputs = tiny_inputs(slim)
    reference = run(slim, inputs)
    save_pruned_model(slim, tmp_path / "pruned")

    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["oto_layout"] == slim.config.oto_layout
    loaded = load_pruned_model(tmp_path / "pruned", type(slim))
    assert not loaded.training
    torch.testing.assert_close(run(loaded, inputs), reference, atol=0, rtol=0)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in slim.state_dict().items()}
    assert isinstance(loaded.get_submodule(_first_attention(slim)), PrunedAttention)


def _first_attention(model):
    return next(name for name, module in model.named_modules() if isinstance(module, PrunedAttention))


@pytest.mark.parametrize(
    "name, auto_class",
    [
        ("bert", AutoModelForSequenceClassification),
        ("bert-base-model", AutoModel),
        ("roberta", AutoModelForQuestionAnswering),
        ("llama", AutoModelForCausalLM),
        ("qwen2", AutoModelForCausalLM),
    ],
)
def test_load_with_auto_classes(name, auto_class, tmp_path):
    slim = pruned(name)
    inputs = tiny_inputs(slim)
    save_pruned_model(slim, tmp_path)
    loaded = load_pruned_model(tmp_path, auto_class)
    assert type(loaded) is type(slim)
    torch.testing.assert_close(run(loaded, inputs), run(slim, inputs), atol=0, rtol=0)


def test_tied_weights_are_tied_after_loading(tmp_path):
    slim = pruned("roberta-mlm")
    save_pruned_model(slim, tmp_path)
    loaded = load_pruned_model(tmp_path, type(slim))
    assert loaded.lm_head.decoder.weight is loaded.roberta.embeddings.word_embeddings.weight


def test_zero_size_tensors_are_kept_and_plain_from_pretrained_fails(tmp_path):
    """Only layer 0 loses its heads; everything else stays dense: the 0-row q/k/v tensors alone must clash."""
    model = tiny_model("bert")
    zigs = build_zigs(model, families=("heads",))
    zigs.set_zero({f.name: torch.full((f.num_groups,), f.layer == 0) for f in zigs})
    slim, _ = prune_and_measure(model, zigs, seq_length=SEQ)
    save_pruned_model(slim, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as file:
        assert file.get_slice("bert.encoder.layer.0.attention.self.query.weight").get_shape() == [0, 32]
        assert file.get_slice("bert.encoder.layer.0.attention.output.dense.weight").get_shape() == [32, 0]
    with pytest.raises(RuntimeError, match=FROM_PRETRAINED_SIZE_ERROR):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(
        run(load_pruned_model(tmp_path, AutoModelForSequenceClassification), tiny_inputs(slim)),
        run(slim, tiny_inputs(slim)),
    )


def test_plain_from_pretrained_fails_on_a_pruned_llama(tmp_path):
    slim = pruned("llama")
    save_pruned_model(slim, tmp_path)
    with pytest.raises(RuntimeError, match=FROM_PRETRAINED_SIZE_ERROR):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_overwrite_protection(tmp_path):
    slim = pruned("distilbert")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*overwrite=True.*whole folder is replaced"):
        save_pruned_model(slim, folder)
    assert not (folder / "config.json").exists()
    save_pruned_model(slim, folder, overwrite=True)
    assert not (folder / "notes.txt").exists()  # overwrite=True replaces the whole folder, as documented
    save_pruned_model(slim, folder, overwrite=True)  # again, over its own files
    torch.testing.assert_close(
        run(load_pruned_model(folder, type(slim)), tiny_inputs(slim)), run(slim, tiny_inputs(slim))
    )
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a folder"):
        save_pruned_model(slim, tmp_path / "notes.txt", overwrite=True)


@pytest.mark.parametrize("stale", ["single_safetensors", "sharded_index"])
def test_overwrite_leaves_no_stale_weights_that_win_at_load_time(tmp_path, stale):
    """An old `model.safetensors` (or shard index and shards) would be loaded instead of a new `pytorch_model.bin` or
    single file if it survived the overwrite."""
    old, new = pruned("bert", seed=0), pruned("bert", seed=1)
    folder = tmp_path / "slim"
    if stale == "single_safetensors" and WRITES_TORCH_BIN:
        save_pruned_model(old, folder)
        save_pruned_model(new, folder, overwrite=True, safe_serialization=False)
        assert sorted(p.name for p in folder.glob("*.safetensors")) == [] and (folder / "pytorch_model.bin").is_file()
    elif stale == "single_safetensors":  # transformers 5 writes only safetensors: a stale .bin must go
        save_pruned_model(old, folder)
        to_torch_bin(folder)
        save_pruned_model(new, folder, overwrite=True)
        assert not (folder / "pytorch_model.bin").exists() and (folder / "model.safetensors").is_file()
    else:
        old.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
        save_pruned_model(new, folder, overwrite=True)
        assert not (folder / "model.safetensors.index.json").exists()
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    reloaded = load_pruned_model(folder, AutoModelForSequenceClassification)
    torch.testing.assert_close(run(reloaded, tiny_inputs(new)), run(new, tiny_inputs(new)), atol=0, rtol=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["slim"]  # no temporary or backup folder left


def test_a_save_failing_mid_way_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    old, new = pruned("bert", seed=0), pruned("bert", seed=1)
    folder = tmp_path / "slim"
    save_pruned_model(old, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def fail_after_the_weights(model, directory, *args, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(type(new), "save_pretrained", fail_after_the_weights)
    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(new, folder, overwrite=True)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["slim"]  # the temporary folder is gone
    reloaded = load_pruned_model(folder, AutoModelForSequenceClassification)
    torch.testing.assert_close(run(reloaded, tiny_inputs(old)), run(old, tiny_inputs(old)), atol=0, rtol=0)


def test_mismatched_layout_names_the_tensor(tmp_path):
    slim = pruned("bert")
    save_pruned_model(slim, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    kept = config["oto_layout"]["intermediate_size"][2]
    config["oto_layout"]["intermediate_size"][2] = kept - 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.2\.intermediate\.dense\.weight' has shape") as error:
        load_pruned_model(tmp_path, AutoModelForSequenceClassification)
    assert f"({kept}, 32)" in str(error.value) and f"({kept - 1}, 32)" in str(error.value)


def test_dense_checkpoint_and_missing_files(tmp_path):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="dense checkpoint.*from_pretrained"):
        load_pruned_model(tmp_path / "dense", AutoModelForSequenceClassification)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No config.json"):
        load_pruned_model(tmp_path / "empty")
    slim = pruned("bert")
    save_pruned_model(slim, tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="No weights"):
        load_pruned_model(tmp_path / "no-weights", AutoModelForSequenceClassification)


def test_base_model_from_a_task_checkpoint_and_wrong_auto_class(tmp_path):
    slim = pruned("bert")
    save_pruned_model(slim, tmp_path / "cls")
    base = load_pruned_model(tmp_path / "cls", AutoModel)  # drops the classifier, like from_pretrained
    inputs = tiny_inputs(slim)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, slim.bert(**inputs).last_hidden_state)
    save_pruned_model(slim.bert, tmp_path / "base")
    with pytest.raises(ValueError, match="BertForQuestionAnswering lacks.*pooler.*auto_class"):
        load_pruned_model(tmp_path / "base", AutoModelForQuestionAnswering)


def test_torch_serialization_and_tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    slim = pruned("bert")
    folder = tmp_path / "pruned"
    if WRITES_TORCH_BIN:
        save_pruned_model(slim, folder, tokenizer, safe_serialization=False)
    else:  # transformers 5 writes only safetensors: it says so; a transformers 4 `.bin` folder still loads
        from transformers.testing_utils import CaptureLogger
        from transformers.utils import logging

        with CaptureLogger(logging.get_logger("hf_oto.modeling")) as captured:
            save_pruned_model(slim, folder, tokenizer, safe_serialization=False)
        assert "writes only safetensors" in captured.out and (folder / "model.safetensors").is_file()
        to_torch_bin(folder)
    assert (folder / "pytorch_model.bin").is_file() and (folder / "tokenizer.json").is_file()
    loaded = load_pruned_model(folder, AutoModelForSequenceClassification)
    inputs = BertTokenizerFast.from_pretrained(folder)(["w1 w2 w3", "w5"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), main_output(slim(**inputs)), atol=0, rtol=0)


def test_a_hub_repo_id_is_downloaded_then_loaded(tmp_path, monkeypatch):
    slim = pruned("bert")
    save_pruned_model(slim, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, ignore_patterns=None):
        calls.append((repo_id, revision, ignore_patterns))
        return str(tmp_path / "snapshot")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    reloaded = load_pruned_model("me/tiny-bert-oto", AutoModelForSequenceClassification, revision="v1")
    assert calls == [("me/tiny-bert-oto", "v1", ["onnx/*", "*.onnx"])]
    inputs = tiny_inputs(slim)
    torch.testing.assert_close(reloaded(**inputs).logits, slim(**inputs).logits, rtol=0, atol=0)
