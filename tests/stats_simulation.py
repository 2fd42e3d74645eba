"""Synthetic comparisons with a known true mIoU difference, for the calibration of the comparison's intervals
(tests/test_compare_calibration.py) and the re-measurement of its coverage table.

Each simulated comparison has two arms (A, B) and, per arm and seed, the evaluator's per-image counts
(images x classes x 3: tp, fp, fn), drawn as follows. Each image holds each class with probability 0.4,
with a labelled area of 200-4000 pixels. A run recalls a share ``r`` of a class's pixels in an image
(tp = r * area, fn = the rest, no false positives), where

    r = class base + image difficulty (shared by both arms and every seed: a hard image is hard for both)
        + seed effect (one draw per arm and seed, normal with ``seed_sd``: "2 points per arm")
        + run-image noise (one draw per arm, seed, image and class: what a given run happens to get right)
        + for arm B only: delta + the image's own gain (uniform around 0: B helps some images, hurts others).

The IoU of a class over many images is then the area-weighted mean of ``r``, whose expectation is
``E[r]`` (the area is drawn independently of ``r``), so the true mIoU difference over the population of
images and seeds is exactly ``delta``. The ranges keep ``r`` inside [0, 1] (clipping never binds at these
settings, so it cannot bias the truth).
"""
from __future__ import annotations

import numpy as np

CLASSES = 5
IMAGES = 100  # as the demo's validation split
SEED_EFFECT = 0.02  # "2 points per arm": the standard deviation of one run's mIoU from seed to seed
GAIN_SPREAD = 0.1  # the per-image gain of B is delta +- this (uniform): the image-level noise of the difference


def simulate(rng: np.random.Generator, sims: int, seeds: int, *, delta: float, seed_sd: float,
             images: int = IMAGES, classes: int = CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``sims`` comparisons: A and B, each sims x seeds x images x classes x 3 (int64)."""
    present = rng.random((sims, 1, images, classes)) < 0.4
    area = rng.integers(200, 4000, size=(sims, 1, images, classes)) * present
    base = np.linspace(0.45, 0.6, classes)
    difficulty = rng.uniform(-0.08, 0.08, size=(sims, 1, images, classes))
    gain = delta + rng.uniform(-GAIN_SPREAD, GAIN_SPREAD, size=(sims, 1, images, classes))

    def arm(extra: np.ndarray | float) -> np.ndarray:
        seed_effect = rng.normal(0.0, seed_sd, size=(sims, seeds, 1, 1)) if seed_sd > 0 else 0.0
        noise = rng.uniform(-0.06, 0.06, size=(sims, seeds, images, classes))
        r = np.clip(base + difficulty + seed_effect + noise + extra, 0.0, 1.0)
        tp = np.rint(r * area).astype(np.int64)
        fn = np.broadcast_to(area, tp.shape) - tp
        return np.stack([tp, np.zeros_like(tp), fn], axis=-1)

    return arm(0.0), arm(gain)
