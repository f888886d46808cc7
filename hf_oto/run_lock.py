"""One training run per output folder: a lock file held for the run's lifetime.

Two runs writing into one output folder both train to the end, and the last to finish owns every `checkpoint-N` and
the saved model. [`RunLock`] prevents that: the run creates `_hf_oto_run.lock` in its output folder atomically
(`O_CREAT | O_EXCL`, so exactly one of two racing runs succeeds), writes its pid, host and start time into it, and
deletes it when it ends (normally or by an exception). A second run refuses to start, naming the holder. A lock left
by a run that was killed (its pid is dead on this host) is taken over with a warning; a lock of another host cannot be
checked and is refused (delete it by hand if no run uses the folder).

The name starts with `_`, which the `Trainer`'s `push_to_hub` never uploads; [`hf_oto.output_dir.check_output_dir`]
ignores the file, and it never goes into checkpoints (subfolders) or saved model folders.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Optional

from transformers.utils import logging


logger = logging.get_logger(__name__)

LOCK_FILE_NAME = "_hf_oto_run.lock"
"""The lock file, at the top of the output folder."""

_HELD: dict[str, int] = {}
"""Lock files this process holds, with how many times (the lock is re-entrant within a process: a script that holds
its output folder may call `OTOTrainer.train`, which takes the same lock)."""


class OutputDirLockedError(RuntimeError):
    """Another live run holds the output folder."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def read_lock(directory: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The holder recorded in the lock file of `directory` (`pid`, `host`, `started`, `command`), `{}` for an
    unreadable file, `None` without a lock file."""
    path = Path(directory) / LOCK_FILE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_is_live(holder: Optional[dict[str, Any]]) -> bool:
    """Whether a holder (see [`read_lock`]) may still be running: its pid is alive on this host, or it is on another
    host, or the file is unreadable (a lock being written)."""
    if holder is None:
        return False
    if not holder or holder.get("host") != socket.gethostname():
        return True
    return _pid_alive(int(holder.get("pid", -1)))


class RunLock:
    r"""
    The lock of one training run on its output folder; re-entrant within a process.

    Args:
        directory (`str` or `os.PathLike`): The output folder (created if missing).

    Raises:
        `OutputDirLockedError` (a `RuntimeError`) from [`RunLock.acquire`] when another live run holds the folder.

    Example:

    ```python
    >>> from hf_oto.run_lock import RunLock

    >>> with RunLock("outputs/my-run"):  # a second run on outputs/my-run now refuses to start
    ...     train()
    ```
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE_NAME
        self._key = os.path.abspath(self.path)
        self._acquired = False

    def acquire(self) -> RunLock:
        """Creates the lock file (or takes over a stale one); raises if another live run holds it."""
        if self._acquired:
            return self
        if _HELD.get(self._key):
            _HELD[self._key] += 1
            self._acquired = True
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            _HELD[self._key] = 1
            self._acquired = True
            return self
        raise OutputDirLockedError(f"Could not create the lock file {str(self.path)!r}: it keeps reappearing.")

    def _take_over_if_stale(self) -> None:
        holder = read_lock(self.directory)
        if holder is None:  # released meanwhile
            return
        if lock_is_live(holder):
            raise OutputDirLockedError(self._held_message(holder))
        # The same content right before deleting: another run taking over at the same moment may have re-created it.
        if read_lock(self.directory) != holder:
            return
        logger.warning(
            f"Taking over the lock of {self.directory}: its run (pid {holder.get('pid')}, started "
            f"{holder.get('started')}) is no longer alive on this host."
        )
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _held_message(self, holder: dict[str, Any]) -> str:
        if not holder:
            who = "a run whose lock file is unreadable (still being written?)"
        else:
            who = (
                f"the run with pid {holder.get('pid')} on host {holder.get('host')!r} (started "
                f"{holder.get('started')}: {holder.get('command', '?')})"
            )
        return (
            f"The output folder {str(self.directory)!r} is in use by {who}. Two runs in one folder overwrite each "
            f"other's checkpoints. Wait for that run to end or stop it, or choose another output_dir (--output_dir). "
            f"If no run uses the folder any more (e.g. a run on another host was killed), delete {str(self.path)!r}."
        )

    def release(self) -> None:
        """Deletes the lock file once every acquisition of this process is released; a no-op when not held."""
        if not self._acquired:
            return
        self._acquired = False
        count = _HELD.get(self._key, 0) - 1
        if count > 0:
            _HELD[self._key] = count
            return
        _HELD.pop(self._key, None)
        holder = read_lock(self.directory)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._acquired

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def output_dir_lock(
    directory: str | os.PathLike, *, is_main_process: bool = True
) -> AbstractContextManager[Optional[RunLock]]:
    """The [`RunLock`] of `directory` for the main process, a no-op context for the others: what a training script
    holds for its whole run (checks done, training, slim model and results saved).

    Example:

    ```python
    >>> from hf_oto.run_lock import output_dir_lock

    >>> with output_dir_lock(training_args.output_dir, is_main_process=training_args.process_index == 0):
    ...     results = train_prune_and_save()
    ```
    """
    return RunLock(directory) if is_main_process else nullcontext()
