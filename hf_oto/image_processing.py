"""`OTOImageProcessor`: the image scripts' preprocessing as a transformers image processor, saved with slim image
models so that they run in `pipeline("image-classification")`.

It applies exactly what [`~hf_oto.data.images.ImagePreprocessor`] applied in training (without augmentation): images
to `[0, 1]`, grey images repeated to the model's channels or colour ones averaged to one, zero-padding when smaller by
an even margin (28 x 28 Fashion-MNIST into 32 x 32) or else a bilinear resize, and the per-channel normalisation.
It is registered with `AutoImageProcessor` when `hf_oto` is imported. (Transformers' own processors cannot stand in:
they do not pad without resizing and refuse one-channel images.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoImageProcessor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .models import CifarConvNetConfig


class OTOImageProcessor(BaseImageProcessor):
    r"""
    Image processor of the slim image models `scripts/run_image_classification_oto.py` saves.

    Args:
        image_size (`int`, *optional*, defaults to 32): Output height and width.
        num_channels (`int`, *optional*, defaults to 3): Channels the model takes.
        image_mean (`Sequence[float]`, *optional*): Per-channel mean, in `[0, 1]` units (default 0.5 each).
        image_std (`Sequence[float]`, *optional*): Per-channel standard deviation (default 0.5 each).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_oto.image_processing import OTOImageProcessor

    >>> processor = OTOImageProcessor(image_size=32, num_channels=1, image_mean=[0.29], image_std=[0.35])
    >>> processor(np.zeros((28, 28), np.uint8), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 1, 32, 32])
    ```
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 32,
        num_channels: int = 3,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.num_channels = int(num_channels)
        self.image_mean = [float(value) for value in (image_mean or [0.5] * self.num_channels)]
        self.image_std = [float(value) for value in (image_std or [0.5] * self.num_channels)]
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(
                f"OTOImageProcessor needs {self.num_channels} values in image_mean and image_std (one per channel); "
                f"got {self.image_mean} and {self.image_std}."
            )

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """`pixel_values` of one image or a list of images (PIL, numpy `[H, W]` / `[H, W, C]`)."""
        from .data.images import ImagePreprocessor

        if not isinstance(images, (list, tuple)):
            images = [images]
        transform = ImagePreprocessor(
            "image", "label", self.image_size, self.num_channels, self.image_mean, self.image_std
        )
        pixel_values = torch.stack([transform.pixels(image) for image in images])
        if return_tensors not in ("pt", None):
            pixel_values = pixel_values.numpy()
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)


AutoImageProcessor.register(CifarConvNetConfig, slow_image_processor_class=OTOImageProcessor, exist_ok=True)
