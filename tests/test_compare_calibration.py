"""Calibration of the comparison's statistics against simulated comparisons with a known truth
(tests/stats_simulation.py): the 95 % interval covers the true mIoU difference, the false-positive rate at a
true difference of 0 stays near 5 %, at 2, 3, 5 and 10 seeds, with and without a seed-to-seed effect; and at
the number of seeds the planner gives for a difference, that difference is detected about 80 % of the time.

Each regime draws 200 comparisons per true difference from a fixed generator seed. The image bootstrap runs
200 replicates here rather than the default 2000, to keep this to seconds: fewer replicates make the image
level's variance noisier, which can only lower the coverage measured here.
"""
from __future__ import annotations

import numpy as np
import pytest
from stats_simulation import SEED_EFFECT, simulate

from experiments.compare.stats import Components, Difference, detectable_difference, paired_difference, seeds_needed

SIMULATIONS = 200  # comparisons per regime and true difference
REPLICATES = 200
TRUE_DIFFERENCE = 0.02  # +2.0 mIoU points, as in the measurement


def interval(a: np.ndarray, b: np.ndarray, i: int) -> Difference:
    """The comparison's interval for simulated comparison ``i`` (seeds x images x classes x 3 per arm)."""
    seeds = range(a.shape[0])
    return paired_difference({s: a[s] for s in seeds}, {s: b[s] for s in seeds}, replicates=REPLICATES, seed=i)


def measure(rng: np.random.Generator, seeds: int, seed_sd: float, delta: float) -> tuple[float, float]:
    """(share of intervals holding the true difference, share of comparisons whose interval excludes 0)."""
    a, b = simulate(rng, SIMULATIONS, seeds, delta=delta, seed_sd=seed_sd)
    found = [interval(a[i], b[i], i) for i in range(SIMULATIONS)]
    covered = np.mean([d.low <= 100 * delta <= d.high for d in found])
    return float(covered), float(np.mean([d.excludes_zero for d in found]))


@pytest.mark.parametrize("seed_sd", [SEED_EFFECT, 0.0], ids=["seed effect 2 points per arm", "no seed effect"])
@pytest.mark.parametrize("seeds", [2, 3, 5, 10])
def test_the_95_percent_interval_covers_the_true_difference(seeds: int, seed_sd: float) -> None:
    rng = np.random.default_rng([seeds, round(1000 * seed_sd)])
    coverage, _ = measure(rng, seeds, seed_sd, TRUE_DIFFERENCE)
    coverage_at_zero, false_positives = measure(rng, seeds, seed_sd, 0.0)
    assert coverage >= 0.90, f"+2 points: the interval held the truth in {coverage:.1%} of {SIMULATIONS}"
    assert coverage_at_zero >= 0.90, f"0 points: held the truth in {coverage_at_zero:.1%}"
    assert false_positives <= 0.10, f"true difference 0 called significant in {false_positives:.1%}"


def _observed_components(rng: np.random.Generator, seed_sd: float) -> Components:
    """The simulation's seed-to-seed and image-level variances, pooled over 100 comparisons of 5 seeds each
    (what the planner would see, without the noise of one small pilot)."""
    a, b = simulate(rng, 100, 5, delta=0.0, seed_sd=seed_sd)
    found = [interval(a[i], b[i], i) for i in range(100)]
    return Components(float(np.mean([d.seed_sd ** 2 for d in found])), 5,
                      float(np.mean([d.image_se ** 2 for d in found])), found[0].images)


@pytest.mark.parametrize("seed_sd", [SEED_EFFECT, 0.0], ids=["seed effect 2 points per arm", "no seed effect"])
@pytest.mark.parametrize("seeds", [3, 5])
def test_at_the_planned_seeds_the_difference_is_detected_about_80_percent_of_the_time(seeds: int,
                                                                                      seed_sd: float) -> None:
    rng = np.random.default_rng([7, seeds, round(1000 * seed_sd)])
    parts = _observed_components(rng, seed_sd)
    delta = detectable_difference(parts, 0.05, units=seeds)  # points
    assert seeds_needed(delta, parts, 0.05) == seeds  # the planner asks for these seeds for this difference
    a, b = simulate(rng, 300, seeds, delta=delta / 100, seed_sd=seed_sd)
    detected = np.mean([interval(a[i], b[i], i).low > 0 for i in range(300)])
    assert 0.70 <= detected <= 0.90, f"{delta:.2f} points at {seeds} seeds: detected in {detected:.1%}, not ~80 %"
