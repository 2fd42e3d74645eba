"""Statistics of Table 6: cells as mean ± standard deviation over seeds, and every comparison as a difference
with a confidence interval from a hierarchical, paired bootstrap. Pure functions of numpy arrays.

The input of a comparison is, for each arm (e.g. ResNet50 + Baseline vs ResNet50-GCN + Baseline) and each
seed, the evaluator's per-image counts (``segmentation.evaluate``'s ``.per_image.npz``): ``tp_fp_fn``,
images x classes x 3 (true positives, false positives, false negatives per class). mIoU of any multiset of
images is the IoU of the summed counts averaged over the classes present (in labels or predictions), as
``segmentation.metrics`` computes it for the whole split, so a resample of images needs no inference.

The procedure (:func:`paired_bootstrap`), per replicate:

1. resample the seeds with replacement (the seeds both arms finished, paired by number: seed s of both
   arms saw the same data order and augmentation stream and, for a head comparison, the same pretrained
   backbone; with one seed this level does nothing);
2. resample the validation images with replacement, once for the replicate: the same images for both
   arms and every drawn seed (paired: an image that is hard for one network is hard for the other);
3. the replicate's difference is the mean over the drawn seeds of mIoU(B) - mIoU(A), each mIoU from the
   summed counts of the drawn images.

The interval is the percentile interval of the replicates; the estimate is the same statistic on the
data as observed (mean over seeds of the difference on all images). A comparison is *significant* when
its interval excludes 0. Resampling both levels counts the image-level noise inside each seed's mean
again, which makes the interval slightly wider than the true one (conservative) with few seeds.
Everything draws from one ``numpy.random.Generator`` seeded by the caller: the same inputs and seed give
the same interval.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["miou_from_counts", "image_scores", "Summary", "summarize", "Difference", "paired_bootstrap",
           "format_difference", "verdict"]


def miou_from_counts(counts: np.ndarray) -> np.ndarray:
    """mIoU (fraction) of summed counts ``[..., classes, 3]`` (tp, fp, fn): IoU = tp / (tp + fp + fn) per
    class, averaged over the classes with a non-empty union (0 when none is), over the leading axes."""
    counts = np.asarray(counts, dtype=np.float64)
    tp, union = counts[..., 0], counts.sum(-1)
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), 0.0)
    n = present.sum(-1)
    return np.where(n > 0, iou.sum(-1) / np.maximum(n, 1), 0.0)


def image_scores(tp_fp_fn: np.ndarray) -> np.ndarray:
    """Each image's own mIoU (its classes only): images x classes x 3 -> images. For pictures of where a
    network helps; the comparison's statistic is always computed from counts summed over images."""
    return miou_from_counts(tp_fp_fn)


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof 1; None with fewer than two values) over seeds."""

    mean: float | None
    std: float | None
    n: int

    def format(self, digits: int = 1) -> str:
        """``80.0 ± 1.2 (n=3)``, ``80.0 (n=1)``, or a dash without values."""
        if self.mean is None:
            return "–"
        spread = "" if self.std is None else f" ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}{spread} (n={self.n})"


def summarize(values: Sequence[float | None]) -> Summary:
    """Summary of the values that exist (a missing seed is left out, not counted as 0)."""
    x = np.array([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return Summary(None, None, 0)
    return Summary(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else None, int(x.size))


@dataclass(frozen=True)
class Difference:
    """mIoU(B) - mIoU(A) in points, with its percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    seeds: tuple[int, ...]  # the paired seeds the difference is over
    images: int
    replicates: int
    bootstrap_seed: int  # of the bootstrap's generator

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds), "significant": self.significant}


def _stack(arm: Mapping[int, np.ndarray], seeds: Sequence[int]) -> np.ndarray:
    return np.stack([np.asarray(arm[s], dtype=np.float64) for s in seeds])  # seeds x images x classes x 3


def paired_bootstrap(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray], *, replicates: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> Difference:
    """Difference B - A of mIoU (points) with a hierarchical paired bootstrap interval (module doc).

    ``a`` and ``b`` map a seed to that run's per-image counts (images x classes x 3, the same images in
    the same order in every array). Seeds only one arm has are left out (pairing needs both).
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed finished in both arms (A: {sorted(a)}, B: {sorted(b)})")
    if replicates < 1 or not 0 < confidence < 1:
        raise ValueError(f"need replicates >= 1 and 0 < confidence < 1, got {replicates} and {confidence}")
    xa, xb = _stack(a, seeds), _stack(b, seeds)
    if xa.shape != xb.shape or xa.ndim != 4 or xa.shape[-1] != 3:
        raise ValueError(f"per-image counts differ in shape: A {xa.shape}, B {xb.shape} (seeds x images x classes x 3)")
    n_seeds, n_images = xa.shape[:2]
    if n_images == 0:
        raise ValueError("no validation images to compare")
    estimate = float(np.mean(miou_from_counts(xb.sum(1)) - miou_from_counts(xa.sum(1))))
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(replicates, n_seeds))  # level 1: seeds
    image_weights = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=replicates)  # level 2: images
    w = image_weights.astype(np.float64)

    def replicate_miou(x: np.ndarray) -> np.ndarray:  # replicates x seeds
        flat = x.transpose(1, 0, 2, 3).reshape(n_images, -1)  # images x (seeds * classes * 3)
        sums = (w @ flat).reshape(replicates, n_seeds, *x.shape[2:])
        return miou_from_counts(sums)

    diff = replicate_miou(xb) - replicate_miou(xa)
    deltas = np.take_along_axis(diff, seed_draws, axis=1).mean(1)
    alpha = 1 - confidence
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return Difference(100 * estimate, 100 * float(low), 100 * float(high), confidence, tuple(seeds), n_images,
                      replicates, seed)


def _signed(x: float, digits: int) -> str:
    text = f"{x:+.{digits}f}"
    return text.replace("-", "+", 1) if float(text) == 0 and text.startswith("-") else text  # no "-0.0"


def verdict(d: Difference, better_b: str, better_a: str) -> str:
    """``not significant`` when the interval holds 0, else ``significant (<the better arm> better)``."""
    if not d.significant:
        return "not significant"
    return f"significant ({better_b if d.low > 0 else better_a} better)"  # the side the interval is on


def format_difference(d: Difference, better_b: str, better_a: str, digits: int = 1) -> str:
    """``+0.2 [-0.6, +1.0], not significant``: estimate, interval, verdict."""
    return (f"{_signed(d.estimate, digits)} [{_signed(d.low, digits)}, {_signed(d.high, digits)}], "
            f"{verdict(d, better_b, better_a)}")
