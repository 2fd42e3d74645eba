"""Segmentation scores: confusion-matrix mIoU, per-class IoU, pixel accuracy, boundary/internal accuracy.

mIoU is computed the standard way (PASCAL VOC devkit, Cityscapes scripts): one confusion matrix is
accumulated over every labelled pixel of the whole set, void (255) excluded, and IoU_c =
TP_c / (TP_c + FP_c + FN_c) is taken from it at the end (not averaged per image). Classes that never
occur in the labels nor in the predictions have no IoU and are left out of the mean.

Boundary vs internal accuracy (the paper's Table 5). The paper does not define the band; we use:

    a labelled (non-void) pixel p is a *boundary* pixel when some pixel q with
    max(|p_row - q_row|, |p_col - q_col|) <= w (its (2w+1) x (2w+1) window, cut at the image border)
    carries another label than p; every other labelled pixel is *internal*. Void pixels are scored in
    neither. By default a void neighbour counts as "another label": PASCAL VOC draws a ~5 px void band
    along every object contour, so with void ignored the pixels right beside an object would look
    internal. ``void_is_boundary=False`` gives the variant in which only labelled neighbours count.

Boundary (internal) accuracy is the share of boundary (internal) pixels predicted correctly, over
the whole set. The default band is w = 5 pixels at the label's resolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .datasets import IGNORE_INDEX

__all__ = ["confusion_matrix", "scores_from_confusion", "boundary_mask", "SegmentationMetrics", "format_table"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts, rows = ground truth, columns = prediction."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"label values {int(t.min())}..{int(t.max())} outside 0..{num_classes - 1} (and 255)")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores_from_confusion(conf: torch.Tensor) -> dict[str, Any]:
    """mIoU, per-class IoU (None where a class is absent from labels and predictions), accuracies."""
    conf = conf.double()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.zeros_like(tp))
    total = conf.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "per_class_iou": [float(v) if ok else None for v, ok in zip(iou, present, strict=True)],
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "mean_class_acc": float(acc[gt > 0].mean()) if (gt > 0).any() else 0.0,
        "pixels": int(total),
    }


def boundary_mask(target: torch.Tensor, width: int = 5, ignore_index: int = IGNORE_INDEX,
                  void_is_boundary: bool = True) -> torch.Tensor:
    """Boolean mask of the boundary pixels of label map(s) ``target`` (H x W or N x H x W); see module doc.

    Computed with a max- and a min-pool over the window: a pixel's window holds another label exactly
    when the window's largest or smallest label differs from its own.
    """
    if width < 0:
        raise ValueError(f"boundary width must be >= 0, got {width}")
    t = target.long()
    squeeze = t.ndim == 2
    if squeeze:
        t = t[None]
    void = t == ignore_index
    x = t[:, None].float()
    k = 2 * width + 1
    if void_is_boundary:
        hi = F.max_pool2d(x, k, stride=1, padding=width)
        lo = -F.max_pool2d(-x, k, stride=1, padding=width)
    else:  # void must not win the max nor the min: replace it by -1 / a value above any class
        hi = F.max_pool2d(x.masked_fill(void[:, None], -1.0), k, stride=1, padding=width)
        lo = -F.max_pool2d(-x.masked_fill(void[:, None], float(ignore_index) + 1), k, stride=1, padding=width)
    mask = ((hi[:, 0] != x[:, 0]) | (lo[:, 0] != x[:, 0])) & ~void
    return mask[0] if squeeze else mask


class SegmentationMetrics:
    """Accumulates a confusion matrix and boundary/internal hit counts over a data set."""

    def __init__(self, num_classes: int, boundary_width: int = 5, ignore_index: int = IGNORE_INDEX,
                 device: torch.device | str = "cpu"):
        self.num_classes, self.boundary_width, self.ignore_index = num_classes, boundary_width, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        # boundary correct, boundary total, internal correct, internal total
        self.band = torch.zeros(4, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add prediction(s) ``pred`` (class indices) against label(s) ``target``, same shape; returns what
        they added: their confusion matrix and (boundary correct, boundary, internal correct, internal)."""
        pred, target = pred.to(self.confusion.device), target.to(self.confusion.device)
        confusion = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        boundary = boundary_mask(target, self.boundary_width, self.ignore_index)
        labelled = target != self.ignore_index
        internal = labelled & ~boundary
        correct = pred == target
        band = torch.stack([(correct & boundary).sum(), boundary.sum(), (correct & internal).sum(), internal.sum()])
        self.confusion += confusion
        self.band += band
        return confusion, band

    def all_reduce(self) -> None:
        """Sum the counts over the ranks of a process group (no-op without one)."""
        from engine import distributed as distrib

        distrib.all_reduce_sum(self.confusion)
        distrib.all_reduce_sum(self.band)

    def compute(self) -> dict[str, Any]:
        scores = scores_from_confusion(self.confusion.cpu())
        bc, bt, ic, it = (int(v) for v in self.band.cpu())
        scores.update(boundary_acc=bc / bt if bt else 0.0, internal_acc=ic / it if it else 0.0,
                      boundary_pixels=bt, internal_pixels=it, boundary_width=self.boundary_width)
        return scores


def format_table(scores: dict[str, Any], class_names: Sequence[str]) -> str:
    """Per-class IoU table plus the summary figures, as printed by the evaluator."""
    width = max(max(len(n) for n in class_names), len("boundary acc. (w=00)"))
    lines = [f"{'class':<{width}}  IoU (%)", f"{'-' * width}  -------"]
    for name, iou in zip(class_names, scores["per_class_iou"], strict=True):
        lines.append(f"{name:<{width}}  {'   n/a' if iou is None else f'{100 * iou:6.2f}'}")
    lines.append(f"{'-' * width}  -------")
    lines.append(f"{'mIoU':<{width}}  {100 * scores['miou']:6.2f}")
    lines.append(f"{'pixel acc.':<{width}}  {100 * scores['pixel_acc']:6.2f}")
    if "boundary_acc" in scores:
        w = scores["boundary_width"]
        lines.append(f"{f'boundary acc. (w={w})':<{width}}  {100 * scores['boundary_acc']:6.2f}")
        lines.append(f"{'internal acc.':<{width}}  {100 * scores['internal_acc']:6.2f}")
    return "\n".join(lines)
