"""The output-folder check every OTO run makes before training: never write over, or delete, another run's work.

A `Trainer` writes `checkpoint-N` folders into its output folder and, with `save_total_limit`, deletes the oldest
`checkpoint-*` it finds there, whoever wrote them. [`check_output_dir`] therefore refuses, before any training, an
output folder that holds anything but this run's resumable state:

- a new run (no `resume_from_checkpoint`) needs a missing or empty folder;
- a resumed run accepts only **this run's checkpoints**: `checkpoint-N` folders whose `config.json` is of the model
  being trained (same `model_type` and class) and that hold an HSPG optimizer state (`optimizer.pt` with the
  zero-invariant groups in its parameter groups), plus the Trainer's TensorBoard folder `runs/` and what a finished
  run leaves beside them (`*_results.json`, `trainer_state.json`, its slim model: a folder recording `oto_layout`,
  which this run does not write over unless it is the slim-model folder and `overwrite` is set). Anything else
  (checkpoints of another model, of a plain `Trainer` run, a saved model, results, your files) is refused.

`overwrite_output_dir=True` (`--overwrite_output_dir`) skips the check: you accept that the folder's content is
overwritten and that old checkpoints may be deleted. The run's lock file ([`hf_oto.run_lock`]) and empty folders are
not counted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, Optional, Union

from transformers.utils import logging

from .atomic_folder import folder_contents


logger = logging.get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint-\d+")
"""Names of the `Trainer`'s checkpoint folders."""
TRAINER_RUN_ENTRIES = ("runs",)
"""Entries a `Trainer` run writes next to its checkpoints during training (TensorBoard event files)."""
_FLAGS = (
    "choose another output_dir (--output_dir), or pass `overwrite_output_dir=True` (--overwrite_output_dir) to write "
    "over the folder"
)


def _model_identity(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {"model_type": getattr(config, "model_type", None), "architectures": [type(model).__name__]}


def holds_hspg_state(optimizer_file: str | os.PathLike) -> bool:
    """Whether a `Trainer` checkpoint's `optimizer.pt` is the state of HSPG (its parameter groups hold the
    zero-invariant group indices). Memory-maps the file: the tensors are not read."""
    import torch

    try:
        state = torch.load(str(optimizer_file), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many error types on unreadable or foreign files
        return False
    groups = state.get("param_groups") if isinstance(state, dict) else None
    return bool(groups) and isinstance(groups[0], dict) and "zig_family" in groups[0]


def checkpoint_problem(
    checkpoint: str | os.PathLike, model: Any = None, *, require_hspg: bool = True
) -> Optional[str]:
    """Why the `Trainer` checkpoint folder `checkpoint` is not one this run may resume (`None` when it is): another
    model's (by its `config.json`), no optimizer state, or (with `require_hspg`) a state that is not HSPG's.

    Example:

    ```python
    >>> from hf_oto.output_dir import checkpoint_problem

    >>> checkpoint_problem("outputs/run/checkpoint-500", model)  # None: a checkpoint of this model with HSPG state
    ```
    """
    path = Path(checkpoint)
    if model is not None:
        try:
            saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        ours = _model_identity(model)
        if not isinstance(saved, dict):
            return "no readable config.json"
        theirs = {"model_type": saved.get("model_type"), "architectures": saved.get("architectures")}
        if theirs["model_type"] != ours["model_type"] or (
            theirs["architectures"] is not None and theirs["architectures"] != ours["architectures"]
        ):
            name = (theirs["architectures"] or [theirs["model_type"]])[0]
            return f"a checkpoint of {name}, not of {ours['architectures'][0]}"
    optimizer = path / "optimizer.pt"
    if not optimizer.is_file():
        return "no optimizer state"
    if require_hspg and not holds_hspg_state(optimizer):
        return "not an HSPG optimizer state (a plain Trainer run?)"
    return None


RUN_RESULT_PATTERN = re.compile(r"(all|train|eval|predict|test)_results\.json|trainer_state\.json")
"""Result files a finished run leaves in its output folder; a resumed run may find them there (it writes them again)."""


def _is_run_result(entry: Path) -> bool:
    """Whether `entry` is what a finished run leaves beside its checkpoints: its results files, or its slim model
    (a folder whose `config.json` records an `oto_layout`; the slim-model folder itself is checked apart, by
    [`check_model_dir`], so it is never written over unasked)."""
    if entry.is_file():
        return RUN_RESULT_PATTERN.fullmatch(entry.name) is not None
    try:
        config = json.loads((entry / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "oto_layout" in config


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(
    output_dir: Union[str, os.PathLike, None],
    *,
    overwrite: bool = False,
    resume_from_checkpoint: Union[str, bool, None] = None,
    model: Any = None,
    require_hspg: bool = True,
    run_entries: Collection[str] = TRAINER_RUN_ENTRIES,
) -> None:
    r"""
    Refuses, with a `ValueError` naming what is there and the flag that allows it, an output folder that holds
    anything but this run's resumable state (see the module docstring for the rule). Call it before any training.

    Args:
        output_dir (`str` or `os.PathLike`): The run's output folder; nothing is checked when `None` or empty.
        overwrite (`bool`, *optional*, defaults to `False`): `overwrite_output_dir`: skip the check.
        resume_from_checkpoint (`str` or `bool`, *optional*): The run resumes (a path, `True` or `"latest"`): this
            run's checkpoints and run entries are allowed.
        model (`nn.Module`, *optional*): The model to train; checkpoints of another model are refused. Without it
            (a script that has not loaded its model yet) any checkpoint with the right optimizer state passes.
        require_hspg (`bool`, *optional*, defaults to `True`): Checkpoints must hold an HSPG state (`False` for a
            dense baseline trained with a plain `Trainer`).
        run_entries (`Collection[str]`, *optional*): Other entries that belong to a run's resumable state (the
            `Trainer`'s `runs/`; the Accelerate script's `checkpoints/`).

    Example:

    ```python
    >>> from hf_oto.output_dir import check_output_dir

    >>> check_output_dir("outputs/new-run")  # fine: missing or empty
    >>> check_output_dir("outputs/old-run", resume_from_checkpoint=True, model=model)  # fine: its own checkpoints
    ```
    """
    if not output_dir or overwrite:
        return
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"The output folder {str(path)!r} is a file; choose a folder (--output_dir).")
    entries = [path / name for name in folder_contents(path)]
    entries = [entry for entry in entries if not _is_empty_folder(entry)]
    if not entries:
        return
    resuming = resume_from_checkpoint not in (None, False, "")
    resumable, foreign = [], []
    for entry in entries:
        if entry.is_dir() and CHECKPOINT_PATTERN.fullmatch(entry.name):
            problem = checkpoint_problem(entry, model, require_hspg=require_hspg)
            if problem is None:
                resumable.append(entry.name)
            else:
                foreign.append(f"{entry.name} ({problem})")
        elif entry.is_dir() and entry.name in run_entries:
            resumable.append(entry.name)
        elif resuming and _is_run_result(entry):
            resumable.append(entry.name)
        else:
            foreign.append(entry.name)
    if resuming and not foreign:
        return
    if foreign:
        listed = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise ValueError(
            f"The output folder {str(path)!r} holds files that are not this run's resumable state: {listed}. "
            f"Training there would overwrite them, and the checkpoint rotation (`save_total_limit`) deletes old "
            f"checkpoints whoever wrote them. Move them away, {_FLAGS}."
            + (" Only a folder with nothing but this model's HSPG checkpoints can be resumed." if resuming else "")
        )
    raise ValueError(
        f"The output folder {str(path)!r} holds the state of an earlier run ({', '.join(resumable[:8])}). Pass "
        "`resume_from_checkpoint` (--resume_from_checkpoint) to continue that run, or "
        f"{_FLAGS} and start afresh (its checkpoints may be overwritten or deleted)."
    )


def check_model_dir(directory: Union[str, os.PathLike], *, overwrite: bool = False) -> None:
    """Refuses, before any training, a folder the slim model will be saved into that already holds files (e.g. the
    slim model of an earlier run), unless `overwrite`; saving into it would otherwise fail only once training is over
    (with `overwrite` the save replaces the whole folder, see [`hf_oto.atomic_folder.atomic_folder`]).

    Example:

    ```python
    >>> from hf_oto.output_dir import check_model_dir

    >>> check_model_dir("outputs/run/pruned")  # fine when missing or empty
    ```
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"The slim-model folder {str(path)!r} is a file; choose a folder (--pruned_model_dir).")
    held = folder_contents(path)
    if held and not overwrite:
        raise ValueError(
            f"The slim-model folder {str(path)!r} already holds {', '.join(held[:5])}"
            f"{' ...' if len(held) > 5 else ''} (a model of an earlier run?). Choose another --output_dir or "
            "--pruned_model_dir, or pass --overwrite_output_dir to replace it (the whole folder)."
        )


def check_run_dirs(
    output_dir: Union[str, os.PathLike],
    model_dir: Union[str, os.PathLike],
    *,
    overwrite: bool = False,
    resume_from_checkpoint: Union[str, bool, None] = None,
    require_hspg: bool = True,
    run_entries: Collection[str] = TRAINER_RUN_ENTRIES,
) -> None:
    """The check of a training script, at its start: the output folder ([`check_output_dir`]) and the folder the
    slim model goes to ([`check_model_dir`]), which must not be the output folder itself (saving the slim model
    replaces its folder).

    Example:

    ```python
    >>> from hf_oto.output_dir import check_run_dirs

    >>> check_run_dirs("outputs/run", "outputs/run/pruned", resume_from_checkpoint=None)
    ```
    """
    output, slim = (Path(os.path.normpath(Path(folder).absolute())) for folder in (output_dir, model_dir))
    if slim == output or slim in output.parents:
        raise ValueError(
            f"--pruned_model_dir {str(model_dir)!r} is or contains the output folder: saving the slim model replaces "
            "its whole folder, checkpoints included. Leave --pruned_model_dir unset (<output_dir>/pruned) or choose "
            "another folder."
        )
    check_model_dir(model_dir, overwrite=overwrite)
    check_output_dir(
        output_dir,
        overwrite=overwrite,
        resume_from_checkpoint=resume_from_checkpoint,
        require_hspg=require_hspg,
        run_entries=run_entries,
    )
