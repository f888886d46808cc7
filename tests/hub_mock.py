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


@contextlib.contextmanager
def mock_hub(namespace: str = "me"):
    """Patches `HfApi.create_repo` and `HfApi.upload_folder` (recorded) and the other upload paths (refused),
    including the `Trainer`'s own `create_repo` / `upload_folder`."""
    recorder = HubRecorder(namespace)
    with (
        mock.patch("huggingface_hub.HfApi.create_repo", autospec=True, side_effect=recorder.create_repo),
        mock.patch("huggingface_hub.HfApi.upload_folder", autospec=True, side_effect=recorder.upload_folder),
        mock.patch("huggingface_hub.HfApi.create_commit", side_effect=_refuse),
        mock.patch("huggingface_hub.HfApi.upload_file", side_effect=_refuse),
        mock.patch("transformers.trainer.create_repo", side_effect=_refuse),
        mock.patch("transformers.trainer.upload_folder", side_effect=_refuse),
    ):
        yield recorder
