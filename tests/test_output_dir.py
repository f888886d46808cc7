"""Tests of the output-folder check, the run lock and atomic folder saves (no training here; see test_trainer.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from hf_oto.atomic_folder import atomic_folder
from hf_oto.output_dir import check_model_dir, check_output_dir, check_run_dirs
from hf_oto.run_lock import LOCK_FILE_NAME, OutputDirLockedError, RunLock, read_lock

from .tiny_models import tiny_model


def write_checkpoint(folder, model, *, hspg: bool = True) -> None:
    """A `Trainer`-style checkpoint folder: config.json and an optimizer.pt (HSPG's or AdamW's parameter groups)."""
    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(folder / "config.json")
    group = {"lr": 0.1, "params": [0]}
    if hspg:
        group.update(zig_family=[0], zig_dim=[0], zig_num_groups=[4])
    torch.save({"state": {}, "param_groups": [group]}, folder / "optimizer.pt")


# ----------------------------------------------------------------------------------------------------------------
# check_output_dir
# ----------------------------------------------------------------------------------------------------------------
def test_a_missing_or_empty_folder_passes_and_the_lock_file_does_not_count(tmp_path):
    check_output_dir(tmp_path / "missing")
    check_output_dir(tmp_path)
    (tmp_path / LOCK_FILE_NAME).write_text("{}")
    (tmp_path / "runs").mkdir()  # an empty folder holds no work
    check_output_dir(tmp_path)


def test_checkpoints_of_this_model_need_resume_from_checkpoint(tmp_path):
    model = tiny_model("bert")
    write_checkpoint(tmp_path / "checkpoint-4", model)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"state of an earlier run \(checkpoint-4, runs\).*resume_from_checkpoint"):
        check_output_dir(tmp_path, model=model)
    check_output_dir(tmp_path, model=model, resume_from_checkpoint=True)
    check_output_dir(tmp_path, model=model, resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    check_output_dir(tmp_path, model=model, overwrite=True)


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (lambda path: write_checkpoint(path / "checkpoint-2", tiny_model("distilbert")), "a checkpoint of Distil"),
        (lambda path: write_checkpoint(path / "checkpoint-2", tiny_model("bert"), hspg=False), "not an HSPG"),
        (lambda path: (path / "model.safetensors").write_bytes(b"a saved model"), "model.safetensors"),
        (lambda path: (path / "notes.txt").write_text("mine"), "notes.txt"),
    ],
)
def test_anything_else_is_refused_even_when_resuming(tmp_path, write, problem):
    model = tiny_model("bert")
    write_checkpoint(tmp_path / "checkpoint-4", model)
    write(tmp_path)
    for resume in (None, True):
        with pytest.raises(ValueError, match=rf"not this run's resumable state: .*{problem}.*--overwrite_output_dir"):
            check_output_dir(tmp_path, model=model, resume_from_checkpoint=resume)
    check_output_dir(tmp_path, model=model, overwrite=True)


def test_a_finished_run_can_be_resumed_its_results_and_slim_model_are_its_own(tmp_path):
    model = tiny_model("bert")
    write_checkpoint(tmp_path / "checkpoint-4", model)
    (tmp_path / "all_results.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "config.json").write_text(json.dumps({"model_type": "bert", "oto_layout": {}}))
    check_output_dir(tmp_path, model=model, resume_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"not this run's resumable state: .*all_results.json"):
        check_output_dir(tmp_path, model=model)  # a new run would write over them
    (tmp_path / "pruned" / "config.json").write_text(json.dumps({"model_type": "bert"}))  # a dense model
    with pytest.raises(ValueError, match=r"not this run's resumable state: pruned"):
        check_output_dir(tmp_path, model=model, resume_from_checkpoint=True)


def test_a_file_as_output_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "file")


def test_run_dirs_refuse_a_slim_folder_that_is_or_holds_the_output_folder(tmp_path):
    with pytest.raises(ValueError, match="is or contains the output folder"):
        check_run_dirs(tmp_path / "out", tmp_path / "out")
    with pytest.raises(ValueError, match="is or contains the output folder"):
        check_run_dirs(tmp_path / "out", tmp_path)
    (tmp_path / "slim").mkdir()
    (tmp_path / "slim" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"slim-model folder .* already holds config.json .*--overwrite_output_dir"):
        check_model_dir(tmp_path / "slim")
    check_run_dirs(tmp_path / "out", tmp_path / "slim", overwrite=True)


# ----------------------------------------------------------------------------------------------------------------
# RunLock
# ----------------------------------------------------------------------------------------------------------------
def test_lock_is_created_released_and_reentrant(tmp_path):
    with RunLock(tmp_path / "out") as lock:
        holder = read_lock(tmp_path / "out")
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with RunLock(tmp_path / "out"):  # the same process (a script holding it, then OTOTrainer.train)
            pass
        assert lock.held and (tmp_path / "out" / LOCK_FILE_NAME).is_file()
    assert not (tmp_path / "out" / LOCK_FILE_NAME).exists()


def test_lock_released_on_an_exception(tmp_path):
    with pytest.raises(KeyError), RunLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / LOCK_FILE_NAME).exists()


def test_lock_held_by_a_live_pid_is_refused_and_a_dead_one_taken_over(tmp_path, caplog):
    lock_file = tmp_path / LOCK_FILE_NAME
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:00", "command": "x"}
    lock_file.write_text(json.dumps(live))
    with pytest.raises(OutputDirLockedError, match=rf"in use by the run with pid {os.getppid()} .*delete"):
        RunLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text()) == live  # untouched

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(json.dumps({**live, "pid": dead.pid}))
    with RunLock(tmp_path):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert not lock_file.exists()

    lock_file.write_text(json.dumps({**live, "host": "another-host", "pid": dead.pid}))  # cannot be checked
    with pytest.raises(OutputDirLockedError, match="on host 'another-host'"):
        RunLock(tmp_path).acquire()


def test_two_processes_one_folder_the_second_refuses(tmp_path):
    """A real second process (not this one, whose lock is re-entrant) on a folder this process holds."""
    code = (
        "import sys\nfrom hf_oto.run_lock import RunLock, OutputDirLockedError\n"
        "try:\n    RunLock(sys.argv[1]).acquire()\nexcept OutputDirLockedError as error:\n"
        "    print(error)\n    sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    with RunLock(tmp_path):
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert result.returncode == 3, result.stderr
    assert f"pid {os.getpid()}" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# atomic_folder
# ----------------------------------------------------------------------------------------------------------------
def test_atomic_folder_replaces_everything_or_nothing(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(ValueError, match="not empty .*overwrite=True.*whole folder is replaced"):
        with atomic_folder(target):
            pass
    with pytest.raises(RuntimeError, match="mid-way"), atomic_folder(target, overwrite=True) as staging:
        (staging / "new.bin").write_text("new")
        raise RuntimeError("mid-way")
    assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(target) == ["old.bin"]
    with atomic_folder(target, overwrite=True) as staging:
        (staging / "new.bin").write_text("new")
        assert not (target / "new.bin").exists()
    assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(target) == ["new.bin"]


def test_atomic_folder_refuses_the_folder_of_a_running_run(tmp_path):
    with RunLock(tmp_path / "out"), pytest.raises(ValueError, match="still running"):
        with atomic_folder(tmp_path / "out", overwrite=True):
            pass
