"""The bookkeeping of `benchmarks/bench_vs_torch_pruning.py`: which run is which, and how it is reported."""

import importlib.util
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_vs_torch_pruning", ROOT / "benchmarks" / "bench_vs_torch_pruning.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
