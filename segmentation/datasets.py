"""PASCAL VOC 2012, SBD and Cityscapes read from the layouts their downloads unpack to.

* VOC 2012: ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/<split>.txt}``;
  labels are palette PNGs whose indices are the classes (0-20) and 255 (void).
* SBD: ``benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}``; labels are MATLAB files holding a
  ``GTcls`` struct whose ``Segmentation`` field is the class map (read with scipy.io.loadmat).
* ``train_aug`` (the standard 10,582-image VOC training set): VOC train + SBD train + SBD val, minus
  every VOC val image; where VOC and SBD both label an image, VOC's label is used.
* Cityscapes: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` (the 34 label ids, mapped to the 19 train ids,
  everything else 255), and ``gtCoarse/{train,train_extra}/...gtCoarse_labelIds.png`` for the paper's
  Stage-1 mix of coarse and fine labels.

A sample is only a pair of paths; files are read (and checked: sizes, label values) when a sample
is loaded, so building a 20k-image list costs a directory walk, not 20k decodes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

__all__ = [
    "IGNORE_INDEX", "VOC_CLASSES", "CITYSCAPES_CLASSES", "CITYSCAPES_COLOURS", "CITYSCAPES_LABEL_TO_TRAIN",
    "DATASETS", "DatasetError", "Sample", "SegmentationDataset", "voc_palette", "palette_for",
    "voc_samples", "sbd_samples", "train_aug_samples", "cityscapes_samples", "build_samples",
    "read_image", "read_label", "dataset_info",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Cityscapes' 19 evaluation classes in train-id order, with their official colours.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# label id -> train id (cityscapesScripts' labels.py); the other ids of 0..33 are void.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_NUM_LABEL_IDS = 34
CITYSCAPES_LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label, _train in _CITYSCAPES_TRAIN_IDS.items():
    CITYSCAPES_LABEL_TO_TRAIN[_label] = _train

DATASETS = ("voc", "cityscapes")
LabelFormat = Literal["png", "sbd_mat", "cityscapes_ids"]

# Standard list sizes: VOC 2012 seg train/val and SBD train/val, and the resulting train_aug.
STANDARD_SIZES = {"voc_train": 1464, "voc_val": 1449, "sbd_train": 8498, "sbd_val": 2857}
STANDARD_TRAIN_AUG = 10582


class DatasetError(ValueError):
    """A data set on disk that cannot be used as it is (missing folder or file, bad label...)."""


@dataclass(frozen=True)
class Sample:
    name: str  # image id, unique within a split (used for prediction file names)
    image: Path
    label: Path
    label_format: LabelFormat


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map (256 x 3 uint8): the bit-interleaving of the VOC devkit's VOClabelcolormap."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def palette_for(dataset: str) -> np.ndarray:
    """256 x 3 colours indexed by class (255: void) for prediction PNGs."""
    if dataset == "voc":
        return voc_palette()
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(CITYSCAPES_COLOURS)] = CITYSCAPES_COLOURS
    return palette


def dataset_info(dataset: str) -> tuple[int, tuple[str, ...]]:
    """(number of classes, class names) of a data set name."""
    if dataset == "voc":
        return len(VOC_CLASSES), VOC_CLASSES
    if dataset == "cityscapes":
        return len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES
    raise DatasetError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Reading one sample
# ---------------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """RGB uint8 H x W x 3."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image {path} does not exist") from None
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e} (corrupt or truncated file?)") from e


def _read_png_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise DatasetError(f"label {path} is a {im.mode} image; expected a palette (P) or grey (L) PNG "
                               "whose pixel values are the class indices")
        return np.asarray(im)


def _read_sbd_label(path: Path) -> np.ndarray:
    from scipy.io import loadmat  # optional dependency: only SBD needs it

    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
        seg = mat["GTcls"].Segmentation
    except (KeyError, AttributeError) as e:
        raise DatasetError(f"SBD label {path} has no GTcls.Segmentation ({e}); is it from benchmark_RELEASE/"
                           "dataset/cls (not inst)?") from e
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise DatasetError(f"SBD label {path}: GTcls.Segmentation has shape {seg.shape}, expected H x W")
    if seg.min() < 0 or seg.max() > 255:
        raise DatasetError(f"SBD label {path} holds values outside 0..255 ({seg.min()}..{seg.max()})")
    return seg.astype(np.uint8)


def read_label(sample: Sample, num_classes: int) -> np.ndarray:
    """H x W uint8 class map (255 = void), checked: every value is a class or 255."""
    path = sample.label
    try:
        if sample.label_format == "png":
            label = _read_png_label(path)
        elif sample.label_format == "sbd_mat":
            label = _read_sbd_label(path)
        else:
            label = _read_png_label(path)
            bad = label >= CITYSCAPES_NUM_LABEL_IDS
            if bad.any():
                raise DatasetError(f"Cityscapes label {path} holds label ids {sorted(np.unique(label[bad]))[:8]} "
                                   f"outside 0..{CITYSCAPES_NUM_LABEL_IDS - 1}: is it a *_labelIds.png file?")
            label = CITYSCAPES_LABEL_TO_TRAIN[label]
    except FileNotFoundError:
        raise DatasetError(f"label {path} does not exist (image {sample.image} has no label)") from None
    except OSError as e:
        raise DatasetError(f"cannot read label {path}: {e}") from e
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        values = sorted(int(v) for v in np.unique(label[bad]))
        raise DatasetError(f"label {path} holds values {values[:8]} outside the {num_classes} classes "
                           f"(0..{num_classes - 1}, 255 = void)")
    return label


def load_pair(sample: Sample, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = read_image(sample.image), read_label(sample, num_classes)
    if image.shape[:2] != label.shape:
        raise DatasetError(f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but its label "
                           f"{sample.label} is {label.shape[1]}x{label.shape[0]} (width x height)")
    return image, label


class SegmentationDataset(torch.utils.data.Dataset):
    """Samples read as ``(tv_tensors.Image uint8 3xHxW, tv_tensors.Mask uint8 HxW)``, then ``transform``.

    An index may be an int or a pair ``(index, seed)``: with a seed, the random transform runs under
    ``torch.manual_seed(seed)`` (in a forked RNG), so augmentation depends only on (run seed, epoch,
    sample) -- not on which worker loads it or whether the run was resumed in the middle of an epoch.
    """

    def __init__(self, samples: Sequence[Sample], num_classes: int, transform: Callable | None = None):
        self.samples = list(samples)
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image, label = load_pair(self.samples[index], self.num_classes)
        return (tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1)),
                tv_tensors.Mask(torch.from_numpy(label.copy())))

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask
        if seed is None:
            return self.transform(image, mask)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image, mask)


# ---------------------------------------------------------------------------------------------
# Sample lists
# ---------------------------------------------------------------------------------------------
def _need_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} folder {path} does not exist; {fix}")
    return path


def _read_list(path: Path, fix: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"image list {path} does not exist; {fix}")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"image list {path} is empty")
    return names


def _check_files(samples: list[Sample], lst: Path) -> None:
    """Every listed image must exist and have its label file (checked up front: a walk, not a decode)."""
    for s in samples:
        if not s.image.is_file():
            raise DatasetError(f"{lst} lists {s.name} but image {s.image} does not exist")
        if not s.label.is_file():
            raise DatasetError(f"image {s.image} has no label: {s.label} does not exist")


def voc_root(root: str | Path) -> Path:
    """Accepts ``VOCdevkit``, ``VOCdevkit/VOC2012`` or the folder holding ``VOCdevkit``."""
    root = Path(root)
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() or (cand / "SegmentationClass").is_dir():
            return cand
    raise DatasetError(f"no PASCAL VOC 2012 under {root}: expected {root}/VOC2012/JPEGImages and "
                       "SegmentationClass (give data.root=.../VOCdevkit)")


def voc_samples(root: str | Path, split: str) -> list[Sample]:
    """VOC 2012 segmentation ``split`` (train, val, trainval: ``ImageSets/Segmentation/<split>.txt``)."""
    base = voc_root(root)
    fix = "download and unpack VOCtrainval_11-May-2012.tar, and give data.root=.../VOCdevkit"
    images = _need_dir(base / "JPEGImages", "VOC image", fix)
    labels = _need_dir(base / "SegmentationClass", "VOC label", fix)
    lst = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    samples = [Sample(n, images / f"{n}.jpg", labels / f"{n}.png", "png") for n in _read_list(lst, fix)]
    _check_files(samples, lst)
    return samples


def sbd_root(root: str | Path) -> Path:
    """Accepts ``benchmark_RELEASE``, ``benchmark_RELEASE/dataset`` or the folder holding it."""
    root = Path(root)
    for cand in (root, root / "dataset", root / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir() and (cand / "img").is_dir():
            return cand
    raise DatasetError(f"no SBD under {root}: expected {root}/dataset/img and dataset/cls (download "
                       "benchmark.tgz and give data.sbd_root=.../benchmark_RELEASE)")


def sbd_samples(root: str | Path, split: str) -> list[Sample]:
    """SBD ``split`` (train or val: ``dataset/<split>.txt``)."""
    base = sbd_root(root)
    lst = base / f"{split}.txt"
    names = _read_list(lst, "SBD ships train.txt and val.txt in benchmark_RELEASE/dataset")
    samples = [Sample(n, base / "img" / f"{n}.jpg", base / "cls" / f"{n}.mat", "sbd_mat") for n in names]
    _check_files(samples, lst)
    return samples


def train_aug_samples(voc: str | Path, sbd: str | Path) -> list[Sample]:
    """(VOC train + SBD train + SBD val) - VOC val, VOC labels winning: the 10,582-image train_aug set."""
    voc_train, voc_val = voc_samples(voc, "train"), voc_samples(voc, "val")
    sbd_train, sbd_val = sbd_samples(sbd, "train"), sbd_samples(sbd, "val")
    excluded = {s.name for s in voc_val}
    chosen: dict[str, Sample] = {}
    for s in [*sbd_train, *sbd_val]:
        if s.name not in excluded:
            chosen[s.name] = s
    for s in voc_train:  # VOC's own labels are the finer ones: they replace SBD's
        chosen[s.name] = s
    samples = [chosen[n] for n in sorted(chosen)]

    expected = len({s.name for s in [*voc_train, *sbd_train, *sbd_val]} - excluded)
    if len(samples) != expected or excluded & set(chosen):
        raise DatasetError(f"train_aug: built {len(samples)} images, the lists give {expected}")
    sizes = {"voc_train": len(voc_train), "voc_val": len(voc_val), "sbd_train": len(sbd_train),
             "sbd_val": len(sbd_val)}
    from_voc = sum(s.label_format == "png" for s in samples)
    print(f"train_aug: {len(samples)} images = (VOC train {sizes['voc_train']} + SBD train {sizes['sbd_train']} "
          f"+ SBD val {sizes['sbd_val']}) - VOC val {sizes['voc_val']}; {from_voc} with VOC labels, "
          f"{len(samples) - from_voc} with SBD labels")
    if sizes == STANDARD_SIZES and len(samples) != STANDARD_TRAIN_AUG:
        raise DatasetError(f"train_aug from the standard lists must hold {STANDARD_TRAIN_AUG} images, "
                           f"got {len(samples)}: check ImageSets/Segmentation and SBD's train.txt/val.txt")
    if sizes != STANDARD_SIZES:
        log.warning("train_aug: lists are not the standard ones (%s); the standard set has %d images",
                    sizes, STANDARD_TRAIN_AUG)
    return samples


def cityscapes_samples(root: str | Path, split: str, coarse: bool = False) -> list[Sample]:
    """Cityscapes ``split`` (train, val, test; train_extra with ``coarse``), fine or coarse labels."""
    root = Path(root)
    kind = "gtCoarse" if coarse else "gtFine"
    fix = f"unpack leftImg8bit_trainvaltest.zip and {kind}*.zip into data.root={root}"
    if split == "train_extra":
        fix = "unpack leftImg8bit_trainextra.zip and gtCoarse.zip into data.root"
    images = _need_dir(root / "leftImg8bit" / split, "Cityscapes image", fix)
    labels = _need_dir(root / kind / split, "Cityscapes label", fix)
    samples = []
    for path in sorted(images.glob("*/*_leftImg8bit.png")):
        stem = path.name[: -len("_leftImg8bit.png")]
        label = labels / path.parent.name / f"{stem}_{kind}_labelIds.png"
        if not label.is_file():
            raise DatasetError(f"image {path} has no label: {label} does not exist")
        samples.append(Sample(f"{path.parent.name}/{stem}", path, label, "cityscapes_ids"))
    if not samples:
        raise DatasetError(f"no <city>/*_leftImg8bit.png images under {images}")
    return samples


# Named splits of each data set: what a config's data.train_split / data.val_split may say.
SPLITS = {
    "voc": ("train", "val", "trainval", "train_aug", "sbd_train", "sbd_val"),
    "cityscapes": ("train", "val", "train_coarse", "coarse_train_extra"),
}


def build_samples(dataset: str, split: str, root: str | Path, sbd: str | Path | None = None) -> list[Sample]:
    """The samples of a named split: see ``SPLITS``.

    ``cityscapes/train_coarse`` is the paper's Stage-1 mix: the 2,975 finely labelled train images
    plus the 19,998 coarsely labelled train_extra images (22,973 in all).
    """
    dataset_info(dataset)
    if split not in SPLITS[dataset]:
        raise DatasetError(f"unknown {dataset} split {split!r}; choose one of {', '.join(SPLITS[dataset])}")
    if not root:
        raise DatasetError(f"data.root is not set: give the {dataset} folder (data.root=PATH)")
    if dataset == "voc":
        if split in ("train_aug", "sbd_train", "sbd_val") and not sbd:
            raise DatasetError(f"split {split} needs SBD: set data.sbd_root=.../benchmark_RELEASE")
        if split == "train_aug":
            return train_aug_samples(root, sbd)
        if split.startswith("sbd_"):
            return sbd_samples(sbd, split[4:])
        return voc_samples(root, split)
    if split == "train_coarse":
        fine = cityscapes_samples(root, "train")
        extra = cityscapes_samples(root, "train_extra", coarse=True)
        print(f"cityscapes train_coarse: {len(fine) + len(extra)} images = fine train {len(fine)} + "
              f"coarse train_extra {len(extra)}")
        return fine + extra
    if split == "coarse_train_extra":
        return cityscapes_samples(root, "train_extra", coarse=True)
    return cityscapes_samples(root, split)
