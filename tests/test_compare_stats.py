"""Table 6's statistics (experiments.compare.stats): mIoU from per-image counts, the interval of a difference
against hand-computed and scipy-computed cases at each level (seeds, pretraining units, images), its
confidence, its p-value, Holm's correction, the seed planner's formulas, aggregation over seeds with a missing
one, and the verdict's wording. Pure numpy (scipy for reference values): no training, no files. The
calibration against simulated comparisons with a known truth is in test_compare_calibration.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from experiments.compare.collect import aggregate, comparison_pairs
from experiments.compare.stats import (
    Components,
    detectable_difference,
    format_difference,
    holm,
    image_scores,
    miou_from_counts,
    paired_difference,
    seeds_needed,
    summarize,
    t_quantile,
    verdict,
)


def counts(*images: list[tuple[int, int, int]]) -> np.ndarray:
    """images x classes x 3 (tp, fp, fn) from one list of per-class triples per image."""
    return np.array(images, dtype=np.int64)


def test_miou_from_counts_averages_the_classes_present_only() -> None:
    # class 0: IoU 2 / (2 + 1 + 1) = 0.5; class 1 absent from labels and predictions; class 2: 1 / 4 = 0.25
    assert miou_from_counts(np.array([[2, 1, 1], [0, 0, 0], [1, 0, 3]])) == pytest.approx(0.375)
    # leading axes are batches; a batch with no class at all scores 0 (as segmentation.metrics does)
    batch = np.array([[[2, 1, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    assert miou_from_counts(batch).tolist() == [0.5, 0.0]


def test_miou_of_summed_counts_equals_the_evaluator_on_the_whole_split() -> None:
    import torch

    from segmentation.metrics import SegmentationMetrics

    rng = np.random.default_rng(0)
    metrics, per_image = SegmentationMetrics(4, boundary_width=0), []
    for _ in range(6):
        label, pred = (torch.as_tensor(rng.integers(0, 4, size=(9, 7))) for _ in range(2))
        confusion, _ = metrics.update(pred, label)
        tp = confusion.diag()
        per_image.append(torch.stack([tp, confusion.sum(0) - tp, confusion.sum(1) - tp], 1).numpy())
    assert miou_from_counts(np.sum(per_image, axis=0)) == pytest.approx(metrics.compute()["miou"])


def _same_images(iou_pairs: list[tuple[int, int, int, int]], images: int = 3) -> tuple[dict, dict]:
    """Per seed, ``images`` identical images of one class: A scores tp_a / (tp_a + fp_a), B tp_b / (tp_b + fp_b).
    Every bootstrap resample of identical images gives the same mIoU: the image level is exactly 0."""
    a = {s: counts(*[[(ta, fa, 0)]] * images) for s, (ta, fa, _, _) in enumerate(iou_pairs)}
    b = {s: counts(*[[(tb, fb, 0)]] * images) for s, (_, _, tb, fb) in enumerate(iou_pairs)}
    return a, b


def test_seed_level_is_the_paired_t_interval_of_the_seed_differences() -> None:
    # seed 0: A 1/2, B 1 -> +50 points; seed 1: A 9/10, B 1 -> +10; seed 2: A 1/2, B 4/5 -> +30
    a, b = _same_images([(1, 1, 4, 0), (9, 1, 5, 0), (1, 1, 4, 1)])
    d = paired_difference(a, b, replicates=500, seed=2)
    diffs = [50.0, 10.0, 30.0]
    low, high = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)  # the textbook paired t interval, df 2
    assert d.estimate == pytest.approx(30.0) and (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    assert d.seed_sd == pytest.approx(20.0) and d.image_se == 0.0 and d.units == 3 and d.seeds == (0, 1, 2)
    assert d.p_value == pytest.approx(sps.ttest_1samp(diffs, 0.0).pvalue)
    # by hand: 30 ± t(0.975, 2) * 20 / sqrt(3) = 30 ± 4.303 * 11.547
    assert d.high - d.estimate == pytest.approx(4.302653 * 20 / math.sqrt(3), rel=1e-5)


def test_two_seeds_that_agree_by_chance_are_not_enough() -> None:
    # +50 and +10 points: the old percentile bootstrap gave [+10, +50], "significant"; one degree of freedom
    # makes the quantile 12.7 and the interval 30 ± 12.7 * 20
    a, b = _same_images([(1, 1, 4, 0), (9, 1, 5, 0)])
    d = paired_difference(a, b, replicates=500, seed=2)
    assert (d.low, d.high) == (pytest.approx(30 - 12.7062 * 20, rel=1e-4), pytest.approx(30 + 12.7062 * 20, rel=1e-4))
    assert not d.excludes_zero


def test_seeds_of_one_pretraining_are_one_unit() -> None:
    # fine-tune seeds 0, 1 from pretraining 0 (+50, +30 -> +40), seeds 2, 3 from pretraining 1 (+10, +30 -> +20):
    # two units, +40 and +20: 30 ± t(0.975, 1) * sd(40, 20) / sqrt(2)
    a, b = _same_images([(1, 1, 4, 0), (1, 1, 4, 1), (9, 1, 5, 0), (1, 1, 4, 1)])
    d = paired_difference(a, b, units={0: 0, 1: 0, 2: 1, 3: 1}, replicates=500, seed=0)
    low, high = sps.ttest_1samp([40.0, 20.0], 0.0).confidence_interval(0.95)
    assert d.units == 2 and d.seeds == (0, 1, 2, 3) and d.estimate == pytest.approx(30.0)
    assert (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    with pytest.raises(ValueError, match=r"seeds \[3\] have no unit"):
        paired_difference(a, b, units={0: 0, 1: 0, 2: 1})


# Two validation images, one class scored (class 1 never occurs: it must not count), one seed.
#   image x: A tp 1 fp 1 fn 0 (IoU 1/2), B tp 2 (IoU 1);   image y: A tp 3 fn 1 (3/4), B tp 2 fp 1 fn 1 (1/2)
# Resamples of the two images: {x, x} w.p. 1/4: A 2/4, B 4/4 -> +50 points; {y, y} w.p. 1/4: A 6/8, B 4/8 ->
# -25 points; {x, y} w.p. 1/2: A 4/6, B 4/6 -> 0. The bootstrap variance: 2500/4 + 625/4 - (50/4 - 25/4)^2
# = 742.19 points^2; the estimate (all images, as observed): 0.
A_ONE = counts([(1, 1, 0), (0, 0, 0)], [(3, 0, 1), (0, 0, 0)])
B_ONE = counts([(2, 0, 0), (0, 0, 0)], [(2, 1, 1), (0, 0, 0)])


def test_one_seed_has_the_image_level_only() -> None:
    d = paired_difference({0: A_ONE}, {0: B_ONE}, replicates=20000, seed=1)
    assert d.estimate == pytest.approx(0.0) and d.seed_sd is None and d.units == 1 and d.images == 2
    assert d.image_se == pytest.approx(math.sqrt(742.1875), rel=0.03)
    # images - 1 = 1 degree of freedom
    assert d.high == pytest.approx(t_quantile(0.975, 1) * d.image_se) and d.low == pytest.approx(-d.high)
    assert not d.excludes_zero and d.p_value == 1.0


def test_images_are_paired_across_the_arms() -> None:
    # image x is hard for both networks, y easy for both; B is better on each. Paired resamples:
    #   {x, x}: A 2/8, B 4/8 -> +25;  {y, y}: A 18/20, B 20/20 -> +10;  {x, y}: A 10/14, B 12/14 -> +14.29,
    # w.p. 1/4, 1/4, 1/2: variance 30.71 points^2. Resampling the arms' images independently would pair A's
    # easy images with B's hard ones (A {y, y} .9 vs B {x, x} .5: -40 points) and give a far larger one.
    a = counts([(1, 3, 0)], [(9, 1, 0)])
    b = counts([(2, 2, 0)], [(10, 0, 0)])
    d = paired_difference({0: a}, {0: b}, replicates=20000, seed=3)
    values, weights = np.array([25.0, 10.0, 100 / 7]), np.array([0.25, 0.25, 0.5])
    exact = float(weights @ values ** 2 - (weights @ values) ** 2)
    assert d.image_se == pytest.approx(math.sqrt(exact), rel=0.03)


def test_image_error_every_seed_shares_is_counted_once() -> None:
    # two seeds with the very same counts: no spread between them, and the image error is the same draw for
    # both, so the interval is the one seed's: it must not shrink by sqrt(2) (the image error does not average
    # out over seeds scored on the same images) nor grow (it is not counted twice)
    rng = np.random.default_rng(5)
    a, b = rng.integers(1, 50, size=(30, 4, 3)), rng.integers(1, 50, size=(30, 4, 3))
    one = paired_difference({0: a}, {0: b}, replicates=3000, seed=9)
    two = paired_difference({0: a, 1: a}, {0: b, 1: b}, replicates=3000, seed=9)
    assert two.seed_sd == 0.0 and two.image_se == pytest.approx(one.image_se)
    assert (two.low, two.high) == (pytest.approx(one.low), pytest.approx(one.high))


def test_image_error_that_differs_between_seeds_is_left_to_the_seed_spread() -> None:
    # seeds whose image-level errors are independent (each scored on other counts): they share almost none of
    # it, so the shared part V is far below each seed's own image variance, which the seeds' spread holds
    rng = np.random.default_rng(6)
    a = {s: rng.integers(1, 50, size=(60, 4, 3)) for s in range(4)}
    b = {s: rng.integers(1, 50, size=(60, 4, 3)) for s in range(4)}
    own = [paired_difference({s: a[s]}, {s: b[s]}, replicates=2000, seed=3).image_se for s in range(4)]
    shared = paired_difference(a, b, replicates=2000, seed=3).image_se
    assert shared < 0.35 * min(own)


def test_seeds_are_paired_by_number_across_the_arms() -> None:
    # seed 0: A 1/2, B 3/5 -> +10;  seed 1: A 9/10, B 1 -> +10. Paired by seed every seed says +10 and the
    # interval has no width; unpaired, A's good seed against B's bad one would give -30.
    a = {0: counts([(1, 1, 0)], [(1, 1, 0)]), 1: counts([(9, 1, 0)], [(9, 1, 0)])}
    b = {0: counts([(3, 2, 0)], [(3, 2, 0)]), 1: counts([(5, 0, 0)], [(5, 0, 0)])}
    d = paired_difference(a, b, replicates=1000, seed=4)
    assert (d.estimate, d.low, d.high) == (pytest.approx(10.0), pytest.approx(10.0), pytest.approx(10.0))
    assert d.p_value < 1e-12 and d.excludes_zero


def _random_arms(seeds: list[int], images: int = 40, classes: int = 5) -> tuple[dict, dict]:
    rng = np.random.default_rng(7)
    a = {s: rng.integers(0, 50, size=(images, classes, 3)) for s in seeds}
    b = {s: rng.integers(0, 50, size=(images, classes, 3)) for s in seeds}
    return a, b


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_confidence_sets_the_t_quantile_at_alpha_over_two(seeds: list[int]) -> None:
    """90 % and 95 % give different intervals, each the t quantile at 1 - alpha / 2 of its level: a break that
    uses alpha (or the 95 % quantile for both) fails here."""
    a, b = _random_arms(seeds)
    d95 = paired_difference(a, b, replicates=500, seed=1, confidence=0.95)
    d90 = paired_difference(a, b, replicates=500, seed=1, confidence=0.90)
    assert d90.estimate == d95.estimate and d90.high - d90.low < d95.high - d95.low
    parts = d95.components
    for d, level in ((d95, 0.95), (d90, 0.90)):
        q = 1 - (1 - level) / 2
        seed_part = sps.t.ppf(q, len(seeds) - 1) ** 2 * parts.seed_var / len(seeds) if len(seeds) > 1 else 0.0
        half = math.sqrt(seed_part + sps.t.ppf(q, 40 - 1) ** 2 * parts.image_var)
        assert (d.low, d.high) == (pytest.approx(d.estimate - half), pytest.approx(d.estimate + half))


def test_the_p_value_is_the_level_at_which_the_interval_touches_zero() -> None:
    a, b = _random_arms([0, 1, 2])
    d = paired_difference(a, b, replicates=500, seed=1)
    assert 0 < d.p_value < 1
    edge = paired_difference(a, b, replicates=500, seed=1, confidence=1 - d.p_value)
    assert min(abs(edge.low), abs(edge.high)) == pytest.approx(0.0, abs=1e-6)
    assert d.excludes_zero == (d.p_value < 0.05)


def test_interval_is_reproducible_from_its_seed() -> None:
    a, b = _random_arms([0, 1, 2])
    first = paired_difference(a, b, replicates=500, seed=11)
    assert paired_difference(a, b, replicates=500, seed=11) == first  # bit for bit
    other = paired_difference(a, b, replicates=500, seed=12)
    assert other.estimate == first.estimate and (other.low, other.high) != (first.low, first.high)
    assert first.low < first.estimate < first.high and first.bootstrap_seed == 11


def test_interval_pairs_seeds_and_leaves_out_those_one_arm_lacks() -> None:
    a, b = _random_arms([0, 1, 2])
    del b[1]
    d = paired_difference(a, b, replicates=200, seed=0)
    assert d.seeds == (0, 2)
    expected = np.mean([miou_from_counts(b[s].sum(0)) - miou_from_counts(a[s].sum(0)) for s in (0, 2)])
    assert d.estimate == pytest.approx(100 * expected)
    with pytest.raises(ValueError, match="no seed finished in both arms"):
        paired_difference({0: a[0]}, {1: b[2]})
    with pytest.raises(ValueError, match="differ in shape"):
        paired_difference({0: a[0]}, {0: b[0][:-1]})  # not the same images


def test_holm_adjusts_step_down_in_the_original_order() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([0.2]) == [0.2] and holm([]) == []


def test_detectable_difference_is_the_power_formula_and_seeds_needed_inverts_it() -> None:
    seed_only = Components(seed_var=4.0, units=3, image_var=0.0, images=100)
    for n in (2, 3, 10):  # no image error: (t(1 - alpha/2, n - 1) + t(power, n - 1)) * s / sqrt(n)
        expected = (sps.t.ppf(0.975, n - 1) + sps.t.ppf(0.8, n - 1)) * 2.0 / math.sqrt(n)
        assert detectable_difference(seed_only, 0.05, units=n) == pytest.approx(expected)
    assert detectable_difference(seed_only, 0.05) == detectable_difference(seed_only, 0.05, units=3)
    image_only = Components(seed_var=0.0, units=1, image_var=1.0, images=1_000_000)
    assert detectable_difference(image_only, 0.05) == pytest.approx(sps.norm.ppf(0.975) + sps.norm.ppf(0.8), rel=1e-4)
    parts = Components(seed_var=9.0, units=3, image_var=0.25, images=100)
    for delta in (2.0, 5.5, 20.0):
        n = seeds_needed(delta, parts, 0.05)
        assert detectable_difference(parts, 0.05, units=n) <= delta
        assert n == 2 or detectable_difference(parts, 0.05, units=n - 1) > delta
    # below what the shared image error allows, no number of seeds is enough
    assert seeds_needed(0.5, parts, 0.05) is None and seeds_needed(-5.5, parts, 0.05) == seeds_needed(5.5, parts, 0.05)


@pytest.mark.parametrize("estimate, low, high, significant, scope, text", [
    (0.2, -0.6, 1.0, False, "", "+0.2 [-0.6, +1.0], not significant"),
    (3.14, 1.2, 5.04, True, "", "+3.1 [+1.2, +5.0], significant (ResNet50-GCN better)"),
    (-2.0, -3.5, -0.4, True, "this pretraining only",
     "-2.0 [-3.5, -0.4], significant (ResNet50 better); this pretraining only"),
    (-2.0, -3.5, -0.4, False, "", "-2.0 [-3.5, -0.4], not significant"),  # excludes 0, but not after correction
    (-0.04, -0.9, 0.0, False, "this seed only", "+0.0 [-0.9, +0.0], not significant; this seed only"),  # no "-0.0"
])
def test_verdict_wording(estimate: float, low: float, high: float, significant: bool, scope: str, text: str) -> None:
    assert format_difference(estimate, low, high, verdict(significant, estimate, "ResNet50-GCN", "ResNet50", scope)) \
        == text


def test_summary_over_seeds_and_aggregation_with_a_missing_seed() -> None:
    assert summarize([80.0, None, 82.0]).format() == "81.0 ± 1.4 (n=2)"
    assert summarize([80.0]).format() == "80.0 (n=1)" and summarize([None]).format() == "–"
    cell = aggregate({0: {"miou": 80.0, "pixel_acc": 95.0}, 1: None, 2: {"miou": 82.0, "pixel_acc": 97.0}},
                     ["miou", "pixel_acc"])
    assert cell["miou"] == 81.0 and cell["std"]["miou"] == pytest.approx(1.41) and cell["n"] == 2
    assert cell["seeds"] == [0, 2] and cell["missing_seeds"] == [1] and set(cell["runs"]) == {"0", "2"}
    assert aggregate({0: None, 1: None}, ["miou"]) is None


def test_comparisons_are_the_papers() -> None:
    pairs = comparison_pairs(["resnet50", "resnet50_gcn"], ["baseline", "gcn_br"])
    assert [(p["a"], p["b"]) for p in pairs] == [
        ("resnet50+baseline", "resnet50_gcn+baseline"), ("resnet50+gcn_br", "resnet50_gcn+gcn_br"),
        ("resnet50+baseline", "resnet50+gcn_br"), ("resnet50_gcn+baseline", "resnet50_gcn+gcn_br")]
    assert pairs[0]["label"] == "ResNet50-GCN vs ResNet50, Baseline head"


def test_image_scores_are_each_images_own_miou() -> None:
    assert image_scores(A_ONE).tolist() == [0.5, 0.75]
