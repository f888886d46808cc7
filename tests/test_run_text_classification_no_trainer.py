"""scripts/run_text_classification_oto_no_trainer.py: end to end (bf16, gradient accumulation, checkpoints), a job
killed with SIGKILL in each HSPG stage and resumed, and the refusals that happen before any training step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from hf_oto import build_zigs, load_pruned_model

from .hub_mock import mock_hub, tokenizer_files
from .testing_utils import REPO, SCRIPTS, launch_env, load_script, reviews, write_csv, write_tiny_classifier


SCRIPT = SCRIPTS / "run_text_classification_oto_no_trainer.py"
TIMEOUT = 300  # seconds for one training process (about 6 s on 2 idle cores)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Each run builds its own `Accelerator` (with its own mixed precision)."""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny BERT (dropout on, as in real models) and 40 labelled movie-review lines."""
    root = tmp_path_factory.mktemp("no-trainer")
    return {"model": write_tiny_classifier(root / "model"), "train": write_csv(root / "train.csv", reviews())}


def arguments(job: dict, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(job["model"]), "--train_file", str(job["train"]),
        "--label_column_name", "sentiment", "--output_dir", str(output_dir), "--max_seq_length", "16",
        "--learning_rate", "1e-2", "--oto_mode", "paper", "--oto_lambda", "10", "--logging_steps", "2", *extra,
    ]  # fmt: skip


def test_end_to_end_bf16_gradient_accumulation(tmp_path, job, one_thread):
    output_dir = tmp_path / "out"
    argv = arguments(
        job, output_dir, "--validation_file", str(job["train"]), "--test_file", str(job["train"]),
        "--do_eval", "--do_predict", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
        "--max_steps", "12", "--oto_init_steps", "4", "--mixed_precision", "bf16", "--warmup_steps", "2",
        "--checkpointing_steps", "4", "--checkpoints_total_limit", "2",
        "--push_to_hub", "--hub_model_id", "reviews-oto", "--report_to", "tensorboard", "--disable_tqdm", "true",
    )  # fmt: skip
    with (
        mock_hub() as hub,
        mock.patch("accelerate.Accelerator.init_trackers") as init_trackers,
        mock.patch("accelerate.Accelerator.log") as log,
    ):
        results = load_script("run_text_classification_oto_no_trainer").main(argv)
    init_trackers.assert_called_once()
    assert init_trackers.call_args.kwargs["config"]["learning_rate"] == 1e-2
    assert [call.kwargs["step"] for call in log.call_args_list] == [2, 4, 6, 8, 10, 12]
    assert hub.created == [{"repo_id": "me/reviews-oto", "private": None, "exist_ok": True, "repo_type": "model"}]
    (upload,) = hub.uploads
    assert upload["folder"] == str((output_dir / "pruned").absolute())
    assert upload["files"] == sorted(
        ["README.md", "config.json", "model.safetensors", "oto_layout.png", *tokenizer_files(upload["folder"])]
    )
    assert 'load_pruned_model("me/reviews-oto"' in upload["card"] and "- type: accuracy" in upload["card"]
    assert results["pruned_model_dir"] == "pruned"

    assert json.loads((output_dir / "all_results.json").read_text()) == json.loads(json.dumps(results))
    assert results["mixed_precision"] == "bf16" and results["num_processes"] == 1
    assert results["train_steps"] == 12 and results["oto_init_steps_resolved"] == 4 and results["skipped_steps"] == 0
    assert results["zero_groups"] > 0 and results["params"] < results["dense_params"]
    assert results["eval_samples"] == 40 and 0.0 <= results["eval_accuracy"] <= 1.0
    predictions = (output_dir / "predict_results.txt").read_text().splitlines()
    assert len(predictions) == 41 and {line.split("\t")[1] for line in predictions[1:]} <= {"negative", "positive"}
    # Every 4 steps and at the end, the last two kept; each checkpoint holds the HSPG state of its step.
    checkpoints = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_12", "step_8"]
    for step in (8, 12):
        state = torch.load(output_dir / "checkpoints" / f"step_{step}" / "optimizer.bin", weights_only=False)
        assert state["param_groups"][0]["step_count"] == step
    pruned = output_dir / "pruned"
    assert (pruned / "README.md").is_file()
    slim = load_pruned_model(pruned, auto_class=AutoModelForSequenceClassification)
    assert sum(p.numel() for p in slim.parameters()) == results["params"]
    # The slim model is the final checkpoint's group-sparse model with its zero groups sliced away.
    dense = AutoModelForSequenceClassification.from_pretrained(job["model"], num_labels=2).eval()
    dense.load_state_dict(load_file(output_dir / "checkpoints" / "step_12" / "model.safetensors"))
    assert build_zigs(dense).num_zero_groups() == results["zero_groups"]
    inputs = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(slim(**inputs).logits, dense(**inputs).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# A job killed with SIGKILL and resumed
# ----------------------------------------------------------------------------------------------------------------
KILL_RUN = (
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "30",
    "--oto_init_steps", "12", "--lr_scheduler_type", "linear", "--warmup_steps", "3", "--checkpointing_steps", "2",
    "--validation_file", "{train}", "--do_eval",
)  # fmt: skip
"""30 optimizer steps of 2 x 4 examples (6 epochs of 5 steps), initialization stage for the first 12."""


def start(job: dict, output_dir: Path, *extra: str) -> subprocess.Popen:
    argv = [arg.format(train=job["train"]) for arg in KILL_RUN]
    command = [sys.executable, str(SCRIPT), *arguments(job, output_dir, *argv, *extra)]
    return subprocess.Popen(command, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_once_saved(process: subprocess.Popen, checkpoint: Path) -> None:
    """SIGKILLs `process` as soon as `checkpoint` is complete (checkpoints appear under their final name only once
    written); the process goes on training meanwhile, so the kill lands mid-run at a moment no one chooses."""
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.exists():
        if process.poll() is not None:
            pytest.fail(f"The training process ended ({process.returncode}) before {checkpoint.name}: "
                        f"{process.stderr.read()[-3000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"No {checkpoint.name} after {TIMEOUT} s.")
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def checkpoint_model(job: dict, checkpoint: Path) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(job["model"], num_labels=2)
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return model


def last_checkpoint(job: dict, output_dir: Path) -> tuple[int, int]:
    """HSPG step count and number of zero groups of the checkpoint a resume will start from."""
    checkpoint = load_script("run_text_classification_oto_no_trainer").resolve_checkpoint("latest", str(output_dir))
    step_count = torch.load(checkpoint / "optimizer.bin", weights_only=False)["param_groups"][0]["step_count"]
    return step_count, build_zigs(checkpoint_model(job, checkpoint)).num_zero_groups()


def test_sigkill_in_each_stage_then_resume_equals_an_uninterrupted_run(tmp_path, job):
    """Killed once in the initialization stage and once in the half-space stage (with zero groups), resumed each
    time from the last complete checkpoint: the final weights, HSPG state, zero groups, slim model and metrics are
    bit-identical to those of a run never interrupted (same seed, CPU kernels, one thread)."""
    reference = tmp_path / "reference"
    reference_run = start(job, reference)  # runs alongside the killed job (2 cores)
    killed = tmp_path / "killed"

    kill_once_saved(start(job, killed), killed / "checkpoints" / "step_4")
    assert not (killed / "all_results.json").exists()
    step_count, _ = last_checkpoint(job, killed)
    assert 4 <= step_count < 12, f"the first kill must leave an initialization-stage checkpoint, not {step_count}"

    kill_once_saved(start(job, killed, "--resume_from_checkpoint", "latest"), killed / "checkpoints" / "step_16")
    assert not (killed / "all_results.json").exists()
    step_count, zero_groups = last_checkpoint(job, killed)
    assert 16 <= step_count < 30 and zero_groups > 0, (step_count, zero_groups)

    final = start(job, killed, "--resume_from_checkpoint", "latest")
    for process in (final, reference_run):
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, stderr.decode()[-3000:]

    resumed = json.loads((killed / "all_results.json").read_text())
    expected = json.loads((reference / "all_results.json").read_text())
    assert resumed["resumed_from"].endswith(f"step_{step_count}") and expected["resumed_from"] is None
    for key in ("zero_groups", "group_sparsity_by_family", "params", "train_loss", "eval_accuracy", "eval_loss"):
        assert resumed[key] == expected[key], key
    ours, theirs = (directory / "checkpoints" / "step_30" for directory in (killed, reference))
    weights, reference_weights = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    for name, tensor in reference_weights.items():
        assert torch.equal(weights[name], tensor), name
    state, reference_state = (torch.load(path / "optimizer.bin", weights_only=False) for path in (ours, theirs))
    assert state["param_groups"] == reference_state["param_groups"]
    for index, values in reference_state["state"].items():
        for key, tensor in values.items():
            assert torch.equal(state["state"][index][key], tensor), (index, key)
    zigs = build_zigs(checkpoint_model(job, ours))
    assert torch.equal(zigs.zero_mask(), build_zigs(checkpoint_model(job, theirs)).zero_mask())
    assert zigs.num_zero_groups() == expected["zero_groups"] > 0
    slim, reference_slim = (load_file(path / "pruned" / "model.safetensors") for path in (killed, reference))
    assert all(torch.equal(slim[name], tensor) for name, tensor in reference_slim.items())


# ----------------------------------------------------------------------------------------------------------------
# Refused before any training step
# ----------------------------------------------------------------------------------------------------------------
def test_output_dir_of_another_run_is_refused(tmp_path, job):
    script = load_script("run_text_classification_oto_no_trainer")
    output_dir = tmp_path / "out"
    (output_dir / "checkpoints" / "step_6").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"holds the state of an earlier run \(checkpoints\).*--resume_from_checkpoint"
    ):
        script.main(arguments(job, output_dir, "--max_steps", "2"))
    (output_dir / "notes.txt").write_text("not ours")
    with pytest.raises(ValueError, match=r"not this run's resumable state: notes\.txt.*--overwrite_output_dir"):
        script.main(arguments(job, output_dir, "--max_steps", "2", "--resume_from_checkpoint", "latest"))
    (output_dir / "notes.txt").unlink()
    (output_dir / "pruned").mkdir()
    (output_dir / "pruned" / "model.safetensors").write_bytes(b"an earlier slim model")
    with pytest.raises(ValueError, match=r"slim-model folder .*pruned' already holds model.safetensors"):
        script.main(arguments(job, output_dir, "--max_steps", "2", "--resume_from_checkpoint", "latest"))
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == ["step_6"]  # nothing trained
    with pytest.raises(ValueError, match="no complete checkpoint"):
        script.main(arguments(job, tmp_path / "new", "--max_steps", "2", "--resume_from_checkpoint", "latest"))
    with pytest.raises(ValueError, match="is not a checkpoint of this script"):
        script.main(arguments(job, tmp_path / "new", "--max_steps", "2", "--resume_from_checkpoint", str(tmp_path)))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--max_steps", "0"), "--max_steps must be a positive number"),
        (("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps must be a positive integer"),
        (("--learning_rate", "-1"), "--learning_rate must be >= 0"),
        (("--checkpointing_steps", "0"), "--checkpointing_steps must be a positive integer"),
        (("--oto_mode", "paper", "--oto_lambda", "-0.5"), "oto_lambda must be a finite number > 0"),
        (("--oto_epsilon", "1.0"), r"oto_epsilon must be in \[0, 1\)"),
        (("--oto_mode", "paper", "--oto_max_group_sparsity", "0"), r"oto_max_group_sparsity must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_are_refused_when_parsed(tmp_path, job, flags, message):
    with pytest.raises(ValueError, match=message):
        load_script("run_text_classification_oto_no_trainer").parse_arguments(arguments(job, tmp_path / "out", *flags))


class _Planted:
    """A pickle whose loading would create a marker file: what an attacker would plant in a checkpoint folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_planted_pickle_in_a_checkpoint_is_never_unpickled(tmp_path, job, one_thread):
    script = load_script("run_text_classification_oto_no_trainer")
    output_dir = tmp_path / "out"
    script.main(arguments(job, output_dir, "--max_steps", "2", "--checkpointing_steps", "1"))
    checkpoint = output_dir / "checkpoints" / "step_2"
    progress = json.loads((checkpoint / script.PROGRESS_FILE).read_text())
    assert progress["completed_steps"] == 2 and not list(checkpoint.glob("*custom_checkpoint*"))
    marker = tmp_path / "marker"
    torch.save(_Planted(marker), checkpoint / "custom_checkpoint_0.pkl")
    resumed = ("--max_steps", "4", "--pruned_model_dir", str(tmp_path / "pruned-2"), "--resume_from_checkpoint")
    for resume in ("latest", str(checkpoint)):
        with pytest.raises(ValueError, match=r"holds \['custom_checkpoint_0.pkl'\].*weights_only=False.*not loaded"):
            script.main(arguments(job, output_dir, *resumed, resume))
    assert not marker.exists()
    # A tampered progress file is refused, not trusted.
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    (checkpoint / script.PROGRESS_FILE).write_text(json.dumps({**progress, "epoch": "0; rm -rf /"}))
    with pytest.raises(ValueError, match="is not the training progress of this script"):
        script.main(arguments(job, output_dir, *resumed, "latest"))
    assert not marker.exists()
    (checkpoint / script.PROGRESS_FILE).write_text(json.dumps(progress))
    assert script.main(arguments(job, output_dir, *resumed, "latest"))["train_steps"] == 4
