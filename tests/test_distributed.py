"""HSPG under multi-process data parallel (DDP): 2 CPU processes with the gloo backend. One `torchrun` launch runs a
plain Accelerate loop with HSPG and then `OTOTrainer` in the same two processes (each launch costs seconds of imports);
`accelerate launch` runs the no-trainer script.

After the run, both processes must hold bit-identical parameters, HSPG state and zero groups, and match a single
process trained on the same global batch. That match is within float tolerance, not exact: the gradient of the global
batch is the gloo all-reduce of two half-batch gradients, another summation order than one full batch (every process,
the test process included, runs one intra-op thread). Those ~1e-7 relative differences per step, through 12 Adam
steps, leave parameters within a few 1e-6 (measured: 3.7e-6); the zero groups must be exactly the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_oto.distributed import UNSUPPORTED_DISTRIBUTED_TYPES, check_distributed_support

from . import distributed_worker
from .testing_utils import (
    REPO,
    SCRIPTS,
    free_port,
    load_script,
    reviews,
    run_launcher,
    write_csv,
    write_tiny_classifier,
)


WORKER = REPO / "tests" / "distributed_worker.py"
NO_TRAINER_SCRIPT = SCRIPTS / "run_text_classification_oto_no_trainer.py"
TIMEOUT = 300  # seconds per launch; one takes 5-10 s on 2 idle cores, 3x that when they are busy


def accelerate_launch(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *args,
    ]  # fmt: skip


def assert_identical(rank0: dict, rank1: dict) -> None:
    """Bit-identical parameters, HSPG state and zero groups on both processes."""
    assert rank0["params"].keys() == rank1["params"].keys()
    for name, tensor in rank0["params"].items():
        assert torch.equal(tensor, rank1["params"][name]), name
    assert torch.equal(rank0["zero_mask"], rank1["zero_mask"])
    state0, state1 = rank0["optimizer"], rank1["optimizer"]
    assert state0["param_groups"] == state1["param_groups"]
    assert state0["state"].keys() == state1["state"].keys()
    for index, values in state0["state"].items():
        for key, tensor in values.items():
            assert torch.equal(tensor, state1["state"][index][key]), (index, key)


def assert_close_to(distributed: dict, single: dict) -> None:
    """The same run in one process with the same global batch: same zero groups, close parameters and moments."""
    assert torch.equal(distributed["zero_mask"], single["zero_mask"])
    assert distributed["step_count"] == single["step_count"]
    for name, tensor in distributed["params"].items():
        torch.testing.assert_close(tensor, single["params"][name], rtol=1e-4, atol=2e-5, msg=name)
    assert distributed["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]  # incl. lr and steps
    # Moments are compared on the scale of the largest moment of their kind: a tensor whose gradient is rounding noise
    # (e.g. the bias feeding only zeroed groups) has moments that differ relatively by any amount.
    states, references = distributed["optimizer"]["state"], single["optimizer"]["state"]
    for key in ("exp_avg", "exp_avg_sq"):
        scale = max(float(values[key].abs().max()) for values in references.values())
        for index, values in references.items():
            torch.testing.assert_close(states[index][key], values[key], rtol=1e-3, atol=1e-4 * scale, msg=(index, key))
        assert all(torch.equal(states[index]["step"], values["step"]) for index, values in references.items())


@pytest.fixture(scope="module")
def torchrun_outputs(tmp_path_factory) -> Path:
    """Both runs (Accelerate loop, then OTOTrainer) of `distributed_worker.py` under `torchrun` with 2 processes."""
    output_dir = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(WORKER), str(output_dir), "accelerate", "trainer", "trainer_target",
    ]  # fmt: skip
    run_launcher(command, TIMEOUT)
    return output_dir


def load_ranks(output_dir: Path, mode: str) -> tuple[dict, dict]:
    return tuple(torch.load(output_dir / f"{mode}-rank{index}.pt", weights_only=False) for index in range(2))


def test_hspg_in_an_accelerate_loop_under_ddp(torchrun_outputs, fresh_accelerate_state, one_thread):
    rank0, rank1 = load_ranks(torchrun_outputs, "accelerate")
    assert_identical(rank0, rank1)
    settings = distributed_worker.SETTINGS
    assert rank0["step_count"] == settings["steps"]
    # The run reached the half-space stage and zeroed groups up to the bound, the case where ranks could diverge.
    num_groups = rank0["zero_mask"].numel()
    assert int(rank0["zero_mask"].sum()) == int(settings["max_group_sparsity"] * num_groups)
    single, _ = distributed_worker.train_accelerate(num_processes=1)
    assert_close_to(rank0, single)


def test_oto_trainer_under_ddp(torchrun_outputs, tmp_path, fresh_accelerate_state, one_thread):
    rank0, rank1 = load_ranks(torchrun_outputs, "trainer")
    assert_identical(rank0, rank1)
    assert int(rank0["zero_mask"].sum()) > 0
    single, _ = distributed_worker.train_trainer(num_processes=1, output_dir=str(tmp_path / "single"))
    assert_close_to(rank0, single)


def test_oto_trainer_target_mode_under_ddp(torchrun_outputs, tmp_path, fresh_accelerate_state, one_thread):
    """The target mode's saliency, selection and ramps take the same decisions on every process, and the ones a
    single process takes on the same global batch."""
    rank0, rank1 = load_ranks(torchrun_outputs, "trainer_target")
    assert_identical(rank0, rank1)
    assert int(rank0["zero_mask"].sum()) > 0
    single, _ = distributed_worker.train_trainer(
        num_processes=1, output_dir=str(tmp_path / "single"), oto_mode="target"
    )
    assert_close_to(rank0, single)


def test_no_trainer_script_under_accelerate_launch(tmp_path, fresh_accelerate_state, one_thread):
    """The script on 2 processes x 4 examples equals the script on 1 process x 8 examples; only the main process
    writes the checkpoints, the slim model and all_results.json."""
    model_dir = write_tiny_classifier(tmp_path / "model")
    # Without dropout: the processes' dropout masks over half batches cannot equal one mask over the whole batch.
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model_dir / "config.json").write_text(json.dumps(config))
    train = write_csv(tmp_path / "train.csv", reviews())

    def argv(output_dir: Path, batch_size: int) -> list[str]:
        return [
            "--model_name_or_path", str(model_dir), "--train_file", str(train), "--label_column_name", "sentiment",
            "--output_dir", str(output_dir), "--max_seq_length", "16", "--per_device_train_batch_size",
            str(batch_size), "--max_steps", "10", "--learning_rate", "1e-2", "--warmup_steps", "2",
            "--oto_init_steps", "4", "--oto_cost_seq_length", "16", "--checkpointing_steps", "5", "--use_cpu",
            "--pad_to_max_length",
        ]  # fmt: skip

    run_launcher(accelerate_launch(str(NO_TRAINER_SCRIPT), *argv(tmp_path / "ddp", 4)), TIMEOUT)
    results = json.loads((tmp_path / "ddp" / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["train_steps"] == 10 and results["zero_groups"] > 0
    assert sorted(path.name for path in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step_10", "step_5"]
    single = load_script("run_text_classification_oto_no_trainer").main(argv(tmp_path / "single", 8))
    assert single["num_processes"] == 1 and single["zero_groups"] == results["zero_groups"]
    assert single["group_sparsity_by_family"] == results["group_sparsity_by_family"]
    distributed = load_file(tmp_path / "ddp" / "checkpoints" / "step_10" / "model.safetensors")
    reference = load_file(tmp_path / "single" / "checkpoints" / "step_10" / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(distributed[name], tensor, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_DISTRIBUTED_TYPES))
def test_sharded_setups_are_refused(name):
    from accelerate.utils import DistributedType

    with pytest.raises(ValueError, match=f"OTO does not support {name}: .*Train with data parallel"):
        check_distributed_support(DistributedType(name))


@pytest.mark.parametrize("name", ["NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU"])
def test_data_parallel_setups_pass(name):
    from accelerate.utils import DistributedType

    check_distributed_support(DistributedType(name))
