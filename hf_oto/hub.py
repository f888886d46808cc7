"""Pushing a slim-model folder to the Hugging Face Hub: the one upload every entry point of hf_oto uses.

[`push_pruned_model`] creates the repository if needed and uploads the folder written by
[`~hf_oto.modeling.save_pruned_model`] (weights, `config.json` with the layout, tokenizer or image processor, model
card, layout plot and, when exported, `onnx/`) in one commit. `OTOTrainer.push_to_hub`, the `Trainer` scripts and the
no-`Trainer` script all call it once, at the end of the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)

LOCAL_REPO_PLACEHOLDER = "path/to/this/folder"
"""What the model card's loading lines show when the card is written before the Hub repository is known."""

IGNORE_PATTERNS = ("_*", ".*", "checkpoint-*", "**/_*", "**/.*")
"""Never uploaded: run locks and temporary files (`_*`, dot files) and `Trainer` checkpoints."""


def check_pruned_folder(folder: str | os.PathLike) -> Path:
    """Checks that `folder` is a slim-model folder written by `save_pruned_model` (a `config.json` with `oto_layout`,
    weights and a `README.md` model card) and returns it as a `Path`.

    Example:

    ```python
    >>> check_pruned_folder("outputs/bert-sst2-oto/pruned")  # doctest: +SKIP
    PosixPath('outputs/bert-sst2-oto/pruned')
    ```
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"Cannot push {str(folder)!r}: no such folder. Save the slim model first (save_pruned_model)."
        )
    config = folder / "config.json"
    layout = json.loads(config.read_text()).get("oto_layout") if config.is_file() else None
    if layout is None:
        raise ValueError(
            f"Cannot push {str(folder)!r}: it is not a slim-model folder (no config.json with `oto_layout`). Push the "
            "folder written by `save_pruned_model` / `trainer.save_pruned_model`, after `trainer.prune()`."
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ValueError(f"Cannot push {str(folder)!r}: it holds no weights. Save the slim model again.")
    if not (folder / "README.md").is_file():
        raise ValueError(
            f"Cannot push {str(folder)!r} without its model card (README.md): write it with "
            "`hf_oto.model_card.write_model_card` or `trainer.write_oto_model_card` first."
        )
    return folder


def point_card_at_repo(folder: str | os.PathLike, repo_id: str, placeholders: tuple[str, ...] = ()) -> bool:
    """Rewrites the loading lines of `folder/README.md` that name a placeholder (`path/to/this/folder`, or a repository
    name without its namespace) to name `repo_id`. Returns whether the card changed.

    Example:

    ```python
    >>> point_card_at_repo("slim", "me/bert-sst2-oto", placeholders=("bert-sst2-oto",))  # doctest: +SKIP
    True
    ```
    """
    card = Path(folder) / "README.md"
    text = card.read_text(encoding="utf-8")
    updated = text
    for placeholder in (LOCAL_REPO_PLACEHOLDER, *placeholders):
        if placeholder and placeholder != repo_id:
            updated = updated.replace(f'"{placeholder}"', f'"{repo_id}"')
    if updated != text:
        card.write_text(updated, encoding="utf-8")
    return updated != text


def push_pruned_model(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload OTO-pruned model",
    blocking: bool = True,
) -> Any:
    """Uploads a slim-model folder to the Hub in one commit, creating the repository if it does not exist.

    Uses `huggingface_hub.HfApi().create_repo(..., exist_ok=True)` then `HfApi().upload_folder(...)`. Run locks,
    temporary and dot files and `checkpoint-*` folders are never uploaded. Before the upload, the card's loading lines
    are pointed at the repository (its full `namespace/name`, as `create_repo` returns it).

    Args:
        folder (`str` or `os.PathLike`): The folder written by [`~hf_oto.modeling.save_pruned_model`] with its card.
        repo_id (`str`): `namespace/name`, or `name` for a repository under your account.
        token (`str`, *optional*): A token with write access (default: the one `huggingface-cli login` stored).
        private (`bool`, *optional*): Create the repository private (default: the account's default).
        revision (`str`, *optional*): Branch to commit to (default: `main`).
        commit_message (`str`, *optional*): The commit message.
        blocking (`bool`, *optional*, defaults to `True`): Wait for the upload; else return a `Future`.

    Returns:
        The `CommitInfo` of the upload (a `Future` of it when `blocking=False`).

    Example:

    ```python
    >>> from hf_oto.hub import push_pruned_model

    >>> push_pruned_model("outputs/bert-sst2-oto/pruned", "me/bert-sst2-oto", private=True)  # doctest: +SKIP
    CommitInfo(commit_url='https://huggingface.co/me/bert-sst2-oto/commit/...', ...)
    ```
    """
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("push_pruned_model needs a repository id, e.g. 'me/bert-sst2-oto' (--hub_model_id).")
    folder = check_pruned_folder(folder)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    resolved = getattr(repo_url, "repo_id", None) or repo_id
    point_card_at_repo(folder, resolved, placeholders=(repo_id,))
    logger.info(f"Pushing the slim model {folder} to https://huggingface.co/{resolved}.")
    return api.upload_folder(
        repo_id=resolved,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=list(IGNORE_PATTERNS),
        run_as_future=not blocking,
    )
