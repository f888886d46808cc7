"""The bookkeeping of the benchmarks (`bench_vs_torch_pruning.py`, `bench_cnn_fashion_mnist.py`): which run is which,
with which settings, and how it is reported."""

import importlib.util
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_vs_torch_pruning")


@pytest.fixture(scope="module")
def cnn_bench():
    return load_benchmark("bench_cnn_fashion_mnist")


def test_oto_options_parse_to_typed_fields_and_refuse_unknown_names(bench):
    assert bench.parse_oto_options(["oto_pruning_periods=8", "oto_max_kind_sparsity=heads=0.5"]) == {
        "oto_pruning_periods": 8,
        "oto_max_kind_sparsity": "heads=0.5",
    }
    with pytest.raises(ValueError, match="'oto_periods' is not a field of OTOTrainingArguments"):
        bench.parse_oto_options(["oto_periods=8"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        bench.parse_oto_options(["oto_pruning_periods"])


def test_runs_record_their_periods_and_are_reported_apart_when_they_differ_from_the_default(bench):
    from hf_oto import OTOTrainingArguments

    default = OTOTrainingArguments.__dataclass_fields__["oto_pruning_periods"].default
    args = bench.parse_args(["--methods", "oto_target"])
    settings = bench.run_settings(args, "oto_target")
    assert settings["oto_options"] == {"oto_pruning_periods": default}
    other = bench.run_settings(bench.parse_args(["--oto_options", f"oto_pruning_periods={default + 1}"]), "oto_target")
    assert bench.run_key("oto_target", 0, 0.5, settings) != bench.run_key("oto_target", 0, 0.5, other)

    runs = [
        {"method": "oto_target", "settings": settings},
        {"method": "oto_target", "settings": other},
        {"method": "dense", "settings": bench.run_settings(args, "dense")},
    ]
    labels = [bench.run_label(run) for run in runs]
    assert labels == ["oto_target", f"oto_target[pruning_periods={default + 1}]", "dense"]
    assert bench.report_labels(runs) == ["dense", "oto_target", f"oto_target[pruning_periods={default + 1}]"]


def test_cnn_bench_resolves_each_modes_schedule_and_refuses_target_options_in_the_paper_mode(cnn_bench):
    paper = cnn_bench.parse_args([])
    assert (paper.oto_init_fraction, paper.oto_pruning_fraction, paper.oto_pruning_periods) == (0.3, None, None)
    target = cnn_bench.parse_args(["--oto_mode", "target", "--oto_target_flops", "0.25", "--oto_pruning_periods", "8"])
    assert (target.oto_init_fraction, target.oto_pruning_fraction, target.oto_pruning_periods) == (0.1, 0.2, 8)
    argv = cnn_bench.oto_argv(target)
    assert (
        argv[argv.index("--oto_init_fraction") + 1] == "0.1" and argv[argv.index("--oto_pruning_periods") + 1] == "8"
    )
    assert "--oto_lambda" not in argv
    with pytest.raises(SystemExit):
        cnn_bench.parse_args(["--oto_pruning_periods", "4"])  # paper mode


def test_cnn_bench_runs_dense_oto_and_the_thinner_network_per_seed_and_summarises(cnn_bench):
    calls = []

    class FakeScript:
        @staticmethod
        def main(argv):
            calls.append(argv)
            seed = int(argv[argv.index("--seed") + 1])
            if "--width_multiplier" in argv:
                return {"eval_accuracy": 0.80 + seed / 1000, "dense_flops": 26, "dense_params": 30}
            if "--dense_baseline" in argv:
                return {"eval_accuracy": 0.86 + seed / 1000, "dense_flops": 100, "dense_params": 100}
            return {
                "eval_accuracy": 0.85 + 2 * seed / 1000, "flops_ratio": 0.25, "params_ratio": 0.2,
                "group_sparsity": 0.5, "architecture": "4-8", "channels_before": {}, "dense_flops": 100,
                "dense_params": 100,
            }  # fmt: skip

    args = cnn_bench.parse_args(["--oto_mode", "target", "--oto_target_flops", "0.249", "--uniform_baseline"])
    rows = [cnn_bench.run_seed(FakeScript, args, "vgg16_bn", seed) for seed in (1, 2)]
    assert len(calls) == 6 and [call[call.index("--width_multiplier") + 1] for call in calls[2::3]] == ["0.5", "0.5"]
    assert all("--oto_mode" not in call for call in calls[0::3] + calls[2::3])
    assert rows[1]["uniform_top1"] == pytest.approx(0.802) and rows[1]["uniform_flops_ratio"] == pytest.approx(0.26)
    header, _, line = cnn_bench.summary_rows(rows)
    assert "OTO − dense" in header
    assert line == (
        "| vgg16_bn | 1, 2 | 86.15 ± 0.07% | 85.30 ± 0.14% | -0.85 (per seed -0.90, -0.80) | 80.15 ± 0.07% | "
        "25.0% / 26.0% |"
    )
