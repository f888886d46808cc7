"""End-to-end test of scripts/run_image_classification_oto.py on tiny IDX files, and of its input checks."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from hf_oto import load_pruned_model
from hf_oto.data.images import ImagePreprocessor, load_idx_dataset, read_idx
from hf_oto.models import CifarConvNetConfig, CifarConvNetForImageClassification

from .hub_mock import mock_hub
from .testing_utils import SCRIPTS, load_script, run_script


SCRIPT = SCRIPTS / "run_image_classification_oto.py"
COMMON_ARGS = [
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--max_steps", "8",
    "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--report_to", "none", "--save_strategy", "no",
    "--use_cpu", "--disable_tqdm", "true",
]  # fmt: skip


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_idx_folder(directory: Path, train: int = 64, test: int = 32, size: int = 12) -> Path:
    """Three classes of 12 x 12 grey images: a bright square at a class-dependent place, on noise."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 3
        images = rng.integers(0, 60, size=(count, size, size))
        for index, label in enumerate(labels):
            images[index, 4 * label : 4 * label + 4, 2:10] = 230
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def write_tiny_convnet(directory: Path) -> Path:
    config = CifarConvNetConfig(
        architecture="vgg", vgg_layers=[8, "M", 12, "M"], image_size=16, classifier_hidden=10, num_labels=3,
        num_channels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    CifarConvNetForImageClassification(config).save_pretrained(directory)
    return directory


def test_script_trains_prunes_and_saves_a_reloadable_slim_convnet(tmp_path):
    script = load_script("run_image_classification_oto")
    data = write_idx_folder(tmp_path / "idx")
    model_dir = write_tiny_convnet(tmp_path / "model")
    output = tmp_path / "out"
    with mock_hub() as hub:
        results, trainer = script.run(
        *script.parse_arguments(
            [
                "--model_name_or_path", str(model_dir), "--idx_dir", str(data), "--output_dir", str(output),
                "--do_train", "--do_eval", "--oto_variant", "adamw", "--oto_mode", "paper", "--oto_lambda", "50", "--oto_init_steps", "2",
                "--oto_max_group_sparsity", "0.5", *COMMON_ARGS,
                "--save_strategy", "steps", "--save_steps", "2", "--push_to_hub", "--hub_model_id", "me/fmnist-oto",
            ]
        )
    )  # fmt: skip
    assert 0.3 <= results["group_sparsity"] <= 0.5
    assert results["params_ratio"] < 1.0 and results["flops_ratio"] < 1.0
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    kept = [int(count) for count in results["architecture"].split("-")]
    assert kept == list(results["channels_after"].values())
    assert all(after <= results["channels_before"][name] for name, after in results["channels_after"].items())
    saved = json.loads((output / "all_results.json").read_text())
    assert saved["architecture"] == results["architecture"]

    slim = load_pruned_model(output / "pruned", AutoModelForImageClassification)
    assert slim.config.oto_layout["channels"] == results["channels_after"]  # config.json sorts the keys
    pixels = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # the slim model in memory (trainer.model after prune) and its reloaded copy
        assert torch.equal(slim(pixels).logits, trainer.model.eval()(pixels).logits)
    card = (output / "pruned" / "README.md").read_text()
    assert "convolution channels" in card and "## Kept channels per layer" in card and "attention heads" not in card

    (upload,) = hub.uploads
    assert [created["repo_id"] for created in hub.created] == ["me/fmnist-oto"]
    assert upload["files"] == [
        "README.md", "config.json", "model.safetensors", "oto_layout.png", "preprocessor_config.json"
    ]  # fmt: skip
    assert any(path.name.startswith("checkpoint-") for path in output.iterdir())  # dense checkpoints, not pushed
    assert "pipeline_tag: image-classification" in upload["card"]
    # The saved image processor repeats the training preprocessing: the pipeline gives the model's own scores.
    processor = AutoImageProcessor.from_pretrained(output / "pruned")
    assert processor.image_mean == saved["preprocessing"]["mean"] and processor.image_size == 16
    image = np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8)
    scores = pipeline("image-classification", model=slim, image_processor=processor, device="cpu")(
        Image.fromarray(image, mode="L"), top_k=None
    )
    with torch.no_grad():
        expected = slim(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    label2id = slim.config.label2id
    assert {p["label"]: round(p["score"], 5) for p in scores} == {
        label: round(float(expected[index]), 5) for label, index in label2id.items()
    }


def test_dense_baseline_trains_the_same_recipe_without_oto(tmp_path):
    script = load_script("run_image_classification_oto")
    data = write_idx_folder(tmp_path / "idx")
    results = script.main(
        [
            "--model_name_or_path", str(write_tiny_convnet(tmp_path / "model")), "--idx_dir", str(data),
            "--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--dense_baseline",
            "--oto_variant", "sgd", *COMMON_ARGS,
        ]
    )  # fmt: skip
    assert "group_sparsity" not in results and 0.0 <= results["eval_accuracy"] <= 1.0
    assert (tmp_path / "out" / "dense" / "config.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--idx_dir", "x"], "exactly one of --architecture"),
        (["--architecture", "vgg19", "--idx_dir", "x"], "--architecture 'vgg19' is unknown"),
        (["--architecture", "vgg16_bn"], "exactly one data source"),
        (["--architecture", "vgg16_bn", "--idx_dir", "x", "--dataset_name", "cifar10"], "exactly one data source"),
        (["--architecture", "vgg16_bn", "--idx_dir", "x", "--max_train_samples", "0"], "must be a positive"),
        (["--architecture", "vgg16_bn", "--idx_dir", "x", "--width_multiplier", "0"], "--width_multiplier must be"),
        (["--model_name_or_path", "m", "--idx_dir", "x", "--width_multiplier", "0.5"], "keeps its widths"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, argv, message):
    script = load_script("run_image_classification_oto")
    with pytest.raises(ValueError, match=message):
        script.parse_arguments([*argv, "--output_dir", str(tmp_path)])


def test_width_multiplier_builds_the_uniformly_thinner_network(tmp_path):
    script = load_script("run_image_classification_oto")
    (model_args, _, _) = script.parse_arguments(
        ["--architecture", "vgg16_bn", "--width_multiplier", "0.5", "--idx_dir", "x", "--output_dir", str(tmp_path)]
    )
    thin = script.build_model(model_args, ["a", "b", "c"], num_channels=1)
    full = CifarConvNetForImageClassification(CifarConvNetConfig.vgg16_bn(num_labels=3, num_channels=1))
    thin_widths = [m.out_channels for m in thin.modules() if isinstance(m, torch.nn.Conv2d)]
    full_widths = [m.out_channels for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert thin_widths == [width // 2 for width in full_widths]
    assert thin.config.vgg_layers.count("M") == 5 and thin.config.num_labels == 3
    assert thin(torch.zeros(1, 1, 32, 32)).logits.shape == (1, 3)


def test_idx_files_are_checked(tmp_path):
    data = write_idx_folder(tmp_path / "idx", train=6, test=3)
    assert read_idx(data / "train-images-idx3-ubyte.gz").shape == (6, 12, 12)
    loaded = load_idx_dataset(data)
    assert loaded["train"].num_rows == 6 and loaded["train"].features["label"].names == ["0", "1", "2"]

    not_idx = tmp_path / "notes.gz"
    with gzip.open(not_idx, "wb") as handle:
        handle.write(b"hello world, not an IDX file")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(not_idx)

    truncated = tmp_path / "truncated-images-idx3-ubyte.gz"
    raw = gzip.open(data / "train-images-idx3-ubyte.gz").read()
    with gzip.open(truncated, "wb") as handle:
        handle.write(raw[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(truncated)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No train-images-idx3-ubyte"):
        load_idx_dataset(tmp_path / "empty")


def test_preprocessor_pads_resizes_and_normalises():
    grey = np.full((28, 28), 255, np.uint8)
    padded = ImagePreprocessor("image", "label", 32, 1, [0.0], [1.0])({"image": [grey], "label": [1]})
    assert padded["pixel_values"].shape == (1, 1, 32, 32)
    assert padded["pixel_values"][0, 0, 0, 0] == 0.0 and padded["pixel_values"][0, 0, 2, 2] == 1.0
    colour = np.zeros((20, 20, 3), np.uint8)
    resized = ImagePreprocessor("image", "label", 32, 3, [0.5] * 3, [0.25] * 3)({"image": [colour]})
    assert resized["pixel_values"].shape == (1, 3, 32, 32) and "labels" not in resized
    assert torch.allclose(resized["pixel_values"], torch.full((1, 3, 32, 32), -2.0))
    with pytest.raises(ValueError, match="need 1 values"):
        ImagePreprocessor("image", "label", 32, 1, [0.5, 0.5], [1.0])


def test_folders_of_an_earlier_run_are_refused_before_any_work(tmp_path):
    """The slim-model folder, a plain Trainer's checkpoints in the output folder and a live run's lock are all
    refused at the start: the IDX folder does not even exist, so any data loading or training would fail first."""
    import os
    import socket

    script = load_script("run_image_classification_oto")
    output = tmp_path / "out"
    argv = [
        "--architecture", "vgg16_bn", "--idx_dir", str(tmp_path / "missing"), "--output_dir", str(output),
        "--do_train", *COMMON_ARGS,
    ]  # fmt: skip
    (output / "pruned").mkdir(parents=True)
    (output / "pruned" / "model.safetensors").write_bytes(b"an earlier slim model")
    with pytest.raises(ValueError, match=r"slim-model folder .*pruned' already holds model\.safetensors"):
        script.main(argv)
    (output / "pruned" / "model.safetensors").unlink()
    (output / "checkpoint-3").mkdir()
    (output / "checkpoint-3" / "optimizer.pt").write_bytes(b"not HSPG")
    with pytest.raises(ValueError, match=r"checkpoint-3 \(not an HSPG optimizer state"):
        script.main([*argv, "--resume_from_checkpoint", str(output / "checkpoint-3")])
    (output / "checkpoint-3" / "optimizer.pt").unlink()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "now", "command": "another run"}
    (output / "_hf_oto_run.lock").write_text(json.dumps(holder))
    with pytest.raises(RuntimeError, match=rf"in use by the run with pid {os.getppid()}"):
        script.main(argv)


def onnx_argv(tmp_path: Path) -> list[str]:
    data = write_idx_folder(tmp_path / "idx")
    return [
        "--model_name_or_path", str(write_tiny_convnet(tmp_path / "model")), "--idx_dir", str(data),
        "--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--oto_variant", "adamw",
        "--oto_mode", "paper", "--oto_lambda", "50", "--oto_init_steps", "2", "--oto_max_group_sparsity", "0.5",
        "--export_onnx", *COMMON_ARGS,
    ]  # fmt: skip


def test_script_exports_the_slim_convnet_to_onnx_and_measures_its_speedup(tmp_path):
    pytest.importorskip("optimum.exporters.onnx")
    ort = pytest.importorskip("optimum.onnxruntime")
    script = load_script("run_image_classification_oto")
    argv = [*onnx_argv(tmp_path), "--benchmark_speedup", "--benchmark_batch_size", "2", "--benchmark_repeats", "2"]
    results = script.main(argv)
    output = tmp_path / "out"
    saved = json.loads((output / "all_results.json").read_text())
    assert saved["onnx_dir"] == "pruned/onnx" and "onnx_export_error" not in saved
    assert saved["onnx_speedup"] > 0 and saved["onnx_benchmark_image_size"] == [16, 16]
    assert saved["onnx_flops_ratio"] == pytest.approx(1 / results["flops_ratio"], rel=1e-6)
    onnx_dir = output / "pruned" / "onnx"
    assert {"model.onnx", "config.json", "preprocessor_config.json"} <= {path.name for path in onnx_dir.iterdir()}
    assert "### The ONNX export" in (output / "pruned" / "README.md").read_text()

    # The export runs with Optimum and ONNX Runtime (hf_oto imported for the config and image processor classes).
    slim = load_pruned_model(output / "pruned", AutoModelForImageClassification)
    ort_model = ort.ORTModelForImageClassification.from_pretrained(onnx_dir)
    pixels = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = slim(pixel_values=pixels).logits
    torch.testing.assert_close(torch.as_tensor(ort_model(pixel_values=pixels).logits), expected, atol=1e-4, rtol=1e-4)
    processor = AutoImageProcessor.from_pretrained(onnx_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8), mode="L")
    scores = pipeline("image-classification", model=ort_model, image_processor=processor)(image, top_k=None)
    with torch.no_grad():
        probabilities = slim(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    assert {p["label"]: round(p["score"], 4) for p in scores} == {
        label: round(float(probabilities[index]), 4) for label, index in slim.config.label2id.items()
    }


def test_failed_onnx_export_keeps_the_results_and_the_slim_model_and_exits_with_status_1(tmp_path, monkeypatch):
    """The export fails half-way (a partial file written): the command exits with status 1 and a message saying
    where everything is, `all_results.json` holds the metrics and the error, the slim folder is whole, without `onnx/`."""
    pytest.importorskip("optimum.exporters.onnx")
    from hf_oto import onnx as hf_oto_onnx

    def fail_half_way(model, directory, *args, **kwargs):
        (directory / "model.onnx").write_bytes(b"half an ONNX file")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(hf_oto_onnx, "_export_hf_oto_model", fail_half_way)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *onnx_argv(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_script("run_image_classification_oto")
    message = str(exit_info.value.code)
    output = tmp_path / "out"
    assert message.startswith("ERROR: The ONNX export of the slim CifarConvNetForImageClassification")
    assert "RuntimeError: exporter crashed" in message and str(output / "all_results.json") in message
    assert f"hf-oto export {output / 'pruned'} {output / 'pruned' / 'onnx'}" in message

    saved = json.loads((output / "all_results.json").read_text())
    assert saved["onnx_export_error"] == "RuntimeError: exporter crashed" and "onnx_dir" not in saved
    assert 0.0 <= saved["eval_accuracy"] <= 1.0 and saved["flops_ratio"] < 1.0
    assert saved["pruned_model_dir"] == "pruned"
    assert sorted(path.name for path in output.iterdir() if not path.name.startswith("checkpoint-")) == [
        "all_results.json", "eval_results.json", "pruned", "train_results.json", "trainer_state.json",
    ]  # fmt: skip
    pruned = output / "pruned"
    assert not (pruned / "onnx").exists()
    slim = load_pruned_model(pruned, AutoModelForImageClassification)
    assert slim.config.oto_layout["channels"] == saved["channels_after"]
    assert "### The ONNX export" not in (pruned / "README.md").read_text()


def test_failed_speedup_benchmark_keeps_the_export(tmp_path, monkeypatch):
    pytest.importorskip("optimum.exporters.onnx")
    from hf_oto import run_outputs, speedup

    def fail(*args, **kwargs):
        raise ValueError("no time to measure")

    monkeypatch.setattr(speedup, "benchmark_speedup", fail)
    script = load_script("run_image_classification_oto")
    with pytest.raises(run_outputs.OnnxExportError, match="speedup benchmark .* failed") as error:
        script.main([*onnx_argv(tmp_path), "--benchmark_speedup", "--benchmark_repeats", "2"])
    assert error.value.stage == "benchmark" and "hf-oto benchmark" in str(error.value)
    output = tmp_path / "out"
    saved = json.loads((output / "all_results.json").read_text())
    assert saved["onnx_benchmark_error"] == "ValueError: no time to measure" and saved["onnx_dir"] == "pruned/onnx"
    assert "onnx_speedup" not in saved and "eval_accuracy" in saved
    assert (output / "pruned" / "onnx" / "model.onnx").is_file()
    assert "### The ONNX export" in (output / "pruned" / "README.md").read_text()
