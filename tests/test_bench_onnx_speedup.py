"""The conv-net rows of benchmarks/bench_onnx_speedup.py on tiny CIFAR conv nets (one timed round: a smoke test of
the zero patterns, the exports and the JSON, not a measurement)."""

import json
import sys

import pytest


pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("onnxruntime")

from hf_oto import build_zigs, count_flops, save_pruned_model  # noqa: E402
from hf_oto.costs import GroupCosts  # noqa: E402
from hf_oto.models import CifarConvNetConfig  # noqa: E402

from .testing_utils import BENCHMARKS, load_script  # noqa: E402


BENCH = BENCHMARKS / "bench_onnx_speedup.py"
TINY_CONFIGS = {
    "tiny_vgg": lambda **kwargs: CifarConvNetConfig(architecture="vgg", vgg_layers=[8, "M", 16, 16, "M"], **kwargs),
    "tiny_resnet": lambda **kwargs: CifarConvNetConfig(
        architecture="resnet", block="basic", depths=[1, 1], widths=[8, 16], stem_width=8, **kwargs
    ),
}


@pytest.fixture
def bench(monkeypatch):
    module = load_script("bench_onnx_speedup", BENCHMARKS)
    monkeypatch.setattr(module, "CNN_CONFIGS", TINY_CONFIGS)
    return module


@pytest.mark.parametrize("layout", ["uniform", "ramp"])
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_zero_pattern_keeps_the_target_share_of_the_flops(bench, name, layout):
    dense = bench.build_convnet(name)
    costs = GroupCosts.measure(build_zigs(dense))
    counts = bench.convnet_zero_counts(costs, 0.25, layout)
    slim = bench.prune_convnet(dense, counts, seed=0)
    kept = count_flops(slim) / count_flops(dense)
    assert kept <= 0.25 and kept == pytest.approx(costs.flops(counts) / costs.dense["flops"])
    assert all(0 < channels for channels in slim.config.oto_layout["channels"].values())
    if layout == "ramp":  # the deepest family loses a larger share than the first
        assert counts[-1] / costs.num_groups[-1] > counts[0] / costs.num_groups[0]
    with pytest.raises(ValueError, match="raise --cnn_flops_targets"):
        bench.convnet_zero_counts(costs, 1e-6, layout)


def test_convnet_rows_run_end_to_end(bench, tmp_path, monkeypatch):
    dense = bench.build_convnet("tiny_vgg")
    counts = bench.convnet_zero_counts(GroupCosts.measure(build_zigs(dense)), 0.5, "uniform")
    save_pruned_model(bench.prune_convnet(dense, counts, seed=1), tmp_path / "pruned-vgg")
    out = tmp_path / "rows.json"
    argv = [
        "--models", "none", "--cnn_models", "tiny_vgg,tiny_resnet", "--cnn_layouts", "ramp", "--cnn_repeats", "1",
        "--warmup", "0", "--threads", "1", "--cnn_batch_sizes", "2", "--cnn_checkpoints", str(tmp_path / "pruned-vgg"),
        "--output_json", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [str(BENCH), *argv])
    rows = bench.main()
    assert [(row["model"], row["layout"]) for row in rows] == [
        ("tiny_vgg", "ramp"), ("tiny_resnet", "ramp"), ("pruned-vgg", "checkpoint")
    ]  # fmt: skip
    for row in rows:
        assert row["kind"] == "convnet" and row["batch_size"] == 2 and row["image_size"] == [32, 32]
        assert row["seq_length"] is None and row["slim"]["samples"] == 1 and row["speedup"] > 0
    assert 1 / rows[0]["flops_ratio"] <= 0.25 and rows[2]["flops_ratio"] == pytest.approx(1 / 0.5, rel=0.2)
    assert json.loads(out.read_text())["rows"][2]["channels"] == rows[2]["channels"]
    assert "conv-net rows meet" in bench.convnet_markdown_table(rows)


def test_bad_convnet_arguments_are_refused(bench):
    with pytest.raises(ValueError, match="--cnn_models \\['alexnet'\\] unknown"):
        bench.BenchmarkArguments(cnn_models="alexnet")
    with pytest.raises(ValueError, match="--cnn_layouts"):
        bench.BenchmarkArguments(cnn_models="tiny_vgg", cnn_layouts="spiral")
    with pytest.raises(ValueError, match="shares in \\(0, 1\\)"):
        bench.BenchmarkArguments(cnn_models="tiny_vgg", cnn_flops_targets="1.5")
