"""Folder saves that replace the whole folder or nothing.

Writing a model into a folder that already holds one can leave a stale file that wins at load time (an old
`model.safetensors` beside a new `pytorch_model.bin`, an old shard index beside a new single file), and a save killed
mid-way leaves half a folder. [`atomic_folder`] writes everything into a temporary sibling `<name>.tmp-<random>` and
swaps it in only once complete: the old folder is renamed to a sibling `<name>.old-<random>`, the new one renamed into
place, the old one deleted (and restored if the swap fails). The target is therefore always either the previous
folder or the new one, with nothing of the other inside.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging

from .run_lock import LOCK_FILE_NAME, lock_is_live, read_lock


logger = logging.get_logger(__name__)


def _sibling(directory: Path, tag: str) -> Path:
    """Creates an empty sibling folder `<name>.<tag>-<random>` (with the usual permissions, unlike `mkdtemp`)."""
    while True:
        candidate = directory.parent / f"{directory.name}.{tag}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def folder_contents(directory: str | os.PathLike) -> list[str]:
    """Names of the entries of `directory` (sorted; a stale run lock file is not counted), `[]` if it is missing."""
    path = Path(directory)
    if not path.is_dir():
        return []
    return sorted(entry.name for entry in path.iterdir() if entry.name != LOCK_FILE_NAME)


def check_replaceable(directory: str | os.PathLike, *, overwrite: bool, what: str = "folder") -> None:
    """Raises a `ValueError` if `directory` is a file, is the output folder of a running training run, or holds
    anything while `overwrite` is `False`."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a folder; choose a folder path for the {what}.")
    if lock_is_live(read_lock(path)):
        raise ValueError(
            f"{str(path)!r} is the output folder of a training run that is still running (it holds "
            f"{LOCK_FILE_NAME}); save the {what} into another folder."
        )
    held = folder_contents(path)
    if held and not overwrite:
        raise ValueError(
            f"The folder {str(path)!r} is not empty (it holds {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}). "
            f"Choose a new or empty folder, or pass `overwrite=True` to replace it: the whole folder is replaced by "
            f"the {what}, files you put there yourself included."
        )


def swap_in(new: Path, target: Path) -> None:
    """Renames the complete folder `new` to `target`, replacing a previous `target` (kept aside as a sibling until
    the swap succeeded, restored if it failed)."""
    if not target.exists():
        os.rename(new, target)
        return
    backup = _sibling(target, "old")
    os.rename(target, backup)  # onto an empty folder: allowed by POSIX rename
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_folder(directory: str | os.PathLike, *, overwrite: bool = False, what: str = "folder") -> Iterator[Path]:
    r"""
    Yields an empty temporary sibling of `directory` to write into; swaps it in for `directory` when the block ends
    without an exception, deletes it otherwise (the previous folder is then untouched).

    Args:
        directory (`str` or `os.PathLike`): The folder to (re)place; its parent is created if missing.
        overwrite (`bool`, *optional*, defaults to `False`): Replace a non-empty folder. The WHOLE folder is
            replaced, including files that the write does not produce (e.g. files you put there yourself).
        what (`str`, *optional*): What is saved, for the error messages.

    Raises:
        `ValueError` if `directory` is a file, holds a running training run's lock, or is not empty without
        `overwrite`.

    Example:

    ```python
    >>> from hf_oto.atomic_folder import atomic_folder

    >>> with atomic_folder("my-model", overwrite=True) as staging:
    ...     model.save_pretrained(staging)
    ...     tokenizer.save_pretrained(staging)
    ```
    """
    target = Path(directory)
    check_replaceable(target, overwrite=overwrite, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    try:
        yield staging
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.debug(f"Replaced {target} atomically.")
