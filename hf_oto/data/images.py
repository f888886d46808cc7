"""Image classification data: IDX files (MNIST / Fashion-MNIST) as a `DatasetDict`, and the tensor preprocessing.

The preprocessing is plain torch (no torchvision): images become float tensors in `[0, 1]`, are zero-padded (when
smaller by an even margin, as 28 x 28 Fashion-MNIST into 32 x 32) or resized to the model's size, normalised with
per-channel mean and std, and, for training, augmented with a random 4-pixel-padded crop and a horizontal flip (the
CIFAR recipe of the OTO paper).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package `dataset-fashion-mnist` puts the Fashion-MNIST IDX files."""

FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

IDX_SPLITS = {"train": "train", "test": "t10k"}
"""Split name → file prefix of the IDX files (`<prefix>-images-idx3-ubyte[.gz]`, `<prefix>-labels-idx1-ubyte[.gz]`)."""

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed) into a numpy array, checking its header.

    Example:

    ```python
    >>> from hf_oto.data.images import FASHION_MNIST_DIR, read_idx

    >>> read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
    (10000,)
    ```
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"Could not read the IDX file {str(path)!r}: {error}.") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {data[:4].hex()!r}).")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"The IDX file {str(path)!r} is truncated or corrupt: its header announces shape {shape} "
            f"({expected} bytes), the file has {len(data)} bytes."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _idx_file(directory: Path, prefix: str, kind: str, ndim: int) -> Path:
    for name in (f"{prefix}-{kind}-idx{ndim}-ubyte.gz", f"{prefix}-{kind}-idx{ndim}-ubyte"):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(
        f"No {prefix}-{kind}-idx{ndim}-ubyte(.gz) in {str(directory)!r}. An IDX folder holds the MNIST-format files "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz (Fashion-MNIST: `apt-get install dataset-fashion-mnist`, then "
        f"{FASHION_MNIST_DIR})."
    )


def load_idx_dataset(directory: str | os.PathLike, label_names: Sequence[str] | None = None) -> DatasetDict:
    """Loads an MNIST-format IDX folder as a `DatasetDict` with `train` and `test` splits (`image`, `label`).

    Args:
        directory (`str` or `os.PathLike`): The folder of the four IDX files.
        label_names (`Sequence[str]`, *optional*): Class names; the Fashion-MNIST names for the Debian package's
            folder, else `"0"`, `"1"`, ...

    Example:

    ```python
    >>> from hf_oto.data.images import FASHION_MNIST_DIR, load_idx_dataset

    >>> data = load_idx_dataset(FASHION_MNIST_DIR)  # doctest: +SKIP
    >>> data["train"].num_rows, data["train"].features["label"].names[0]  # doctest: +SKIP
    (60000, 'T-shirt/top')
    ```
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"The IDX folder {str(directory)!r} does not exist.")
    splits = {}
    for split, prefix in IDX_SPLITS.items():
        images = read_idx(_idx_file(directory, prefix, "images", 3))
        labels = read_idx(_idx_file(directory, prefix, "labels", 1)).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"The {split} IDX files of {str(directory)!r} do not match: images {images.shape}, labels "
                f"{labels.shape}; expected [N, H, W] images and N labels."
            )
        splits[split] = (images, labels)
    num_classes = int(max(labels.max() for _, labels in splits.values())) + 1
    if label_names is None:
        fashion = directory.resolve() == FASHION_MNIST_DIR.resolve() and num_classes == len(FASHION_MNIST_LABELS)
        label_names = FASHION_MNIST_LABELS if fashion else [str(i) for i in range(num_classes)]
    if len(label_names) < num_classes:
        raise ValueError(f"{len(label_names)} label names for {num_classes} classes in {str(directory)!r}.")
    result = {}
    for split, (images, labels) in splits.items():
        features = Features(
            {"image": Array2D(images.shape[1:], "uint8"), "label": ClassLabel(names=list(label_names))}
        )
        result[split] = Dataset.from_dict({"image": images, "label": labels}, features=features)
    return DatasetDict(result)


def image_to_array(image: Any) -> np.ndarray:
    """An image (PIL, numpy `[H, W]` / `[H, W, C]`, or nested lists) as a float32 `[C, H, W]` array in `[0, 1]`."""
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(f"Expected a 2-D (grey) or 3-D (colour) image; got an array of shape {array.shape}.")
    scale = 255.0 if array.dtype == np.uint8 or array.max(initial=0) > 1.0 else 1.0
    return array.astype(np.float32) / scale


def _match_channels(array: np.ndarray, num_channels: int) -> np.ndarray:
    """Repeats a grey `[1, H, W]` image to `num_channels`, or averages a colour one to 1 channel."""
    if array.shape[0] == num_channels:
        return array
    if array.shape[0] == 1:
        return np.repeat(array, num_channels, axis=0)
    if num_channels == 1:
        return array.mean(axis=0, keepdims=True)
    raise ValueError(f"Cannot turn a {array.shape[0]}-channel image into {num_channels} channels.")


@dataclass
class ImagePreprocessor:
    """Turns a batch of a `datasets` image dataset into `pixel_values` and `labels` tensors (for `with_transform`).

    Args:
        image_column (`str`): Column of the images.
        label_column (`str`): Column of the integer labels (absent columns give no `labels`).
        image_size (`int`): Output height and width.
        num_channels (`int`): Output channels: grey images are repeated to 3 channels, colour ones averaged to 1.
        mean, std (`Sequence[float]`): Per-channel normalisation.
        augment (`bool`): Random 4-pixel-padded crop and horizontal flip (training only).

    Example:

    ```python
    >>> from hf_oto.data.images import ImagePreprocessor

    >>> preprocess = ImagePreprocessor("image", "label", image_size=32, num_channels=1, mean=[0.5], std=[0.5])
    >>> batch = preprocess({"image": [np.zeros((28, 28), np.uint8)], "label": [3]})
    >>> batch["pixel_values"].shape, batch["labels"].tolist()
    (torch.Size([1, 1, 32, 32]), [3])
    ```
    """

    image_column: str
    label_column: str
    image_size: int
    num_channels: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: bool = False

    def __post_init__(self):
        if len(self.mean) != self.num_channels or len(self.std) != self.num_channels:
            raise ValueError(f"mean {list(self.mean)} and std {list(self.std)} need {self.num_channels} values each.")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive; got {list(self.std)}.")

    def pixels(self, image: Any) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(_match_channels(image_to_array(image), self.num_channels)))
        height, width = tensor.shape[1:]
        size = self.image_size
        margin_h, margin_w = size - height, size - width
        if margin_h >= 0 and margin_w >= 0 and margin_h % 2 == 0 and margin_w % 2 == 0:
            tensor = torch.nn.functional.pad(tensor, (margin_w // 2, margin_w // 2, margin_h // 2, margin_h // 2))
        elif (height, width) != (size, size):
            tensor = torch.nn.functional.interpolate(tensor[None], size=(size, size), mode="bilinear")[0]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        tensor = (tensor - mean) / std
        if self.augment:
            padded = torch.nn.functional.pad(tensor, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            tensor = padded[:, top : top + size, left : left + size]
            if torch.rand(()) < 0.5:
                tensor = tensor.flip(-1)
        return tensor

    def __call__(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        result = {"pixel_values": torch.stack([self.pixels(image) for image in batch[self.image_column]])}
        if self.label_column in batch:
            result["labels"] = torch.as_tensor(batch[self.label_column], dtype=torch.long)
        return result


def channel_statistics(
    dataset: Dataset, image_column: str, num_channels: int, max_images: int = 10_000
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the first `max_images` images (in `[0, 1]`), for normalisation."""
    count = min(max_images, len(dataset))
    if count == 0:
        raise ValueError("Cannot compute normalisation statistics of an empty dataset.")
    arrays = [
        _match_channels(image_to_array(image), num_channels).reshape(num_channels, -1)
        for image in dataset.select(range(count))[image_column]
    ]
    values = torch.from_numpy(np.concatenate(arrays, axis=1)).double()
    return values.mean(dim=1).tolist(), values.std(dim=1).clamp_min(1e-6).tolist()
