"""Statistics of Table 6: cells as mean ± standard deviation over seeds; every comparison as a difference with
a confidence interval, a p-value, a family-wise correction and a power plan. Pure functions of numpy arrays
(scipy for Student's t distribution).

The input of a comparison is, for each arm (e.g. ResNet50 + Baseline vs ResNet50-GCN + Baseline) and each
seed, the evaluator's per-image counts (``segmentation.evaluate``'s ``.per_image.npz``): ``tp_fp_fn``,
images x classes x 3 (true positives, false positives, false negatives per class). mIoU of any multiset of
images is the IoU of the summed counts averaged over the classes present (in labels or predictions), as
``segmentation.metrics`` computes it for the whole split, so a resample of images needs no inference.

The interval (:func:`paired_difference`) is a paired t interval over the seeds with the validation images'
sampling variance added, each of the two variance components at its own t quantile:

1. **Seed level.** Each seed's difference ``d_s = mIoU(B, s) - mIoU(A, s)`` on all images (seeds paired by
   number: seed s of both arms saw the same data order and, in a head comparison, the same pretrained
   backbone). Seeds that share an independent unit (``units``: in a backbone comparison, the pretraining run
   they started from) are averaged into one unit difference ``D_g`` first. The estimate is the mean of the
   ``G`` unit differences, ``s`` their sample standard deviation (``G - 1`` degrees of freedom).
2. **Image level.** A paired bootstrap over the validation images (the same resample for both arms and every
   seed) gives the covariance of the units' image errors. Its off-diagonal mean ``V`` is the image error the
   units share (every seed is scored on the same images; ``images - 1`` degrees of freedom); the part that
   differs from seed to seed is already in ``s``.
3. **Interval.** ``estimate ± sqrt(t(G - 1)^2 s^2 / G + t(images - 1)^2 V)``, ``t(k)`` the ``1 - alpha / 2``
   quantile of Student's t with k degrees of freedom (12.7 at 2 seeds, 4.3 at 3): Banerjee's interval for a
   sum of independent terms whose variances are estimated separately (Banerjee 1960, Sankhya 22: 357-358),
   which holds at least its confidence whatever the ratio of the two variances. (A single t quantile with
   Welch-Satterthwaite degrees of freedom covered the truth in only 88-90 % of simulated comparisons at 2
   seeds: ``tests/test_compare_calibration.py``.) The p-value is the alpha at which the interval touches 0,
   so "p < alpha" and "the interval excludes 0" agree. With one unit there is no seed level: the interval is
   the image level's alone, ``estimate ± t(images - 1) sqrt(var)``, and says nothing about another seed.

:func:`holm` corrects a family of p-values (Holm 1979); :func:`detectable_difference` and
:func:`seeds_needed` plan the seeds from the observed spread. Everything random draws from one
``numpy.random.Generator`` seeded by the caller: the same inputs and seed give the same interval.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["miou_from_counts", "image_scores", "Summary", "summarize", "Components", "Difference", "paired_difference",
           "t_quantile", "holm", "detectable_difference", "seeds_needed", "verdict", "format_difference",
           "POWER", "MAX_PLANNED_SEEDS", "P_FLOOR"]

POWER = 0.8  # of the seed planner: the chance of detecting a true difference of the planned size
MAX_PLANNED_SEEDS = 1000  # the planner gives up beyond this: only the shared image-level noise is left
P_FLOOR = 1e-15  # p-values below this are reported as 0 (t quantiles at 1 df overflow far below it)


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


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (> 0; ``math.inf``: the normal)."""
    from scipy import special

    return float(special.stdtrit(df, p))


@dataclass(frozen=True)
class Components:
    """The two variance components of a difference, in points^2: ``seed_var`` (the variance of the unit
    differences; 0 with one unit) over ``units`` units (``units - 1`` degrees of freedom), and ``image_var`` (the
    variance of the image error all units share) over ``images`` images (``images - 1``)."""

    seed_var: float
    units: int
    image_var: float
    images: int

    def half_width(self, alpha: float) -> float:
        """Banerjee's half-width at two-sided level ``alpha`` (module doc)."""
        g = self.units
        # -t(alpha / 2) = t(1 - alpha / 2), without 1 - alpha / 2 rounding to 1 at the tiny alphas of a p-value
        seed = t_quantile(alpha / 2, g - 1) ** 2 * self.seed_var / g if g > 1 and self.seed_var > 0 else 0.0
        image = t_quantile(alpha / 2, max(self.images - 1, 1)) ** 2 * self.image_var if self.image_var > 0 else 0.0
        return math.sqrt(seed + image)

    def se(self) -> float:
        """The standard error of the estimate (points)."""
        return math.sqrt(self.seed_var / self.units + self.image_var)

    def p_value(self, estimate: float) -> float:
        """The smallest two-sided level alpha at which the interval excludes 0: 1 for a zero estimate, 0 below
        ``P_FLOOR`` (and for a nonzero estimate without any variance)."""
        from scipy.optimize import brentq

        if estimate == 0:
            return 1.0
        if self.seed_var <= 0 and self.image_var <= 0:
            return 0.0

        def gap(log_alpha: float) -> float:  # the half-width falls as alpha grows, to 0 at alpha = 1
            return self.half_width(math.exp(log_alpha)) - abs(estimate)

        if gap(math.log(P_FLOOR)) <= 0:
            return 0.0
        return math.exp(brentq(gap, math.log(P_FLOOR), 0.0, xtol=1e-10))


@dataclass(frozen=True)
class Difference:
    """mIoU(B) - mIoU(A) in points, with its interval, its spread at each level and a two-sided p-value
    (of this comparison alone: :func:`holm` corrects a family)."""

    estimate: float
    low: float
    high: float
    confidence: float
    seeds: tuple[int, ...]  # the paired seeds the difference is over
    units: int  # independent units the seed level is over (the seeds, or the pretraining runs they share)
    images: int
    seed_sd: float | None  # sample standard deviation of the unit differences (points); None with one unit
    image_se: float  # image-level standard error (points): the part the units share, or all of it with one unit
    p_value: float
    replicates: int  # of the image bootstrap
    bootstrap_seed: int  # of its generator

    @property
    def components(self) -> Components:
        return Components((self.seed_sd or 0.0) ** 2, self.units, self.image_se ** 2, self.images)

    @property
    def excludes_zero(self) -> bool:
        """The interval of this comparison alone lies on one side of 0 (before any family correction)."""
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds), "se": round(self.components.se(), 6),
                "excludes_zero": self.excludes_zero}


def _stack(arm: Mapping[int, np.ndarray], seeds: Sequence[int]) -> np.ndarray:
    return np.stack([np.asarray(arm[s], dtype=np.float64) for s in seeds])  # seeds x images x classes x 3


def _unit_matrix(seeds: Sequence[int], units: Mapping[int, int] | None) -> np.ndarray:
    """G x seeds: row g averages the seeds of unit g (each seed its own unit without ``units``)."""
    keys = np.array([s if units is None else units[s] for s in seeds])
    m = (np.unique(keys)[:, None] == keys[None, :]).astype(np.float64)
    return m / m.sum(1, keepdims=True)


def _bootstrap_weights(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """replicates x n: how often each of n items is drawn in each resample of n with replacement."""
    draws = rng.integers(0, n, size=(replicates, n)) + n * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


def paired_difference(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray], *,
                      units: Mapping[int, int] | None = None, replicates: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> Difference:
    """Difference B - A of mIoU (points) with its interval over seeds and images (module doc).

    ``a`` and ``b`` map a seed to that run's per-image counts (images x classes x 3, the same images in
    the same order in every array). Seeds only one arm has are left out (pairing needs both). ``units``
    maps each seed to its independent unit (e.g. the pretraining seed it started from); without it every
    seed is its own unit.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed finished in both arms (A: {sorted(a)}, B: {sorted(b)})")
    if replicates < 2 or not 0 < confidence < 1:
        raise ValueError(f"need replicates >= 2 and 0 < confidence < 1, got {replicates} and {confidence}")
    if units is not None and not set(seeds) <= set(units):
        raise ValueError(f"seeds {sorted(set(seeds) - set(units))} have no unit")
    xa, xb = _stack(a, seeds), _stack(b, seeds)
    if xa.shape != xb.shape or xa.ndim != 4 or xa.shape[-1] != 3:
        raise ValueError(f"per-image counts differ in shape: A {xa.shape}, B {xb.shape} (seeds x images x classes x 3)")
    n_seeds, n_images = xa.shape[:2]
    if n_images == 0:
        raise ValueError("no validation images to compare")
    to_units = _unit_matrix(seeds, units)
    n_units = to_units.shape[0]
    unit_diffs = to_units @ (miou_from_counts(xb.sum(1)) - miou_from_counts(xa.sum(1)))  # G
    estimate = float(unit_diffs.mean())

    # the image level: one bootstrap resample of the images for both arms and every seed
    w = _bootstrap_weights(np.random.default_rng(seed), replicates, n_images)

    def replicate_miou(x: np.ndarray) -> np.ndarray:  # replicates x seeds
        flat = x.transpose(1, 0, 2, 3).reshape(n_images, -1)  # images x (seeds * classes * 3)
        # einsum, not w @ flat: a multi-threaded BLAS on these small products stalls on a busy machine (30x)
        return miou_from_counts(np.einsum("ri,ic->rc", w, flat).reshape(replicates, n_seeds, *x.shape[2:]))

    boot = (replicate_miou(xb) - replicate_miou(xa)) @ to_units.T  # replicates x G
    cov = np.atleast_2d(np.cov(boot, rowvar=False))
    if n_units == 1:
        seed_var, image_var = 0.0, float(cov[0, 0])
    else:  # the image error the units share (the mean covariance between two units); the rest is in their spread
        seed_var = float(unit_diffs.var(ddof=1))
        image_var = max(0.0, float((cov.sum() - np.trace(cov)) / (n_units * (n_units - 1))))
    parts = Components(1e4 * seed_var, n_units, 1e4 * image_var, n_images)  # points^2
    half = parts.half_width(1 - confidence)
    est = 100 * estimate
    return Difference(est, est - half, est + half, confidence, tuple(seeds), n_units, n_images,
                      math.sqrt(parts.seed_var) if n_units > 1 else None, math.sqrt(parts.image_var),
                      parts.p_value(est), replicates, seed)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979, Scand. J. Statist. 6: 65-70): a comparison is
    significant at family-wise level alpha when its adjusted p-value is below alpha. The chance of any false
    "significant" in the family stays at most alpha, whatever the dependence between the comparisons."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def detectable_difference(parts: Components, alpha: float, units: int | None = None, power: float = POWER) -> float:
    """The smallest true difference a comparison over ``units`` units (default: the observed number) calls
    significant at two-sided level ``alpha`` with probability ``power``, given the observed components.

    Each component's share is the usual power formula ``(t(1 - alpha / 2, df) + t(power, df)) * se`` with its
    own degrees of freedom, combined as Banerjee's interval combines them; with one unit (no seed spread
    known) only the image level."""
    g = parts.units if units is None else units
    if g < 1:
        raise ValueError(f"need at least one unit, got {g}")

    def share(df: float) -> float:
        return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) ** 2

    seed = share(g - 1) * parts.seed_var / g if g > 1 else 0.0
    return math.sqrt(seed + share(max(parts.images - 1, 1)) * parts.image_var)


def seeds_needed(delta: float, parts: Components, alpha: float, power: float = POWER,
                 max_units: int = MAX_PLANNED_SEEDS) -> int | None:
    """The fewest units (>= 2) whose :func:`detectable_difference` is at most ``|delta|``; None when even
    ``max_units`` are not enough (the image-level error, which every seed shares, is then too large: more
    validation images, not more seeds, would help)."""
    delta = abs(delta)
    if detectable_difference(parts, alpha, max_units, power) > delta:
        return None
    lo, hi = 2, max_units  # the detectable difference falls as units grow: bisect for the first that reaches delta
    while lo < hi:
        mid = (lo + hi) // 2
        if detectable_difference(parts, alpha, mid, power) <= delta:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _signed(x: float, digits: int) -> str:
    text = f"{x:+.{digits}f}"
    return text.replace("-", "+", 1) if float(text) == 0 and text.startswith("-") else text  # no "-0.0"


def verdict(significant: bool, estimate: float, better_b: str, better_a: str, scope: str = "") -> str:
    """``not significant``, or ``significant (<the better arm> better)`` on the side of the estimate; with a
    ``scope`` (what the verdict cannot speak for), ``...; <scope>``."""
    text = f"significant ({better_b if estimate > 0 else better_a} better)" if significant else "not significant"
    return f"{text}; {scope}" if scope else text


def format_difference(estimate: float, low: float, high: float, verdict_text: str, digits: int = 1) -> str:
    """``+0.2 [-0.6, +1.0], not significant``: estimate, interval, verdict."""
    return f"{_signed(estimate, digits)} [{_signed(low, digits)}, {_signed(high, digits)}], {verdict_text}"
