"""Joint image/label augmentation with torchvision.transforms.v2 (``tv_tensors.Image`` + ``tv_tensors.Mask``).

Training: random scale (0.5-2.0 of the image), pad at the bottom/right up to the crop size (the mean
pixel for the image, 255 = void for the label, so padding is neither a class nor counted in the
loss), random crop, horizontal flip, then float conversion and ImageNet normalisation. v2 applies
every geometric step to both tensors with the same parameters and resizes a ``Mask`` with nearest
neighbour, so labels stay class indices.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN
from timm.data import IMAGENET_DEFAULT_STD as STD
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .datasets import IGNORE_INDEX

__all__ = ["MEAN", "STD", "Normalization", "RandomScale", "PadToSize", "train_transform", "eval_transform"]

# (mean, std) per channel of the [0, 1] image: the backbone's pretraining records it (timm's
# pretrained_cfg) and the segmentation network carries it as ``model.normalization``.
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def mean_pixel(mean: tuple[float, ...] = MEAN) -> tuple[int, ...]:
    """The uint8 padding value that becomes 0 after normalising."""
    return tuple(round(255 * m) for m in mean)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``[low, high]`` (image: bilinear, mask: nearest)."""

    def __init__(self, low: float, high: float):
        super().__init__()
        if not 0 < low <= high:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got ({low}, {high})")
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        s = self.low + (self.high - self.low) * float(torch.rand(()))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if self.low == self.high == 1:
            return inpt
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class PadToSize(v2.Transform):
    """Pad at the bottom and right to at least ``size`` (h, w): images with ``image_fill``, masks with 255."""

    def __init__(self, size: tuple[int, int], image_fill: tuple[int, ...] | None = None,
                 mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size, self.mask_fill = tuple(size), mask_fill
        self.image_fill = list(image_fill if image_fill is not None else mean_pixel())

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - w), max(0, self.size[0] - h)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


def _to_model_input(normalization: Normalization) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(*normalization),
    ]


def train_transform(crop_size: int | tuple[int, int], scale: tuple[float, float] = (0.5, 2.0),
                    hflip: bool = True, normalization: Normalization = (MEAN, STD)) -> v2.Compose:
    """Scale, pad, crop, flip, normalise: (uint8 Image, Mask) -> (float 3xHxW, int64 HxW)."""
    size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    steps: list[v2.Transform] = [RandomScale(*scale), PadToSize(size, mean_pixel(normalization[0])),
                                 v2.RandomCrop(size)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_model_input(normalization))


def eval_transform(normalization: Normalization = (MEAN, STD)) -> v2.Compose:
    """The whole image at its own size, normalised (scales and windows are the evaluator's business)."""
    return v2.Compose(_to_model_input(normalization))
