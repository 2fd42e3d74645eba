"""Shapes: the embedded procedural data set of the demo, written in the real on-disk layouts.

    python -m experiments.shapes --out data/shapes [--seed 0] [--train-per-class 300] ...

Images of six shape classes (circle, square, triangle, star, ring, cross) with random size,
rotation, colour and texture (flat, stripes, checks, noise) on a textured background strewn with
clutter (thin lines and small blobs that belong to the background). A shape's class is its
outline and, as a hint, its hue: each class has its own hue (60 degrees apart), jittered per
image (standard deviation 12 degrees), in a texture of random kind. The hint is there for the demo's budget:
with the outline alone, a ResNet-50 trained from scratch for a few hundred CPU steps stays at
chance (measured: 18% top-1 on six classes); with it, both stages learn within minutes, and the
outline still separates the classes whose hues the jitter lets overlap.

Everything follows from ``--seed``: each image has its own generator seeded by (seed, split,
index), so the same seed writes the same pixels. Written under ``--out``:

``imagenet/{train,val}/<class>/<class>_<index>.JPEG``
    one shape per image, the ImageNet folder layout (``python -m backbone.write_beton`` reads it).
``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}``
    one to three shapes per image, palette-PNG masks with VOC's colour map and a one-pixel void
    (255) band along every object contour, as PASCAL VOC draws one.
``benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}``
    more segmentation images as SBD ships them (``.mat`` labels, no void), so ``train_aug``
    (VOC train + SBD, minus VOC val) works as with the real data.
``shapes.json``
    the seed, the counts and the class map. Shape ``i`` (1-6) is VOC class id ``i`` on disk, so the
    segmentation stage's VOC code reads it unchanged; evaluation tables print VOC's names for
    those ids (aeroplane = circle, bicycle = square, ...), ``shapes.json`` says which is which.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.logs import Progress, setup_logging
from segmentation.datasets import IGNORE_INDEX, VOC_CLASSES
from segmentation.writers import write_sbd, write_vocdevkit

__all__ = ["SHAPES", "ShapesSpec", "render_classification", "render_segmentation", "write_shapes", "main"]

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
_SPLIT_IDS = {"imagenet_train": 0, "imagenet_val": 1, "voc": 2, "sbd": 3}


@dataclass(frozen=True)
class ShapesSpec:
    """How many images of which sizes; the defaults are the demo's (``configs/demo.yaml``)."""

    seed: int = 0
    train_per_class: int = 200  # ImageNet-layout training images per class
    val_per_class: int = 50
    voc_train: int = 150  # VOC 2012 segmentation lists
    voc_val: int = 100
    sbd: int = 300  # SBD images (train.txt: 5/6 of them, val.txt: the rest)
    min_size: int = 64  # image sides are drawn from [min_size, max_size]
    max_size: int = 88


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``r`` around (cx, cy), rotated by ``angle``."""
    if kind == "square":
        t = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, r)
    elif kind == "triangle":
        t = angle + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, r)
    elif kind == "star":
        t = angle + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    elif kind == "cross":  # a plus sign of arm half-width w
        w = 0.36 * r
        pts = np.array([(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w),
                        (-r, w), (-w, w), (-w, r)])
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(f"no polygon for {kind!r}")
    return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for rad, a in zip(radii, t, strict=True)]


def shape_mask(kind: str, size: tuple[int, int], cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean H x W mask of one shape."""
    h, w = size
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    if kind in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
        if kind == "ring":
            q = 0.55 * r
            draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=1)
    return np.asarray(im, dtype=bool)


def _colour(rng: np.random.Generator, saturated: bool, hue: float | None = None) -> np.ndarray:
    """A random RGB colour, vivid for objects and muted for the background; ``hue`` in [0, 6) (60 degrees
    per unit) is jittered, else drawn uniformly."""
    hue = rng.uniform(0, 6) if hue is None else hue + rng.normal(0, 0.2)
    sat, val = (rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0)) if saturated else \
        (rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.85))
    k = (np.array([5, 3, 1]) + hue) % 6
    rgb = val * (1 - sat * np.clip(np.minimum(k, 4 - k), 0, 1))
    return (255 * rgb).astype(np.float32)


def texture(rng: np.random.Generator, size: tuple[int, int], saturated: bool, hue: float | None = None) -> np.ndarray:
    """H x W x 3 float texture: flat, stripes, checks or noise in one or two colours (of about ``hue``)."""
    h, w = size
    a, b = _colour(rng, saturated, hue), _colour(rng, saturated, hue)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        t = (np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period) > 0).astype(np.float32)
    elif kind == 2:
        cell = rng.integers(3, 9)
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:
        t = rng.random((h, w), dtype=np.float32)
    out = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    return out + rng.normal(0, 6, (h, w, 3)).astype(np.float32)


def background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A muted texture under a brightness gradient, strewn with clutter (lines, small blobs)."""
    h, w = size
    img = texture(rng, size, saturated=False)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    img *= (0.8 + 0.4 * ((xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)))[..., None]
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(2, 7)):
        colour = tuple(int(v) for v in _colour(rng, saturated=rng.random() < 0.5))
        if rng.random() < 0.6:
            x0, y0, x1, y1 = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 3)))
        else:
            x, y, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 4)
            draw.ellipse((x - s, y - s, x + s, y + s), fill=colour)
    return np.asarray(im, dtype=np.float32)


def _place(rng: np.random.Generator, size: tuple[int, int], r_range: tuple[float, float]) -> tuple[float, ...]:
    h, w = size
    r = rng.uniform(*r_range) * min(h, w)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    return cx, cy, r, rng.uniform(0, 2 * np.pi)


def _finish(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0, 255).astype(np.uint8)


def _size(rng: np.random.Generator, spec: ShapesSpec) -> tuple[int, int]:
    return int(rng.integers(spec.min_size, spec.max_size + 1)), int(rng.integers(spec.min_size, spec.max_size + 1))


def render_classification(rng: np.random.Generator, label: int, spec: ShapesSpec = ShapesSpec()) -> np.ndarray:
    """One image (H x W x 3 uint8) of one shape of class ``label`` (index into SHAPES)."""
    size = _size(rng, spec)
    img = background(rng, size)
    mask = shape_mask(SHAPES[label], size, *_place(rng, size, (0.22, 0.42)))
    img[mask] = texture(rng, size, saturated=True, hue=float(label))[mask]
    return _finish(img)


def render_segmentation(rng: np.random.Generator, spec: ShapesSpec = ShapesSpec(),
                        void_band: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One image with one to three shapes and its class map (0 background, 1-6 shapes, 255 void band).

    Later shapes are drawn over earlier ones, in the image and in the mask alike.
    """
    size = _size(rng, spec)
    img = background(rng, size)
    mask = np.zeros(size, dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        label = int(rng.integers(len(SHAPES)))
        region = shape_mask(SHAPES[label], size, *_place(rng, size, (0.14, 0.3)))
        img[region] = texture(rng, size, saturated=True, hue=float(label))[region]
        mask[region] = label + 1
    if void_band:  # VOC marks object contours void: pixels whose 4-neighbourhood holds another class
        padded = np.pad(mask, 1, mode="edge")
        edge = np.zeros(size, dtype=bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            edge |= padded[dy:dy + size[0], dx:dx + size[1]] != mask
        mask[edge & (mask > 0)] = IGNORE_INDEX
    return _finish(img), mask


# ---------------------------------------------------------------------------------------------
# Writing the layouts
# ---------------------------------------------------------------------------------------------
def _rng(spec: ShapesSpec, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SPLIT_IDS[split], index])


def write_imagenet_split(out: Path, split: str, per_class: int, spec: ShapesSpec, progress: bool = True) -> Path:
    """``out/imagenet/<split>/<class>/<class>_<i>.JPEG``; returns the split folder."""
    root = out / "imagenet" / split
    items = [(c, i) for c in range(len(SHAPES)) for i in range(per_class)]
    for c, i in Progress(items, len(items), f"shapes: imagenet/{split}", enabled=progress):
        folder = root / SHAPES[c]
        folder.mkdir(parents=True, exist_ok=True)
        image = render_classification(_rng(spec, f"imagenet_{split}", c * 1_000_003 + i), c, spec)
        Image.fromarray(image).save(folder / f"{SHAPES[c]}_{i:05d}.JPEG", quality=92)
    for name in SHAPES:  # images of an earlier, larger spec would be read as this one's (the folder is scanned)
        written = {f"{name}_{i:05d}.JPEG" for i in range(per_class)}
        for stale in (root / name).glob(f"{name}_*.JPEG"):
            if stale.name not in written:
                stale.unlink()
    return root


def _segmentation_set(split: str, n: int, spec: ShapesSpec, void_band: bool, progress: bool) \
        -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, masks = [], []
    for i in Progress(range(n), n, f"shapes: {split}", enabled=progress):
        image, mask = render_segmentation(_rng(spec, split, i), spec, void_band)
        images.append(image)
        masks.append(mask)
    return images, masks


def write_shapes(out: str | Path, spec: ShapesSpec = ShapesSpec(), progress: bool = True) -> dict:
    """Write the whole data set under ``out`` (see the module doc); returns what ``shapes.json`` holds."""
    out = Path(out)
    manifest_path = out / "shapes.json"
    manifest = {
        "name": "shapes", "spec": asdict(spec), "classes": list(SHAPES),
        "voc_ids": {name: i + 1 for i, name in enumerate(SHAPES)},
        "voc_names": {name: VOC_CLASSES[i + 1] for i, name in enumerate(SHAPES)},
        "imagenet": {"train": str(out / "imagenet" / "train"), "val": str(out / "imagenet" / "val")},
        "vocdevkit": str(out / "VOCdevkit"), "sbd": str(out / "benchmark_RELEASE"),
    }
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("spec") == asdict(spec):
        return manifest  # written before with the same spec: same seed, same pixels
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # a rewrite cut short must not pass for the earlier spec's data set
    write_imagenet_split(out, "train", spec.train_per_class, spec, progress)
    write_imagenet_split(out, "val", spec.val_per_class, spec, progress)
    images, masks = _segmentation_set("voc", spec.voc_train + spec.voc_val, spec, True, progress)
    n_voc = len(images)
    write_vocdevkit(out, images, masks, range(spec.voc_train), range(spec.voc_train, n_voc))
    images, masks = _segmentation_set("sbd", spec.sbd, spec, False, progress)
    names = [f"2011_{i:06d}" for i in range(spec.sbd)]  # ids of their own: no clash with the VOC ones
    n_train = spec.sbd * 5 // 6
    write_sbd(out, images, masks, range(n_train), range(n_train, spec.sbd), names=names)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    defaults = ShapesSpec()
    p = argparse.ArgumentParser(prog="python -m experiments.shapes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    for key, value in asdict(defaults).items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = p.parse_args(argv)
    spec = ShapesSpec(**{k: getattr(args, k) for k in asdict(defaults)})
    if spec.min_size < 32 or spec.max_size < spec.min_size:
        p.error(f"need 32 <= --min-size <= --max-size, got {spec.min_size} and {spec.max_size}")
    if spec.seed < 0:
        p.error(f"--seed must be >= 0, got {spec.seed}")
    counts = {k: getattr(spec, k) for k in ("train_per_class", "val_per_class", "voc_train", "voc_val", "sbd")}
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in counts.items() if v < (6 if k == "sbd" else 1)]
    if bad:
        p.error(f"every split needs at least one image (and --sbd at least 6), got {', '.join(bad)}")
    setup_logging()
    manifest = write_shapes(args.out, spec)
    print(f"shapes data set (seed {spec.seed}) in {args.out}:")
    print(f"  ImageNet layout: {manifest['imagenet']['train']} ({spec.train_per_class} x {len(SHAPES)}), "
          f"{manifest['imagenet']['val']} ({spec.val_per_class} x {len(SHAPES)})")
    print(f"  VOCdevkit:       {manifest['vocdevkit']} (train {spec.voc_train}, val {spec.voc_val})")
    print(f"  SBD:             {manifest['sbd']} ({spec.sbd} images)")
    print("  VOC class ids:   " + ", ".join(f"{i + 1} = {s}" for i, s in enumerate(SHAPES)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
