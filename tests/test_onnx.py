"""ONNX export of slim models through Optimum, ORTModel loading without hf_oto, and the ORT latency benchmark."""

import json
import sys
from unittest import mock

import pytest
import torch


pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("onnxruntime")
optimum_ort = pytest.importorskip("optimum.onnxruntime")

from hf_oto import build_zigs  # noqa: E402
from hf_oto.flops import count_flops, count_parameters  # noqa: E402
from hf_oto.onnx import (  # noqa: E402
    ORT_MODEL_CLASSES,
    export_onnx,
    export_onnx_subfolder,
    resolve_task,
)
from hf_oto.pruning import prune_zero_groups  # noqa: E402
from hf_oto.report import prune_and_measure  # noqa: E402
from hf_oto.speedup import SpeedupResult, benchmark_speedup  # noqa: E402

from .tiny_models import tiny_inputs, tiny_model  # noqa: E402


def _slim(name: str, *, empty_heads_layer: int | None = 1, empty_ffn_layer: int | None = 2):
    """A tiny model with half of its groups zeroed at random, one layer without heads and one without FFN rows."""
    model = tiny_model(name)
    zigs = build_zigs(model)
    mask = zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0))
    for family, offset in zip(zigs.families, zigs.offsets()):
        if (family.kind == "heads" and family.layer == empty_heads_layer) or (
            family.kind == "ffn" and family.layer == empty_ffn_layer
        ):
            mask[offset : offset + family.num_groups] = True
    zigs.set_zero(mask)
    slim, _ = prune_and_measure(model, zigs, seq_length=8, inplace=False)
    return model.eval(), slim.eval()


def _ort_outputs_match(slim, directory, task):
    ort_class = getattr(optimum_ort, ORT_MODEL_CLASSES[task])
    kwargs = {"use_cache": False} if task == "text-generation" else {}
    ort_model = ort_class.from_pretrained(directory, **kwargs)
    inputs = tiny_inputs(slim, batch_size=2, seq_length=7)
    if slim.config.model_type != "distilbert":
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    if task.startswith("text-generation"):
        inputs.pop("token_type_ids")
    with torch.no_grad():
        expected = slim(**inputs)
    got = ort_model(**inputs)
    for key in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        if key in expected and expected[key] is not None:
            torch.testing.assert_close(torch.as_tensor(got[key]), expected[key], atol=1e-4, rtol=1e-4)
            return
    raise AssertionError(f"no comparable output in {list(expected.keys())}")


@pytest.mark.parametrize(
    ("name", "task"),
    [("bert", "text-classification"), ("distilbert", "text-classification"), ("llama", "text-generation")],
)
def test_export_loads_with_ort_model_and_matches(tmp_path, name, task):
    dense, slim = _slim(name)
    heads = slim.config.oto_layout["num_attention_heads"]
    ffn = slim.config.oto_layout["intermediate_size"]
    assert heads[1] == 0 and ffn[2] == 0 and heads != [heads[0]] * len(heads)
    directory = export_onnx(slim, tmp_path / "onnx")
    assert (directory / "model.onnx").is_file()
    assert resolve_task(slim) == task
    _ort_outputs_match(slim, directory, task)


def test_optimized_export_with_fused_attention_matches(tmp_path):
    # Optimum's optimizer passes the config's head count; ORT must fall back to each pruned layer's own heads.
    _, slim = _slim("bert-base-model", empty_ffn_layer=None)
    directory = export_onnx(slim, tmp_path / "onnx", task="feature-extraction", optimize="O2")  # validates outputs
    _ort_outputs_match(slim, directory, "feature-extraction")


def test_with_past_on_pruned_decoder_is_refused(tmp_path):
    _, slim = _slim("llama")
    with pytest.raises(ValueError, match="per-layer cache sizes"):
        export_onnx(slim, tmp_path / "onnx", task="text-generation-with-past")


def test_export_subfolder_and_bad_input(tmp_path):
    _, slim = _slim("bert-qa")
    folder = export_onnx_subfolder(slim, tmp_path)
    assert folder == tmp_path / "onnx" and (folder / "model.onnx").is_file()
    _ort_outputs_match(slim, folder, "question-answering")
    with pytest.raises(ValueError, match="already exists"):
        export_onnx(slim, folder)
    with pytest.raises(ValueError, match="not supported"):
        export_onnx(slim, tmp_path / "other", task="image-segmentation")
    with pytest.raises(ValueError, match="PreTrainedModel"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "other")


def test_save_pruned_model_with_onnx_subfolder(tmp_path):
    import inspect

    from hf_oto.modeling import save_pruned_model

    # Saving never exports (no optimum in the save path); the export goes into the saved folder's onnx/ subfolder.
    assert "export_onnx" not in inspect.signature(save_pruned_model).parameters
    _, slim = _slim("bert")
    save_pruned_model(slim, tmp_path)
    assert not (tmp_path / "onnx").exists()
    export_onnx_subfolder(slim, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "onnx" / "model.onnx").is_file()
    _ort_outputs_match(slim, tmp_path / "onnx", "text-classification")


def test_benchmark_speedup_on_objects():
    dense, slim = _slim("bert", empty_heads_layer=None, empty_ffn_layer=None)
    result = benchmark_speedup(dense, slim, batch_size=2, seq_length=16, warmup=1, repeats=3, progress=False)
    assert isinstance(result, SpeedupResult)
    assert result.dense.samples == result.slim.samples == 3
    assert result.dense.median_ms > 0 and result.slim.median_ms > 0 and result.speedup > 0
    assert result.dense.p10_ms <= result.dense.median_ms <= result.dense.p90_ms
    assert result.dense_params == count_parameters(dense) and result.slim_params == count_parameters(slim)
    assert result.dense_flops == count_flops(dense, seq_length=16, batch_size=2)
    assert result.flops_ratio == pytest.approx(result.dense_flops / result.slim_flops) and result.flops_ratio > 1
    assert result.efficiency == pytest.approx(result.speedup / result.flops_ratio)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["slim"]["samples"] == 3 and data["speedup"] == pytest.approx(result.speedup)
    assert "| slim |" in str(result) and "speedup" in str(result)


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"seq_length": -1}, {"repeats": 0}, {"warmup": -1}, {"num_threads": 0}, {"seq_length": 65}],
)
def test_benchmark_bad_arguments(kwargs):
    dense, slim = _slim("bert", empty_heads_layer=None, empty_ffn_layer=None)
    with pytest.raises(ValueError, match="seq_length|batch_size|repeats|warmup|num_threads"):
        benchmark_speedup(dense, slim, progress=False, **kwargs)


def test_benchmark_rejects_folder_without_model(tmp_path):
    dense, _ = _slim("bert", empty_heads_layer=None, empty_ffn_layer=None)
    with pytest.raises(ValueError, match="no config.json"):
        benchmark_speedup(dense, tmp_path, repeats=1, progress=False)
    with pytest.raises(ValueError, match="not a folder"):
        benchmark_speedup(dense, tmp_path / "missing", repeats=1, progress=False)


def test_cli_benchmark_on_saved_folders(tmp_path, capsys):
    from hf_oto import cli
    from hf_oto.modeling import save_pruned_model

    dense, slim = _slim("bert")
    dense.save_pretrained(tmp_path / "dense")
    save_pruned_model(slim, tmp_path / "slim")
    out = tmp_path / "result.json"
    argv = ["hf-oto", "benchmark", str(tmp_path / "dense"), str(tmp_path / "slim")]
    argv += ["--batch_size", "1", "--seq_length", "8", "--threads", "1", "--repeats", "2", "--warmup", "0"]
    with mock.patch.object(sys, "argv", [*argv, "--json", str(out)]):
        assert cli.main() == 0
    printed = capsys.readouterr().out
    assert f"| {tmp_path / 'dense'} |" in printed and "speedup" in printed
    data = json.loads(out.read_text())
    assert (
        data["repeats"] == 2
        and data["num_threads"] == 1
        and data["allow_spinning"] is False
        and data["slim_params"] == count_parameters(slim)
    )
    with mock.patch.object(sys, "argv", [*argv[:4], "--repeats", "0"]), pytest.raises(SystemExit):
        cli.main()
    assert cli.main(["export", str(tmp_path / "slim"), str(tmp_path / "slim" / "onnx")]) == 0
    _ort_outputs_match(slim, tmp_path / "slim" / "onnx", "text-classification")


# ----------------------------------------------------------------------------------------------------------------
# Conv nets: hf_oto's CIFAR VGG / ResNet (its own model type, registered with Optimum) and transformers' ResNet & co.
# ----------------------------------------------------------------------------------------------------------------
def _tiny_regnet():
    from transformers import RegNetConfig, RegNetForImageClassification

    config = RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], groups_width=4, num_labels=3)
    config.image_size = 32
    return RegNetForImageClassification(config)


def _tiny_efficientnet():
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    config = EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.2, hidden_dim=128, num_labels=3
    )
    return EfficientNetForImageClassification(config)


def _slim_convnet(factory, seed: int = 0):
    """A conv net with non-trivial batch norms and half of its channel groups zeroed at random, and its slim copy."""
    from .tiny_convnets import randomize_batch_norms

    torch.manual_seed(seed)
    model = randomize_batch_norms(factory()).eval()
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(seed)))
    slim, _ = prune_zero_groups(model, zigs, inplace=False)
    return model, slim.eval()


def _convnet_factories():
    from .tiny_convnets import tiny_cifar_resnet, tiny_hf_convnext, tiny_hf_mobilenet, tiny_hf_resnet, tiny_vgg

    return {
        "cifar-vgg": tiny_vgg,
        "cifar-resnet-basic": lambda: tiny_cifar_resnet("basic"),
        "cifar-resnet-bottleneck": tiny_cifar_resnet,
        "hf-resnet": tiny_hf_resnet,
        "hf-regnet": _tiny_regnet,
        "hf-efficientnet": _tiny_efficientnet,
        "hf-convnext": tiny_hf_convnext,
        "hf-convnext-v2": lambda: tiny_hf_convnext(2),  # its global response norm becomes a stand-in when sliced
        "hf-mobilenet-v1": tiny_hf_mobilenet,
        "hf-mobilenet-v2": lambda: tiny_hf_mobilenet(2),  # Optimum spells this type `mobilenet_v2`
    }


@pytest.mark.parametrize("name", list(_convnet_factories()))
def test_slim_convnet_exports_validates_and_loads_with_ort_model(tmp_path, name):
    dense, slim = _slim_convnet(_convnet_factories()[name])
    assert count_parameters(slim) < count_parameters(dense)
    assert resolve_task(slim) == "image-classification"
    directory = export_onnx(slim, tmp_path / "onnx")  # validate=True: ONNX Runtime vs PyTorch within atol=1e-4
    assert sorted(path.name for path in directory.iterdir()) == ["config.json", "model.onnx"]
    ort_model = optimum_ort.ORTModelForImageClassification.from_pretrained(directory)
    size = getattr(slim.config, "image_size", None) or 224
    pixels = torch.randn(3, slim.config.num_channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = slim(pixel_values=pixels).logits
    torch.testing.assert_close(torch.as_tensor(ort_model(pixel_values=pixels).logits), expected, atol=1e-4, rtol=1e-4)


def test_cifar_convnet_is_registered_with_optimum():
    from optimum.exporters.tasks import TasksManager

    from hf_oto.onnx import register_onnx_configs

    register_onnx_configs()
    register_onnx_configs()  # idempotent
    tasks = TasksManager.get_supported_tasks_for_model_type(
        "hf-oto-cifar-convnet", "onnx", library_name="transformers"
    )
    assert list(tasks) == ["image-classification"]
    _, slim = _slim_convnet(_convnet_factories()["cifar-vgg"])
    with pytest.raises(ValueError, match="not supported by Optimum's ONNX exporter"):
        resolve_task(slim, "feature-extraction")


def test_cifar_convnet_export_refuses_options_it_cannot_honour(tmp_path):
    _, slim = _slim_convnet(_convnet_factories()["cifar-vgg"])
    with pytest.raises(ValueError, match="optimize='O2' is not available .* Drop `optimize`"):
        export_onnx(slim, tmp_path / "onnx", optimize="O2")
    with pytest.raises(ValueError, match=r"Export options \['slim'\] are not supported"):
        export_onnx(slim, tmp_path / "onnx", slim=True)
    assert not (tmp_path / "onnx").exists()  # nothing left behind by a refused export


def test_convnet_validation_compares_the_outputs(tmp_path):
    import copy

    from hf_oto.onnx import check_onnx_outputs

    _, slim = _slim_convnet(_convnet_factories()["cifar-resnet-basic"])
    directory = export_onnx(slim, tmp_path / "onnx", validate=False)
    assert max(check_onnx_outputs(slim, directory).values()) <= 1e-4
    changed = copy.deepcopy(slim)
    with torch.no_grad():
        changed.convnet.classifier.bias.add_(1e-2)  # another model than the exported one
    with pytest.raises(ValueError, match="differs from the PyTorch model"):
        check_onnx_outputs(changed, directory)


def test_benchmark_speedup_of_a_slim_convnet(tmp_path):
    from hf_oto.modeling import save_pruned_model

    dense, slim = _slim_convnet(_convnet_factories()["cifar-vgg"])
    result = benchmark_speedup(dense, slim, batch_size=8, warmup=1, repeats=2, num_threads=1, progress=False)
    assert result.dense.samples == result.slim.samples == 2 and result.speedup > 0
    assert result.dense_flops == count_flops(dense, batch_size=8) and result.flops_ratio > 1
    # the CLI on saved folders: hf_oto's own architecture is found by its class name
    dense.save_pretrained(tmp_path / "dense")
    save_pruned_model(slim, tmp_path / "slim")
    from hf_oto import cli

    assert cli.main(["export", str(tmp_path / "slim"), str(tmp_path / "slim" / "onnx")]) == 0
    ort_model = optimum_ort.ORTModelForImageClassification.from_pretrained(tmp_path / "slim" / "onnx")
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = slim(pixel_values=pixels).logits
    torch.testing.assert_close(torch.as_tensor(ort_model(pixel_values=pixels).logits), expected, atol=1e-4, rtol=1e-4)
    argv = ["benchmark", str(tmp_path / "dense"), str(tmp_path / "slim"), "--batch_size", "2", "--repeats", "2"]
    assert cli.main([*argv, "--warmup", "0", "--threads", "1", "--no_progress"]) == 0
