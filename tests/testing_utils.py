"""Helpers shared by the tests: the repository's folders, loading the example scripts (and their sibling modules such
as `utils_qa`), the environment of the processes the tests launch, and tiny word-level BERT models with the movie-review
lines the text-classification tests train on (no hub)."""

from __future__ import annotations

import csv
import importlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast


REPO = Path(__file__).resolve().parents[1]
"""The root of this checkout."""
SCRIPTS = REPO / "scripts"
"""The example scripts and their sibling modules (`utils_qa.py`, `trainer_qa.py`, ...)."""
BENCHMARKS = REPO / "benchmarks"
"""The benchmark scripts."""


# ----------------------------------------------------------------------------------------------------------------
# Scripts
# ----------------------------------------------------------------------------------------------------------------
def _script_on_path(name: str, directory: str | os.PathLike) -> Path:
    """The file of the script `name` in `directory`, whose folder is now on `sys.path`."""
    directory = Path(directory).resolve()
    path = directory / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"No script {name!r} in {directory}: {path.name} does not exist.")
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return path


def load_script(name: str, directory: str | os.PathLike = SCRIPTS) -> ModuleType:
    """Imports `<directory>/<name>.py` as the module `name`, with `directory` first on `sys.path`: the script's own
    imports of its siblings (`import utils_qa`) then work as when it runs as `python scripts/<name>.py`, and a test
    gets the same sibling module the script uses.

    Args:
        name (`str`): The module name, e.g. `"run_squad_oto"` or `"utils_qa"`.
        directory (`str` or `os.PathLike`, *optional*, defaults to `scripts/`): The folder holding it, e.g.
            [`BENCHMARKS`].

    Returns:
        `ModuleType`: the module (imported once per test process, like any import).

    Example:

    ```python
    >>> utils_qa = load_script("utils_qa")
    >>> utils_qa.normalize_answer("The Seine!")
    'seine'
    ```
    """
    path = _script_on_path(name, directory)
    module = importlib.import_module(name)
    if Path(module.__file__).resolve() != path:
        raise ValueError(f"The module {name!r} is already imported from {module.__file__}, not from {path}.")
    return module


def run_script(name: str, directory: str | os.PathLike = SCRIPTS) -> dict:
    """Runs `<directory>/<name>.py` as `__main__` in this process, as `python scripts/<name>.py` would (its folder
    first on `sys.path`; the caller sets `sys.argv`). Returns the globals of the run."""
    return runpy.run_path(str(_script_on_path(name, directory)), run_name="__main__")


# ----------------------------------------------------------------------------------------------------------------
# Launched processes
# ----------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port nothing listens on now (for the rendezvous of launched processes)."""
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The environment of started processes: this checkout first on the path, no hub, one intra-op thread each (the
    same in every process, so that their CPU kernels sum in the same order)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    # gloo on the loopback interface: the rendezvous never depends on how the host name resolves.
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", GLOO_SOCKET_IFNAME="lo")
    return env


def run_launcher(command: list[str], timeout: float) -> None:
    """Runs a launcher (`torchrun`, `accelerate launch`) in a session of its own; fails the test with the end of its
    stderr if it exits with an error or outlives `timeout` (then the launcher and the processes it started are
    killed, by their process group)."""
    process = subprocess.Popen(
        command, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:5])} ... still running after {timeout} s:\n{stderr.decode()[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command[:5])} ... exited with {process.returncode}:\n{stderr.decode()[-4000:]}")


# ----------------------------------------------------------------------------------------------------------------
# Tiny word-level BERT models
# ----------------------------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer(directory: str | os.PathLike, words: list[str]) -> BertTokenizerFast:
    """A lower-casing BERT tokenizer whose vocabulary is [`SPECIAL_TOKENS`] then `words` (in that order), from the
    `vocab.txt` it writes into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)


def tiny_bert_config(vocab_size: int, **extra) -> BertConfig:
    """A 2-layer BERT of width 32 (4 heads, 37 FFN rows, 64 positions, default dropout)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        **extra,
    )


# ----------------------------------------------------------------------------------------------------------------
# Text classification data
# ----------------------------------------------------------------------------------------------------------------
SUBJECTS = ["the movie", "this film", "the plot", "the acting"]
POSITIVE = ["great", "wonderful", "good", "lovely", "brilliant"]
NEGATIVE = ["awful", "boring", "bad", "terrible", "dull"]


def reviews() -> list[dict]:
    """40 one-line movie reviews with string sentiment labels, positive and negative interleaved."""
    rows = []
    for subject in SUBJECTS:
        for good, bad in zip(POSITIVE, NEGATIVE):
            rows.append({"sentence": f"{subject} was {good} .", "sentiment": "positive"})
            rows.append({"sentence": f"{subject} was {bad} .", "sentiment": "negative"})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_tiny_classifier(directory: Path) -> Path:
    """A tiny BERT encoder (the classification head is created by the script) and a word-level tokenizer."""
    words = sorted({word for row in reviews() for word in row["sentence"].split()} | {"?"})
    word_tokenizer(directory, words).save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(SPECIAL_TOKENS) + len(words))).save_pretrained(directory)
    return directory
