"""Table 6's statistics (experiments.compare.stats): mIoU from per-image counts, the hierarchical paired
bootstrap against hand-computed cases, its reproducibility, aggregation over seeds with a missing one, and
the verdict's wording. Pure numpy: no training, no files."""
from __future__ import annotations

import numpy as np
import pytest

from experiments.compare.collect import aggregate, comparison_pairs
from experiments.compare.stats import (
    Difference,
    format_difference,
    image_scores,
    miou_from_counts,
    paired_bootstrap,
    summarize,
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


# Two validation images, one class scored (class 1 never occurs: it must not count), one seed.
#   image x: A tp 1 fp 1 fn 0 (IoU 1/2), B tp 2 (IoU 1);   image y: A tp 3 fn 1 (3/4), B tp 2 fp 1 fn 1 (1/2)
# Resamples of the two images: {x, x} w.p. 1/4: A 2/4, B 4/4 -> +50 points; {y, y} w.p. 1/4: A 6/8, B 4/8 ->
# -25 points; {x, y} w.p. 1/2: A 4/6, B 4/6 -> 0. Percentile interval at 95 %: [-25, +50]; estimate (all
# images, as observed): 0.
A_ONE = counts([(1, 1, 0), (0, 0, 0)], [(3, 0, 1), (0, 0, 0)])
B_ONE = counts([(2, 0, 0), (0, 0, 0)], [(2, 1, 1), (0, 0, 0)])


def test_image_bootstrap_matches_the_hand_computed_interval_with_one_seed() -> None:
    d = paired_bootstrap({0: A_ONE}, {0: B_ONE}, replicates=4000, seed=1)
    assert d.estimate == pytest.approx(0.0)
    assert (d.low, d.high) == (pytest.approx(-25.0), pytest.approx(50.0))
    assert d.seeds == (0,) and d.images == 2 and not d.significant
    assert format_difference(d, "B", "A") == "+0.0 [-25.0, +50.0], not significant"


def test_seed_level_of_the_bootstrap_matches_the_hand_computed_interval() -> None:
    # Three identical images per seed: resampling images changes nothing, only the seed level acts.
    # seed 0: A IoU 1/2, B 1 -> +50 points; seed 1: A 9/10, B 1 -> +10 points.
    # Seed resamples: (0, 0) w.p. 1/4 -> +50; (0, 1) or (1, 0) w.p. 1/2 -> +30; (1, 1) w.p. 1/4 -> +10.
    a = {0: counts(*[[(1, 1, 0)]] * 3), 1: counts(*[[(9, 1, 0)]] * 3)}
    b = {0: counts(*[[(4, 0, 0)]] * 3), 1: counts(*[[(5, 0, 0)]] * 3)}
    d = paired_bootstrap(a, b, replicates=4000, seed=2)
    assert d.estimate == pytest.approx(30.0)
    assert (d.low, d.high) == (pytest.approx(10.0), pytest.approx(50.0))
    assert d.significant and verdict(d, "GCN + BR", "Baseline") == "significant (GCN + BR better)"
    # the other way round: A better, and the verdict names A
    flipped = paired_bootstrap(b, a, replicates=4000, seed=2)
    assert (flipped.low, flipped.high) == (pytest.approx(-50.0), pytest.approx(-10.0))
    assert format_difference(flipped, "GCN + BR", "Baseline") == "-30.0 [-50.0, -10.0], significant (Baseline better)"


def test_images_are_paired_across_the_arms() -> None:
    # image x is hard for both networks, y easy for both; B is better on each. Paired resamples:
    #   {x, x}: A 2/8, B 4/8 -> +25;  {y, y}: A 18/20, B 20/20 -> +10;  {x, y}: A 10/14, B 12/14 -> +14.3.
    # Resampling the arms' images independently would pair A's easy images with B's hard ones (A {y, y} .9
    # vs B {x, x} .5: -40 points, w.p. 1/16) and find no difference.
    a = counts([(1, 3, 0)], [(9, 1, 0)])
    b = counts([(2, 2, 0)], [(10, 0, 0)])
    d = paired_bootstrap({0: a}, {0: b}, replicates=4000, seed=3)
    assert (d.low, d.high) == (pytest.approx(10.0), pytest.approx(25.0)) and d.significant


def test_seeds_are_paired_by_number_across_the_arms() -> None:
    # seed 0: A 1/2, B 3/5 -> +10;  seed 1: A 9/10, B 1 -> +10. Paired by seed every replicate is +10;
    # unpaired, A's good seed against B's bad one would give -30.
    a = {0: counts([(1, 1, 0)], [(1, 1, 0)]), 1: counts([(9, 1, 0)], [(9, 1, 0)])}
    b = {0: counts([(3, 2, 0)], [(3, 2, 0)]), 1: counts([(5, 0, 0)], [(5, 0, 0)])}
    d = paired_bootstrap(a, b, replicates=1000, seed=4)
    assert (d.estimate, d.low, d.high) == (pytest.approx(10.0), pytest.approx(10.0), pytest.approx(10.0))


def _random_arms(seeds: list[int], images: int = 40, classes: int = 5) -> tuple[dict, dict]:
    rng = np.random.default_rng(7)
    a = {s: rng.integers(0, 50, size=(images, classes, 3)) for s in seeds}
    b = {s: rng.integers(0, 50, size=(images, classes, 3)) for s in seeds}
    return a, b


def test_bootstrap_is_reproducible_from_its_seed() -> None:
    a, b = _random_arms([0, 1, 2])
    first = paired_bootstrap(a, b, replicates=500, seed=11)
    assert paired_bootstrap(a, b, replicates=500, seed=11) == first  # bit for bit
    other = paired_bootstrap(a, b, replicates=500, seed=12)
    assert other.estimate == first.estimate and (other.low, other.high) != (first.low, first.high)
    assert first.low < first.estimate < first.high and first.bootstrap_seed == 11


def test_bootstrap_pairs_seeds_and_leaves_out_those_one_arm_lacks() -> None:
    a, b = _random_arms([0, 1, 2])
    del b[1]
    d = paired_bootstrap(a, b, replicates=200, seed=0)
    assert d.seeds == (0, 2)
    expected = np.mean([miou_from_counts(b[s].sum(0)) - miou_from_counts(a[s].sum(0)) for s in (0, 2)])
    assert d.estimate == pytest.approx(100 * expected)
    with pytest.raises(ValueError, match="no seed finished in both arms"):
        paired_bootstrap({0: a[0]}, {1: b[2]})
    with pytest.raises(ValueError, match="differ in shape"):
        paired_bootstrap({0: a[0]}, {0: b[0][:-1]})  # not the same images


@pytest.mark.parametrize("estimate, low, high, text", [
    (0.2, -0.6, 1.0, "+0.2 [-0.6, +1.0], not significant"),
    (3.14, 1.2, 5.04, "+3.1 [+1.2, +5.0], significant (ResNet50-GCN better)"),
    (-2.0, -3.5, -0.4, "-2.0 [-3.5, -0.4], significant (ResNet50 better)"),
    (-0.04, -0.9, 0.0, "+0.0 [-0.9, +0.0], not significant"),  # an interval ending at 0 holds 0; no "-0.0"
])
def test_verdict_wording(estimate: float, low: float, high: float, text: str) -> None:
    d = Difference(estimate, low, high, 0.95, (0, 1, 2), 100, 2000, 0)
    assert format_difference(d, "ResNet50-GCN", "ResNet50") == text


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
