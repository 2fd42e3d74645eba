"""Segmentation metrics against independent (loop / numpy) computations on random data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation.metrics import SegmentationMetrics, boundary_mask, confusion_matrix, format_table


def _random_labels(rng: np.random.Generator, n: int, h: int, w: int, c: int, void: float = 0.1) -> np.ndarray:
    """Blocky label maps (so there are regions and boundaries) with some void."""
    coarse = rng.integers(0, c, size=(n, h // 3 + 1, w // 3 + 1))
    labels = coarse.repeat(3, 1).repeat(3, 2)[:, :h, :w]
    labels[rng.random((n, h, w)) < void] = 255
    return labels.astype(np.uint8)


def _brute_boundary(t: np.ndarray, w: int, void_is_boundary: bool) -> np.ndarray:
    h, wd = t.shape
    out = np.zeros_like(t, dtype=bool)
    for y in range(h):
        for x in range(wd):
            if t[y, x] == 255:
                continue
            win = t[max(0, y - w):y + w + 1, max(0, x - w):x + w + 1]
            if not void_is_boundary:
                win = win[win != 255]
            out[y, x] = bool((win != t[y, x]).any())
    return out


def test_confusion_and_scores_match_independent_counts() -> None:
    rng = np.random.default_rng(0)
    c = 5
    target = _random_labels(rng, 4, 23, 31, c)
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, c, size=target.shape)) % 256
    pred[pred == 255] = 0
    pred = pred.astype(np.int64)
    pred[target == 255] = rng.integers(0, c, size=int((target == 255).sum()))  # void: anything goes
    metrics = SegmentationMetrics(c, boundary_width=2)
    for p, t in zip(pred, target, strict=True):
        metrics.update(torch.from_numpy(p), torch.from_numpy(t))
    scores = metrics.compute()

    valid = target != 255
    conf = np.zeros((c, c), dtype=np.int64)
    for t, p in zip(target[valid], pred[valid], strict=True):
        conf[t, p] += 1
    assert np.array_equal(metrics.confusion.numpy(), conf)
    ious = []
    for k in range(c):
        tp = np.sum((pred == k) & (target == k) & valid)
        union = np.sum(((pred == k) | (target == k)) & valid)
        ious.append(tp / union)
    assert scores["per_class_iou"] == pytest.approx(ious)
    assert scores["miou"] == pytest.approx(np.mean(ious))
    assert scores["pixel_acc"] == pytest.approx(np.mean(pred[valid] == target[valid]))
    assert scores["pixels"] == int(valid.sum())

    band = np.stack([_brute_boundary(t, 2, True) for t in target])
    inner = valid & ~band
    assert scores["boundary_pixels"] == band.sum() and scores["internal_pixels"] == inner.sum()
    assert scores["boundary_acc"] == pytest.approx(np.mean(pred[band] == target[band]))
    assert scores["internal_acc"] == pytest.approx(np.mean(pred[inner] == target[inner]))
    table = format_table(scores, [f"class{k}" for k in range(c)])
    assert f"{100 * scores['miou']:6.2f}" in table and "boundary acc. (w=2)" in table


def test_absent_class_is_left_out_of_the_mean() -> None:
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 2]])  # class 2 predicted only on void: does not count
    m = SegmentationMetrics(4)
    m.update(pred, target)
    s = m.compute()
    assert s["per_class_iou"] == [pytest.approx(4 / 5), pytest.approx(2 / 3), None, None]
    assert s["miou"] == pytest.approx((4 / 5 + 2 / 3) / 2) and s["pixel_acc"] == pytest.approx(6 / 7)
    assert "n/a" in format_table(s, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(pred, torch.tensor([[0, 7, 1, 1], [0, 0, 1, 255]]), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(pred[:1], target, 4)


@pytest.mark.parametrize("width", [0, 1, 3, 5])
@pytest.mark.parametrize("void_is_boundary", [True, False])
def test_boundary_band_matches_brute_force(width: int, void_is_boundary: bool) -> None:
    rng = np.random.default_rng(width)
    labels = _random_labels(rng, 2, 19, 26, 4, void=0.05)
    got = boundary_mask(torch.from_numpy(labels), width, void_is_boundary=void_is_boundary).numpy()
    want = np.stack([_brute_boundary(t, width, void_is_boundary) for t in labels])
    assert np.array_equal(got, want)
    if width == 0:
        assert not got.any()


def test_boundary_band_of_a_straight_edge() -> None:
    t = torch.zeros(8, 10, dtype=torch.uint8)
    t[:, 5:] = 3
    t[0, 0] = 255
    band = boundary_mask(t, 2)
    # columns 3..6 are within 2 px of the edge; the void pixel is in neither set, its neighbours
    # (Chebyshev distance <= 2) are boundary pixels by default and internal without void counting
    expect = torch.zeros(8, 10, dtype=torch.bool)
    expect[:, 3:7] = True
    expect[:3, :3] = True
    expect[0, 0] = False
    assert torch.equal(band, expect)
    quiet = boundary_mask(t, 2, void_is_boundary=False)
    expect[:3, :3] = False
    assert torch.equal(quiet, expect)
