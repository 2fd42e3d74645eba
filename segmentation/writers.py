"""Writers of the on-disk layouts ``segmentation.datasets`` reads: VOCdevkit, SBD's benchmark_RELEASE, Cityscapes.

For the test fixtures and the demo's procedural data: what they write is what the real downloads
hold (JPEG images, palette PNG labels with the VOC colour map, MATLAB v5 ``.mat`` files with a
``GTcls`` struct written by scipy, Cityscapes ``*_labelIds.png`` grey images), so the loaders run the
same code on them as on the real data sets.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import CITYSCAPES_COLOURS, CITYSCAPES_LABEL_TO_TRAIN, IGNORE_INDEX, voc_palette

__all__ = ["write_vocdevkit", "write_sbd", "write_cityscapes", "write_palette_png", "voc_names"]


def voc_names(n: int, year: int = 2008) -> list[str]:
    """Image ids in VOC's ``<year>_<number>`` form."""
    return [f"{year}_{i:06d}" for i in range(n)]


def _jpeg(path: Path, image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be H x W x 3 uint8, got {image.dtype} {image.shape}")
    Image.fromarray(image).save(path, quality=95)


def write_palette_png(path: Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """A palette ('P') PNG whose pixel values are ``mask`` (uint8 class map) and colours the VOC map's."""
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # "L"; putpalette makes it "P"
    im.putpalette((voc_palette() if palette is None else palette).reshape(-1).tolist())
    im.save(path)


def write_vocdevkit(root: str | Path, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                    train_ids: Sequence[int], val_ids: Sequence[int], names: Sequence[str] | None = None) -> Path:
    """Write ``root/VOCdevkit/VOC2012`` (JPEGImages, SegmentationClass, ImageSets/Segmentation); return VOCdevkit.

    ``masks`` are H x W uint8 class maps (0-20, 255 = void); ``train_ids``/``val_ids`` index ``images``.
    """
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    names = list(names) if names is not None else voc_names(len(images))
    base = Path(root) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, image, mask in zip(names, images, masks, strict=True):
        _jpeg(base / "JPEGImages" / f"{name}.jpg", image)
        write_palette_png(base / "SegmentationClass" / f"{name}.png", mask)
    lists = {"train": [names[i] for i in train_ids], "val": [names[i] for i in val_ids]}
    lists["trainval"] = lists["train"] + lists["val"]
    for split, chosen in lists.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in chosen))
    return base.parent


def _sbd_mat(path: Path, mask: np.ndarray, num_classes: int = 21) -> None:
    """SBD's cls/*.mat: struct GTcls with Boundaries (cell of sparse edge maps per class),
    Segmentation (class map) and CategoriesPresent, as benchmark_RELEASE ships them."""
    import scipy.io
    import scipy.sparse

    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    boundaries = np.empty((num_classes - 1, 1), dtype=object)
    padded = np.pad(mask, 1, mode="edge")
    edge = np.zeros(mask.shape, dtype=bool)
    for dy, dx in ((0, 1), (1, 0), (1, 2), (2, 1)):
        edge |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] != mask
    for c in range(1, num_classes):
        boundaries[c - 1, 0] = scipy.sparse.csc_matrix(edge & (mask == c))
    present = np.array([c for c in np.unique(mask) if 0 < c < num_classes], dtype=np.uint8)[:, None]
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": mask,
                                      "CategoriesPresent": present}}, do_compression=True)


def write_sbd(root: str | Path, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
              train_ids: Sequence[int], val_ids: Sequence[int], names: Sequence[str] | None = None) -> Path:
    """Write ``root/benchmark_RELEASE/dataset`` (img, cls, train.txt, val.txt); return benchmark_RELEASE.

    SBD labels have no void: ``masks`` must hold classes 0-20 only.
    """
    names = list(names) if names is not None else voc_names(len(images))
    base = Path(root) / "benchmark_RELEASE" / "dataset"
    for sub in ("img", "cls"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, image, mask in zip(names, images, masks, strict=True):
        if (np.asarray(mask) == IGNORE_INDEX).any():
            raise ValueError(f"SBD labels have no void pixels (mask of {name} holds 255)")
        _jpeg(base / "img" / f"{name}.jpg", image)
        _sbd_mat(base / "cls" / f"{name}.mat", mask)
    (base / "train.txt").write_text("".join(f"{names[i]}\n" for i in train_ids))
    (base / "val.txt").write_text("".join(f"{names[i]}\n" for i in val_ids))
    return base.parent


def write_cityscapes(root: str | Path, split: str, images: Sequence[np.ndarray], label_ids: Sequence[np.ndarray],
                     city: str = "aachen", coarse: bool = False) -> list[str]:
    """Write ``leftImg8bit/<split>/<city>`` and ``gtFine`` (or ``gtCoarse``) ``/<split>/<city>``; return the stems.

    ``label_ids`` are Cityscapes' 34 label ids (uint8 0..33), written as ``*_labelIds.png`` (grey)
    together with the ``*_color.png`` that the official archives also hold.
    """
    root = Path(root)
    kind = "gtCoarse" if coarse else "gtFine"
    image_dir, label_dir = root / "leftImg8bit" / split / city, root / kind / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: len(CITYSCAPES_COLOURS)] = CITYSCAPES_COLOURS
    stems = []
    for i, (image, ids) in enumerate(zip(images, label_ids, strict=True)):
        stem = f"{city}_{i:06d}_000019"
        Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
        ids = np.ascontiguousarray(ids, dtype=np.uint8)
        Image.fromarray(ids).save(label_dir / f"{stem}_{kind}_labelIds.png")
        Image.fromarray(colours[CITYSCAPES_LABEL_TO_TRAIN[ids]]).save(label_dir / f"{stem}_{kind}_color.png")
        stems.append(stem)
    return stems
