"""The measurement of the valid receptive field (see the package docstring for the method).

One location: ``valid_receptive_field`` (the heat map and its VRF, a ``VRF``) and ``vrf_area``.
Where to look: ``object_centre`` and ``default_point``. At which size: ``scale_input``. Several
models, images and scales: ``compare_receptive_fields``, a ``VRFComparison`` whose ``to_json`` is
the JSON record the tool writes.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segmentation.datasets import IGNORE_INDEX

__all__ = ["CPU", "DEFAULT_SHARE", "Point", "Target", "ImageItem", "VRF", "VRFComparison", "vrf_area", "check_point",
           "valid_receptive_field", "object_centre", "default_point", "scale_input", "compare_receptive_fields"]

log = logging.getLogger("experiments.receptive_field")  # the tool's name in log lines, whichever module logs

CPU = torch.device("cpu")
DEFAULT_SHARE = 0.9
Point = tuple[int, int]
Target = int | str
ImageItem = tuple[torch.Tensor, torch.Tensor | None]  # (normalised 3xHxW float, HxW label or None)


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


def check_point(point: Sequence[int], size: tuple[int, int], what: str = "point") -> Point:
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
    r, c = check_point(point, size)
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
            p, src = check_point(p, size, f"point for {names[i]}"), "given"
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

