"""Valid receptive field (VRF) of a score-map location: the paper's Figure 3.

Peng et al. show (Figure 3) the *valid receptive field* of the score map at the centre of an object:
the input pixels that actually move that score. A plain FCN's theoretical receptive field covers
the whole image, but its VRF covers little more than the object (A) and no longer holds it when the
image is enlarged (B); a GCN head enlarges it (C). The term and the measure come from Luo et al.,
"Understanding the effective receptive field in deep convolutional neural networks" (the paper's
[38]), which calls it the *effective* receptive field.

How it is computed here, for one network, one image and one location ``(row, col)``:

1. the network (eval mode) maps the normalised image to logits of the image's size;
2. the *score* is one logit at that location: by default the logit of the class the network predicts
   there (``target='predicted'``), or a given class, or the sum over classes (``target='sum'``);
3. the heat map is ``|d score / d input|`` summed over the colour channels (H x W);
4. the VRF is the smallest set of pixels holding ``share`` (default 90%) of the heat map's total
   mass: pixels sorted by heat, largest first, counted until the cumulative sum reaches ``share``.

Its size is reported as the pixel count (*area*), as a fraction of the image, and as the side of the
square of that area (``sqrt(area)`` px). A location whose score does not depend on the input at all
(an all-zero gradient, e.g. a dead ReLU path) has area 0 and ``zero_gradient`` set.

Unless a location is given, each image's is the centre of its object: of the largest labelled class
region (background 0 and void 255 excluded), the pixel farthest from the region's boundary (the image
border counts as boundary; ties go to the deepest pixel nearest the mean of the deepest ones). An
image without a label or without an object uses the image centre ``(H // 2, W // 2)``.

At input scale ``s`` (the paper's (B)) the image is resized by ``s`` before the network and the
location moves with it; areas are then pixels of the resized image, and the fraction is of it.

Run it::

    # a fine-tuned network on the first 4 images of its own validation split
    python -m experiments.receptive_field --checkpoint runs/seg/voc_gcn/final.pth
    # baseline (1x1 score maps) vs GCN k=15 on the same random backbone, at scales 1 and 2
    python -m experiments.receptive_field --model resnet50:baseline --model resnet50:gcn \\
        --data-root data/VOCdevkit --scales 1,2
    # any picture, a chosen location (row, column in input pixels)
    python -m experiments.receptive_field --checkpoint final.pth --image bird.jpg --point 180,250

It writes ``receptive_field.png`` (rows: images; columns: the input, then the heat map of each
model and scale with its VRF outlined and the location marked) and ``receptive_field.json`` (areas
per model, scale and image, and their means) into ``--out`` (default ``vrf/``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __name__ == "__main__" and not __package__:  # run as a file: the repository, not this folder, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from segmentation.datasets import IGNORE_INDEX, DatasetError, SegmentationDataset, build_samples, dataset_info
from segmentation.evaluate import parse_scales
from segmentation.transforms import MEAN, STD, eval_transform

__all__ = [
    "VRF",
    "VRFComparison",
    "valid_receptive_field",
    "vrf_area",
    "object_centre",
    "default_point",
    "scale_input",
    "compare_receptive_fields",
    "draw_receptive_fields",
    "receptive_field_report",
    "format_summary",
    "load_images_from_split",
    "load_image_file",
    "main",
]

log = logging.getLogger("experiments.receptive_field")

CPU = torch.device("cpu")
DEFAULT_SHARE = 0.9
FIGURE_NAME = "receptive_field.png"
JSON_NAME = "receptive_field.json"
Point = tuple[int, int]
Target = int | str


# ---------------------------------------------------------------------------------------------
# One location
# ---------------------------------------------------------------------------------------------
@dataclass
class VRF:
    """The valid receptive field of one score-map location (see the module docstring)."""

    heat: np.ndarray  # H x W float32: |d score / d input| summed over colour channels
    area: int  # pixels in the VRF (the fewest pixels holding ``share`` of the heat map's mass)
    fraction: float  # area / (H * W)
    side: float  # sqrt(area): side in pixels of a square of the same area
    point: Point  # (row, col) of the location, in input pixels
    share: float  # share of the gradient mass the VRF holds
    target_class: int | None  # the class whose logit was differentiated (None for target='sum')
    zero_gradient: bool = False  # True when the score does not depend on the input (area 0)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the input."""
        return self.heat.shape[0], self.heat.shape[1]

    def mask(self) -> np.ndarray:
        """H x W bool: the ``area`` pixels of largest heat (ties broken in raster order)."""
        flat = np.zeros(self.heat.size, dtype=bool)
        if self.area:
            flat[np.argsort(-self.heat.ravel(), kind="stable")[: self.area]] = True
        return flat.reshape(self.heat.shape)

    def to_json(self) -> dict[str, Any]:
        return {"point": list(self.point), "size": list(self.size), "area": self.area,
                "fraction": self.fraction, "side": self.side, "target_class": self.target_class,
                "zero_gradient": self.zero_gradient}


def vrf_area(heat: np.ndarray, share: float = DEFAULT_SHARE) -> int:
    """The smallest number of pixels of ``heat`` (non-negative) holding ``share`` of its sum; 0 if it sums to 0."""
    _check_share(share)
    flat = np.sort(np.asarray(heat, dtype=np.float64).ravel())[::-1]
    cumulative = np.cumsum(flat)
    total = cumulative[-1] if cumulative.size else 0.0
    if not total > 0:  # also catches NaN
        return 0
    return min(int(np.searchsorted(cumulative, share * total, side="left")) + 1, flat.size)


def _check_share(share: float) -> None:
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1] (the part of the gradient mass the VRF holds), got {share}")


def _check_point(point: Sequence[int], size: tuple[int, int], what: str = "point") -> Point:
    if len(point) != 2:
        raise ValueError(f"{what} must be (row, col), got {point!r}")
    r, c = (int(v) for v in point)
    h, w = size
    if not (0 <= r < h and 0 <= c < w):
        raise ValueError(f"{what} (row {r}, col {c}) is outside the {h}x{w} (HxW) image: rows 0..{h - 1}, "
                         f"cols 0..{w - 1}")
    return r, c


def valid_receptive_field(model: nn.Module, x: torch.Tensor, point: Sequence[int], share: float = DEFAULT_SHARE,
                          target: Target = "predicted") -> VRF:
    """The VRF of ``model``'s score at ``point`` = (row, col) for the normalised input ``x`` (1x3xHxW or 3xHxW).

    The model must give logits N x C x H x W at the input's size (as ``GCNSegmentationNet`` does); it
    runs in eval mode (its mode is restored afterwards), on the device of its parameters.

    ``target`` picks the score: ``'predicted'`` (default) is the logit of the class arg-maxed at
    ``point``, i.e. the score map that decides the pixel's label, which is what Figure 3 shows ("the
    score map located at the center of the bird"). A logit rather than a softmax probability, because
    the probability's gradient also carries every other class and vanishes where the network is
    confident. ``'sum'`` differentiates the sum of all class logits (positive and negative class
    weights may cancel there); an int differentiates that class's logit.
    """
    _check_share(share)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be one image, 1 x C x H x W or C x H x W, got shape {tuple(x.shape)}")
    size = (int(x.shape[-2]), int(x.shape[-1]))
    r, c = _check_point(point, size)
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inp = x.detach().clone().requires_grad_(True)
            out = model(inp)
            if out.dim() != 4 or tuple(out.shape[-2:]) != size:
                raise ValueError(f"the model must give N x C x H x W logits at the input's size {size}, "
                                 f"got shape {tuple(out.shape)}")
            logits = out[0, :, r, c]
            if target == "predicted":
                cls: int | None = int(logits.argmax())
                score = logits[cls]
            elif target == "sum":
                cls, score = None, logits.sum()
            elif isinstance(target, int) and not isinstance(target, bool) and 0 <= target < logits.numel():
                cls, score = target, logits[target]
            else:
                raise ValueError(f"target must be 'predicted', 'sum' or a class index 0..{logits.numel() - 1}, "
                                 f"got {target!r}")
            (grad,) = torch.autograd.grad(score, inp)
    finally:
        model.train(was_training)
    heat = grad[0].abs().sum(0).float().cpu().numpy()
    area = vrf_area(heat, share)
    return VRF(heat=heat, area=area, fraction=area / heat.size, side=math.sqrt(area), point=(r, c), share=share,
               target_class=cls, zero_gradient=area == 0)


# ---------------------------------------------------------------------------------------------
# Where to look, and at which scale
# ---------------------------------------------------------------------------------------------
def _depth(mask: torch.Tensor) -> torch.Tensor:
    """How many 3x3 erosions each pixel of ``mask`` survives (chessboard distance to the outside, >= 1 inside).

    Outside the image counts as outside the mask, so the image border is boundary too.
    """
    depth = torch.zeros(mask.shape, dtype=torch.int32)
    cur = mask.float()[None, None]
    for _ in range((min(mask.shape) + 1) // 2 + 1):
        if not cur.any():
            break
        depth += cur[0, 0].to(torch.int32)
        cur = -F.max_pool2d(F.pad(-cur, (1, 1, 1, 1), value=0.0), 3, stride=1)  # min-pool = erosion
    return depth


def object_centre(label: torch.Tensor | np.ndarray, background: int = 0,
                  ignore_index: int = IGNORE_INDEX) -> Point | None:
    """Centre of the largest labelled class region, or None when the label holds only background/void.

    The region is all pixels of the class with most pixels (background and void excluded); its centre is
    its pixel farthest from the region's boundary (chessboard distance via repeated erosion, the image
    border counting as boundary); among equally deep pixels, the one nearest their mean.
    """
    label = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label).long().cpu()
    if label.dim() != 2:
        raise ValueError(f"label must be H x W, got shape {tuple(label.shape)}")
    valid = (label != background) & (label != ignore_index) & (label >= 0)
    if not valid.any():
        return None
    counts = torch.bincount(label[valid])
    region = label == int(counts.argmax())
    depth = _depth(region)
    ys, xs = torch.nonzero(depth == depth.max(), as_tuple=True)
    cy, cx = ys.double().mean(), xs.double().mean()
    best = int(((ys - cy) ** 2 + (xs - cx) ** 2).argmin())
    return int(ys[best]), int(xs[best])


def default_point(size: tuple[int, int], label: torch.Tensor | np.ndarray | None = None) -> tuple[Point, str]:
    """(point, source): the object centre (source ``'object'``) or the image centre (``'centre'``)."""
    if label is not None:
        if tuple(label.shape[-2:]) != tuple(size):
            raise ValueError(f"label is {tuple(label.shape[-2:])} but the image is {tuple(size)} (H, W)")
        centre = object_centre(label)
        if centre is not None:
            return centre, "object"
    return (size[0] // 2, size[1] // 2), "centre"


def scale_input(x: torch.Tensor, point: Sequence[int], scale: float) -> tuple[torch.Tensor, Point]:
    """``x`` (N x C x H x W or C x H x W) resized by ``scale`` (bilinear) and ``point`` moved with it.

    The new size is ``round(H * scale) x round(W * scale)``; the point becomes the pixel holding the
    old pixel's centre, ``floor((r + 0.5) * scale)`` (clamped to the image).
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    h, w = x.shape[-2:]
    r, c = point
    if scale == 1:
        return x, (int(r), int(c))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    batch = x if x.dim() == 4 else x[None]
    out = F.interpolate(batch, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    out = out if x.dim() == 4 else out[0]
    nr = min(nh - 1, max(0, math.floor((r + 0.5) * nh / h)))
    nc = min(nw - 1, max(0, math.floor((c + 0.5) * nw / w)))
    return out, (nr, nc)


# ---------------------------------------------------------------------------------------------
# Several models, images and scales
# ---------------------------------------------------------------------------------------------
ImageItem = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class VRFComparison:
    """VRFs of several models on several images, at several input scales."""

    names: list[str]  # image names
    sizes: list[tuple[int, int]]  # (H, W) of each image at scale 1
    points: list[Point]  # each image's location at scale 1
    point_sources: list[str]  # 'object', 'centre' or 'given'
    scales: list[float]
    share: float
    target: Target
    results: dict[str, dict[float, list[VRF]]] = field(default_factory=dict)  # model -> scale -> per image

    def summary(self) -> dict[str, dict[float, dict[str, float]]]:
        """model -> scale -> mean area (px), fraction and side over the images, and the zero-gradient count."""
        out: dict[str, dict[float, dict[str, float]]] = {}
        for model, per_scale in self.results.items():
            out[model] = {}
            for s, vrfs in per_scale.items():
                out[model][s] = {
                    "mean_area": float(np.mean([v.area for v in vrfs])),
                    "mean_fraction": float(np.mean([v.fraction for v in vrfs])),
                    "mean_side": float(np.mean([v.side for v in vrfs])),
                    "zero_gradient_images": sum(v.zero_gradient for v in vrfs),
                }
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: settings, images, and per model and scale the per-image VRFs and their means."""
        summary = self.summary()
        models = {}
        for model, per_scale in self.results.items():
            models[model] = {_scale_key(s): {**summary[model][s], "images": [v.to_json() for v in vrfs]}
                             for s, vrfs in per_scale.items()}
        images = [{"name": n, "size": list(sz), "point": list(p), "point_source": src}
                  for n, sz, p, src in zip(self.names, self.sizes, self.points, self.point_sources, strict=True)]
        return {"share": self.share, "target": self.target, "scales": list(self.scales), "images": images,
                "models": models}


def _scale_key(scale: float) -> str:
    return f"{scale:g}"


def _unpack_image(item: Sequence[Any], i: int) -> ImageItem:
    if len(item) < 1 or len(item) > 2:
        raise ValueError(f"image {i}: expected (image, label or None), got {len(item)} items")
    x, label = item[0], item[1] if len(item) == 2 else None
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"image {i}: expected a normalised 3 x H x W float tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if label is not None and tuple(label.shape) != tuple(x.shape[-2:]):
        raise ValueError(f"image {i}: label is {tuple(label.shape)} but the image is {tuple(x.shape[-2:])} (H, W)")
    return x, label


def compare_receptive_fields(models: Mapping[str, nn.Module], images: Sequence[ImageItem],
                             scales: Sequence[float] = (1.0,), share: float = DEFAULT_SHARE,
                             device: torch.device = CPU, *, points: Sequence[Point | None] | Point | None = None,
                             target: Target = "predicted", names: Sequence[str] | None = None) -> VRFComparison:
    """The VRF of every model on every image at every scale.

    ``images``: ``(normalised 3xHxW float tensor, HxW label or None)``. ``points``: None (each image's
    :func:`default_point`), one (row, col) for all images, or one per image (None entries = default);
    points are in scale-1 pixels and move with the image at other scales. Models are moved to ``device``.
    """
    _check_share(share)
    if not models:
        raise ValueError("no models to compare")
    if not images:
        raise ValueError("no images to measure the VRF on")
    scales = [float(s) for s in scales]
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {scales}")
    items = [_unpack_image(item, i) for i, item in enumerate(images)]
    names = list(names) if names is not None else [f"image {i}" for i in range(len(items))]
    if len(names) != len(items):
        raise ValueError(f"{len(names)} names for {len(items)} images")
    if points is None or (len(points) == 2 and all(isinstance(v, (int, np.integer)) for v in points)):
        points = [points] * len(items)  # type: ignore[list-item]
    if len(points) != len(items):
        raise ValueError(f"{len(points)} points for {len(items)} images")

    sizes, resolved, sources = [], [], []
    for i, ((x, label), p) in enumerate(zip(items, points, strict=True)):
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if p is None:
            p, src = default_point(size, label)
        else:
            p, src = _check_point(p, size, f"point for {names[i]}"), "given"
        sizes.append(size)
        resolved.append(p)
        sources.append(src)

    comparison = VRFComparison(names, sizes, resolved, sources, scales, share, target)
    for model_name, model in models.items():
        model.to(device)
        per_scale: dict[float, list[VRF]] = {}
        for s in scales:
            vrfs = []
            for (x, _), p, name in zip(items, resolved, names, strict=True):
                xs, ps = scale_input(x[None].to(device), p, s)
                vrf = valid_receptive_field(model, xs, ps, share, target)
                log.info("%s, scale %g, %s (%dx%d, point %s): VRF %.1f%% of the image, %d px, side %.1f px%s",
                         model_name, s, name, *vrf.size, ps, 100 * vrf.fraction, vrf.area, vrf.side,
                         " (zero gradient)" if vrf.zero_gradient else "")
                vrfs.append(vrf)
            per_scale[s] = vrfs
        comparison.results[model_name] = per_scale
    return comparison


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------
def _display_image(x: torch.Tensor) -> np.ndarray:
    """Normalised 3 x H x W -> H x W x 3 in [0, 1]."""
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return (x.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _smoothed(mask: np.ndarray) -> np.ndarray:
    """``mask`` box-blurred over ~1/24 of the image's smaller side: an outline of the region, not of its speckle."""
    k = max(3, min(mask.shape) // 24) | 1
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)[0, 0].numpy()


def draw_receptive_fields(comparison: VRFComparison, images: Sequence[ImageItem], path: str | Path,
                          panel_inches: float = 2.4) -> Path:
    """Write the Figure 3 grid as a PNG: rows = images; columns = the input, then each model (x scale).

    Each heat-map panel shows the (resized) image dimmed, the heat map (square-root scaled, so the
    tails show), the VRF's outline (smoothed: the exact VRF is often speckled) and the location (+);
    its title gives the VRF area as a percentage of the image and the side of the equal-area square.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas by default

    columns = [(m, s) for m in comparison.results for s in comparison.scales]
    n_rows, n_cols = len(comparison.names), 1 + len(columns)
    fig = Figure(figsize=(panel_inches * n_cols, panel_inches * n_rows + 0.3), dpi=100)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    many_scales = len(comparison.scales) > 1
    for i, (x, _label) in enumerate(images[: n_rows]):
        x = x[0] if x.dim() == 4 else x
        h, w = comparison.sizes[i]
        ax = axes[i][0]
        ax.imshow(_display_image(x))
        r, c = comparison.points[i]
        ax.plot(c, r, marker="+", color="lime", markersize=12, markeredgewidth=2)
        ax.set_title(f"{comparison.names[i]}\n{w}x{h}, point ({r}, {c}) [{comparison.point_sources[i]}]",
                     fontsize=7)
        for j, (model, s) in enumerate(columns, start=1):
            vrf = comparison.results[model][s][i]
            xs, _ = scale_input(x, comparison.points[i], s)
            ax = axes[i][j]
            ax.imshow(0.35 * _display_image(xs))
            peak = float(vrf.heat.max())
            if peak > 0:
                ax.imshow(np.sqrt(vrf.heat / peak), cmap="inferno", alpha=0.7, vmin=0, vmax=1)
                if 0 < vrf.area < vrf.heat.size:
                    ax.contour(_smoothed(vrf.mask()), levels=[0.5], colors="cyan", linewidths=1.0)
            pr, pc = vrf.point
            ax.plot(pc, pr, marker="+", color="lime", markersize=12, markeredgewidth=2)
            head = f"{model}" + (f" x{s:g}" if many_scales else "")
            body = ("zero gradient: no VRF" if vrf.zero_gradient
                    else f"VRF {100 * vrf.fraction:.1f}%, {vrf.side:.0f} px side")
            ax.set_title(f"{head}\n{body}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    score = {"predicted": "logit of the predicted class", "sum": "sum of the class logits"}.get(
        comparison.target, f"logit of class {comparison.target}")  # type: ignore[arg-type]
    fig.suptitle(f"Valid receptive field: the pixels holding {100 * comparison.share:g}% of |d score / d input|, "
                 f"score = {score} at +", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def receptive_field_report(models: dict[str, torch.nn.Module], images: list[tuple[torch.Tensor, torch.Tensor | None]],
                           out_dir: Path, scales: Sequence[float] = (1.0,), share: float = DEFAULT_SHARE,
                           device: torch.device = CPU, *, points: Sequence[Point | None] | Point | None = None,
                           target: Target = "predicted", names: Sequence[str] | None = None) -> dict:
    """Measure, draw and save: ``out_dir/receptive_field.png`` and ``receptive_field.json``; returns the JSON dict.

    See :func:`compare_receptive_fields` for the arguments; the dict is :meth:`VRFComparison.to_json`
    plus the paths of the two files (``figure``, ``json``).
    """
    comparison = compare_receptive_fields(models, images, scales, share, device, points=points, target=target,
                                          names=names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = draw_receptive_fields(comparison, images, out_dir / FIGURE_NAME)
    record = comparison.to_json()
    record["figure"] = str(figure)
    record["json"] = str(out_dir / JSON_NAME)
    (out_dir / JSON_NAME).write_text(json.dumps(record, indent=1))
    return record


def format_summary(record: Mapping[str, Any]) -> str:
    """Readable table of a report's JSON dict: one line per model and scale."""
    rows = [(model, scale, v["mean_fraction"], v["mean_side"], v["mean_area"], v["zero_gradient_images"])
            for model, per_scale in record["models"].items() for scale, v in per_scale.items()]
    width = max([len("model")] + [len(r[0]) for r in rows])
    n = len(record["images"])
    lines = [f"valid receptive field ({100 * record['share']:g}% of the gradient mass), mean over {n} image(s):",
             f"{'model':<{width}}  scale  VRF area %  sqrt side px  area px",
             f"{'-' * width}  -----  ----------  ------------  -------"]
    for model, scale, fraction, side, area, zero in rows:
        note = f"  ({zero} with zero gradient)" if zero else ""
        lines.append(f"{model:<{width}}  {scale:>5}  {100 * fraction:>9.1f}%  {side:>12.1f}  {area:>7.0f}{note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def _split_images(root: str | Path, split: str, n: int, dataset: str = "voc",
                  sbd_root: str | Path | None = None) -> tuple[list[ImageItem], list[str]]:
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    num_classes, _ = dataset_info(dataset)
    samples = build_samples(dataset, split, root, sbd_root)[:n]
    data = SegmentationDataset(samples, num_classes)
    to_input = eval_transform()
    images = []
    for i in range(len(data)):
        x, label = to_input(*data.load(i))
        images.append((x.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)))
    return images, [s.name for s in samples]


def load_images_from_split(root: str | Path, split: str = "val", n: int = 4, dataset: str = "voc",
                           sbd_root: str | Path | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` images of a data set split as ``(normalised 3xHxW float, HxW int64 label)`` pairs."""
    return _split_images(root, split, n, dataset, sbd_root)[0]


def load_image_file(path: str | Path) -> tuple[torch.Tensor, None]:
    """Any image file (JPEG, PNG...) as ``(normalised 3xHxW float tensor, None)``."""
    from torchvision import tv_tensors

    from segmentation.datasets import read_image

    image = read_image(Path(path))  # DatasetError naming the file when missing or unreadable
    x = eval_transform()(tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1)))
    return x.as_subclass(torch.Tensor), None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def _parse_point(text: str) -> Point:
    parts = text.replace(" ", "").split(",")
    try:
        r, c = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"point must be ROW,COL (two integers, input pixels), got {text!r}") from None
    if r < 0 or c < 0:
        raise argparse.ArgumentTypeError(f"point must be ROW,COL with both >= 0, got {text!r}")
    return r, c


def _parse_share(text: str) -> float:
    try:
        share = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"share must be a number in (0, 1], got {text!r}") from None
    if not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"share must be in (0, 1], got {text!r}")
    return share


def _parse_model_spec(spec: str) -> tuple[str, str]:
    from segmentation.heads import HEADS

    backbone, sep, head = spec.rpartition(":")
    if not sep or not backbone or not head:
        raise UsageError(f"--model {spec!r}: expected BACKBONE:HEAD, e.g. resnet50:gcn "
                         f"(heads: {', '.join(HEADS)})")
    if head not in HEADS:
        raise UsageError(f"--model {spec!r}: unknown head {head!r}; choose one of {', '.join(HEADS)}")
    return backbone, head


def _unique(label: str, taken: Mapping[str, Any], extra: str = "") -> str:
    if label not in taken:
        return label
    if extra and f"{label} ({extra})" not in taken:
        return f"{label} ({extra})"
    i = 2
    while f"{label} #{i}" in taken:
        i += 1
    return f"{label} #{i}"


def _cli_description() -> str:
    doc = __doc__ or ""
    examples, _, outputs = doc.split("Run it::", 1)[1].partition("\n\nIt writes")
    return (f"{doc.split(chr(10), 1)[0]}\n\nThe VRF of a location is the smallest set of input pixels holding --share "
            "of |d score / d input|\n(score: a class logit there); its size is reported as % of the image and "
            f"as sqrt(area) px.\n\nexamples:\n{textwrap.indent(textwrap.dedent(examples).strip(), '  ')}"
            f"\n\nIt writes{outputs}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.receptive_field", allow_abbrev=False,
        description=_cli_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --data-root or --image, the images are the validation split of the first checkpoint's "
               "run (its data.root). Errors in the input exit with code 2.")
    m = p.add_argument_group("models (at least one)")
    m.add_argument("--checkpoint", type=Path, action="append", default=[], metavar="PATH",
                   help="final.pth of a fine-tuning run (repeatable); labelled BACKBONE+HEAD")
    m.add_argument("--model", action="append", default=[], metavar="BACKBONE:HEAD",
                   help="a fresh network, e.g. resnet50:gcn or resnet10t:baseline (repeatable); random init "
                        "seeded by --seed, so entries with the same backbone share its weights")
    m.add_argument("--pretrained", default=None, metavar="PATH",
                   help="backbone weights for every --model entry (a checkpoint file or timm[:TAG])")
    m.add_argument("--kernel-size", type=int, default=15, help="k of the gcn/conv/stack heads of --model (15)")
    m.add_argument("--num-classes", type=int, default=21, help="classes of --model networks (21)")
    m.add_argument("--seed", type=int, default=0, help="seed of the --model initialisation (0)")
    d = p.add_argument_group("images")
    d.add_argument("--data-root", default=None, metavar="VOCDEVKIT", help="data set folder (e.g. .../VOCdevkit)")
    d.add_argument("--dataset", default=None, choices=("voc", "cityscapes"),
                   help="data set of --data-root (default: the checkpoint's, else voc)")
    d.add_argument("--split", default=None, help="split of --data-root (default: val)")
    d.add_argument("--images", type=int, default=4, metavar="N", help="use the first N images of the split (4)")
    d.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                   help="an image file, JPEG/PNG (repeatable; no label: the location is the image centre)")
    o = p.add_argument_group("measure and output")
    o.add_argument("--point", type=_parse_point, default=None, metavar="ROW,COL",
                   help="location in input pixels for every image (default: the object's centre, else the "
                        "image centre)")
    o.add_argument("--scales", type=parse_scales, default=(1.0,), metavar="S1,S2",
                   help="input scales, e.g. 1,2 (default 1)")
    o.add_argument("--share", type=_parse_share, default=DEFAULT_SHARE,
                   help="share of the gradient mass the VRF holds (0.9)")
    o.add_argument("--target", default="predicted",
                   help="score to differentiate: predicted (the class predicted at the point), sum, or a class "
                        "index (default: predicted)")
    o.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    o.add_argument("--out", type=Path, default=Path("vrf"), metavar="DIR", help="output folder (default: vrf/)")
    return p


def _load_models(args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, Any] | None]:
    """Models by label, and the first checkpoint's metadata (None without checkpoints)."""
    from segmentation.artifacts import load_model
    from segmentation.network import build_segmentation_model

    specs = [_parse_model_spec(s) for s in args.model]  # check every spec before building anything
    if not specs and not args.checkpoint:
        raise UsageError("no model: give --checkpoint PATH (a fine-tuning final.pth) and/or --model BACKBONE:HEAD")
    for path in args.checkpoint:
        if not path.is_file():
            raise UsageError(f"checkpoint {path} does not exist; give the final.pth of a fine-tuning run")
    models: dict[str, nn.Module] = {}
    first_meta = None
    for path in args.checkpoint:
        log.info("loading %s", path)
        model, meta = load_model(path)
        first_meta = first_meta if first_meta is not None else meta
        margs = meta.get("model_args", {})
        label = f"{margs.get('backbone', '?')}+{margs.get('head', '?')}"
        models[_unique(label, models, path.parent.name)] = model
    init = "random" if args.pretrained is None else "pretrained backbone"
    for backbone, head in specs:
        torch.manual_seed(args.seed)
        log.info("building %s:%s (%s init, k=%d)", backbone, head, init, args.kernel_size)
        model = build_segmentation_model(backbone, head, num_classes=args.num_classes, kernel_size=args.kernel_size,
                                         pretrained=args.pretrained)
        models[_unique(f"{backbone}+{head} [{init}]", models)] = model
    return models, first_meta


def _load_images(args: argparse.Namespace, meta: dict[str, Any] | None) -> tuple[list[ImageItem], list[str]]:
    images: list[ImageItem] = []
    names: list[str] = []
    cfg = (meta or {}).get("config", {})
    data = cfg.get("data", {}) if isinstance(cfg, Mapping) else {}
    root, split = args.data_root, args.split or "val"
    if root is None and not args.image and meta is not None:  # the first checkpoint's own validation images
        root, split = data.get("root") or None, args.split or data.get("val_split") or "val"
        if root is None:
            raise UsageError("the checkpoint's run names no data.root; give --data-root VOCDEVKIT or --image PATH")
        log.info("images from the checkpoint's data set: %s (%s)", root, split)
    if root is not None:
        dataset = args.dataset or (meta or {}).get("dataset") or "voc"
        if not Path(root).exists():
            raise UsageError(f"data root {root} does not exist; give --data-root the {dataset} folder "
                             "(e.g. .../VOCdevkit)")
        found, found_names = _split_images(root, split, args.images, dataset, data.get("sbd_root") or None)
        images += found
        names += found_names
    for path in args.image:
        if not path.is_file():
            raise UsageError(f"image {path} does not exist; give --image the path of a JPEG or PNG file")
        images.append(load_image_file(path))
        names.append(path.stem)
    if not images:
        raise UsageError("no images: give --data-root VOCDEVKIT (with --split, --images N) or --image PATH")
    return images, names


def main(argv: Sequence[str] | None = None) -> int:
    from backbone.weights import WeightsMismatchError
    from engine.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    target: Target = args.target
    if target not in ("predicted", "sum"):
        try:
            target = int(target)
        except ValueError:
            print(f"error: --target must be predicted, sum or a class index, got {args.target!r}", file=sys.stderr)
            return 2
    try:
        models, meta = _load_models(args)
        images, names = _load_images(args, meta)
        if args.point is not None:
            for (x, _), name in zip(images, names, strict=True):
                _check_point(args.point, (int(x.shape[-2]), int(x.shape[-1])), f"--point for image {name}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but torch sees no GPU; use --device cpu or auto")
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        record = receptive_field_report(models, images, args.out, args.scales, args.share, device,
                                        points=args.point, target=target, names=names)
    except (UsageError, DatasetError, WeightsMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(record))
    print(f"figure: {record['figure']}")
    print(f"json:   {record['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
