"""`huggingface_hub.HfApi` mocked for push tests: records each repository created and each upload with the files it
would send (after its ignore patterns), and fails any other Hub call. Nothing touches the network."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

from huggingface_hub import RepoUrl
from huggingface_hub.utils import filter_repo_objects


class HubRecorder:
    def __init__(self, namespace: str = "me"):
        self.namespace = namespace
        self.created: list[dict] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        full = repo_id if "/" in repo_id else f"{self.namespace}/{repo_id}"
        self.created.append({"repo_id": full, **kwargs})
        return RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, api, *, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kwargs):
        root = Path(folder_path)
        files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
        files = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        card = (root / "README.md").read_text() if (root / "README.md").is_file() else ""
        self.uploads.append(
            {"repo_id": repo_id, "folder": os.path.abspath(folder_path), "files": files, "card": card, **kwargs}
        )
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


def _refuse(*args, **kwargs):
    raise AssertionError("an unexpected Hub call (the tests never touch the network)")


def _trainer_hub_targets() -> dict[str, str]:
    """The names through which the `Trainer` reaches the Hub: `create_repo` / `upload_folder` imported into
    `transformers.trainer` (transformers 4), or `transformers.trainer.hf_api()` (transformers 5)."""
    import transformers.trainer

    if hasattr(transformers.trainer, "create_repo"):
        return {
            "create_repo": "transformers.trainer.create_repo",
            "upload_folder": "transformers.trainer.upload_folder",
        }
    return {"hf_api": "transformers.trainer.hf_api"}


@contextlib.contextmanager
def mock_hub(namespace: str = "me"):
    """Patches `HfApi.create_repo` and `HfApi.upload_folder` (recorded) and the other upload paths (refused),
    including the `Trainer`'s own `create_repo` / `upload_folder` (transformers 4) or `hf_api()` (transformers 5)."""
    recorder = HubRecorder(namespace)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch("huggingface_hub.HfApi.create_repo", autospec=True, side_effect=recorder.create_repo)
        )
        stack.enter_context(
            mock.patch("huggingface_hub.HfApi.upload_folder", autospec=True, side_effect=recorder.upload_folder)
        )
        stack.enter_context(mock.patch("huggingface_hub.HfApi.create_commit", side_effect=_refuse))
        stack.enter_context(mock.patch("huggingface_hub.HfApi.upload_file", side_effect=_refuse))
        for target in _trainer_hub_targets().values():
            stack.enter_context(mock.patch(target, side_effect=_refuse))
        yield recorder


@contextlib.contextmanager
def mock_trainer_hub(repo_id: str):
    """The `Trainer`'s own Hub calls, mocked (nothing else is): yields its `(create_repo, upload_folder)` mocks."""
    targets = _trainer_hub_targets()
    if "hf_api" in targets:
        api = mock.MagicMock()
        api.create_repo.return_value.repo_id = repo_id
        with mock.patch(targets["hf_api"], return_value=api):
            yield api.create_repo, api.upload_folder
        return
    with mock.patch(targets["create_repo"]) as create_repo, mock.patch(targets["upload_folder"]) as upload_folder:
        create_repo.return_value.repo_id = repo_id
        yield create_repo, upload_folder


def tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """The files `save_pretrained` writes for the tokenizer saved in `folder`: transformers 4 adds `vocab.txt` and
    `special_tokens_map.json` to the `tokenizer.json` and `tokenizer_config.json` that transformers 5 writes."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        AutoTokenizer.from_pretrained(folder).save_pretrained(scratch)
        return sorted(path.name for path in Path(scratch).iterdir())
