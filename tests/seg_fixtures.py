"""Tiny segmentation data sets in the real on-disk formats (VOCdevkit, SBD benchmark_RELEASE, Cityscapes).

The writers live in ``segmentation.writers`` (the demo uses them too); this module makes the
scenes: flat-coloured shapes on a textured background, one colour per class, so a small network
can learn them in a few dozen steps and JPEG coding keeps the colours apart.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from segmentation.datasets import IGNORE_INDEX
from segmentation.writers import voc_names, write_cityscapes, write_sbd, write_vocdevkit

__all__ = ["CLASS_COLOURS", "scene", "scenes", "make_voc", "make_sbd", "make_cityscapes",
           "write_vocdevkit", "write_sbd", "write_cityscapes", "voc_names"]

# Colours for classes 0.. (0 = background, drawn as grey texture underneath).
CLASS_COLOURS = np.array([(120, 120, 120), (230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30),
                          (200, 40, 220), (30, 220, 220)], dtype=np.int16)


def scene(rng: np.random.Generator, h: int, w: int, classes: list[int], void_band: int = 0,
          shapes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """An image (H x W x 3 uint8) with ``shapes`` rectangles/ellipses of random ``classes`` and its mask.

    ``void_band`` > 0 marks the object contours void (255) that many pixels wide, as VOC's labels do.
    """
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), dtype=np.uint8)
    for _ in range(shapes):
        c = int(rng.choice(classes))
        cy, cx = rng.integers(h // 5, h - h // 5), rng.integers(w // 5, w - w // 5)
        ry, rx = rng.integers(max(2, h // 8), max(3, h // 3)), rng.integers(max(2, w // 8), max(3, w // 3))
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            inside = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        mask[inside] = c
    image = CLASS_COLOURS[mask % len(CLASS_COLOURS)] + rng.integers(-12, 13, size=(h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    if void_band:
        padded = np.pad(mask, void_band, mode="edge")
        edge = np.zeros_like(mask, dtype=bool)
        for dy in range(2 * void_band + 1):
            for dx in range(2 * void_band + 1):
                edge |= padded[dy:dy + h, dx:dx + w] != mask
        mask = np.where(edge & (mask > 0), IGNORE_INDEX, mask).astype(np.uint8)
    return image, mask


def scenes(n: int, seed: int, size: tuple[int, int] | list[tuple[int, int]], classes: list[int],
           void_band: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    sizes = size if isinstance(size, list) else [size] * n
    pairs = [scene(rng, h, w, classes, void_band) for h, w in sizes[:n]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def make_voc(root: Path, n_train: int = 6, n_val: int = 3, seed: int = 0, classes: list[int] | None = None,
             size: tuple[int, int] = (40, 52), void_band: int = 1) -> Path:
    """VOCdevkit with ``n_train`` + ``n_val`` images (ids 2008_000000...); returns the VOCdevkit folder."""
    images, masks = scenes(n_train + n_val, seed, size, classes or [1, 2, 3], void_band)
    return write_vocdevkit(root, images, masks, range(n_train), range(n_train, n_train + n_val))


def make_sbd(root: Path, names: list[str], train: list[str], val: list[str], seed: int = 1,
             size: tuple[int, int] = (40, 52)) -> Path:
    """benchmark_RELEASE for image ids ``names``, listing ``train`` and ``val``."""
    images, masks = scenes(len(names), seed, size, [1, 2, 3])
    index = {n: i for i, n in enumerate(names)}
    return write_sbd(root, images, masks, [index[n] for n in train], [index[n] for n in val], names)


def make_cityscapes(root: Path, seed: int = 2, size: tuple[int, int] = (32, 64)) -> Path:
    """Cityscapes with 2 train, 1 val (fine) and 2 train_extra (coarse) images over all 34 label ids."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n, coarse in (("train", 2, False), ("val", 1, False), ("train_extra", 2, True)):
        images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]
        ids = [rng.integers(0, 34, size=(h, w), dtype=np.uint8) for _ in range(n)]
        write_cityscapes(root, split, images, ids, city="aachen" if split != "val" else "frankfurt", coarse=coarse)
    return root
