"""Dense CRF post-processing (segmentation.crf, segmentation.evaluate --crf / --crf-search): what the CRF
does to a blurred boundary and to a confident prediction, its errors, and the evaluator's CRF paths
checked against the CRF applied by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from seg_fixtures import make_voc

from engine.config import load_config
from segmentation import evaluate
from segmentation.artifacts import load_model
from segmentation.crf import CRFParams, CRFPool, CRFUnavailableError, crf_grid, crf_labels, dense_crf
from segmentation.datasets import SegmentationDataset, build_samples
from segmentation.evaluate import EvalSettings, predict, predict_probabilities, score_path
from segmentation.finetune import FinetuneConfig, run
from segmentation.metrics import SegmentationMetrics
from segmentation.transforms import MEAN, STD, eval_transform

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/segmentation/tiny_cpu.yaml"
RED, BLUE = (200, 40, 40), (40, 60, 200)


def two_halves(h: int = 48, w: int = 64, edge: int = 32, noise: int = 10,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A red left half (class 1) and a blue right half (class 2) with per-pixel colour noise: image, label."""
    rng = np.random.default_rng(seed)
    label = np.where(np.arange(w)[None, :] < edge, 1, 2).repeat(h, 0)
    image = np.where(label[..., None] == 1, RED, BLUE) + rng.integers(-noise, noise + 1, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def scores(pred: np.ndarray, label: np.ndarray, width: int = 3) -> dict:
    metrics = SegmentationMetrics(3, boundary_width=width)
    metrics.update(torch.from_numpy(pred), torch.from_numpy(label))
    return metrics.compute()


# --- the CRF on synthetic images -----------------------------------------------------------------------
def test_crf_snaps_a_blurred_boundary_to_the_colour_edge() -> None:
    image, label = two_halves()
    h, w = label.shape
    # the network's view: a soft boundary (logistic, 4 px wide) 5 px right of the true one, as an upsampled
    # stride-32 score map gives; every pixel keeps some background probability
    x = np.arange(w)[None, :].repeat(h, 0)
    left = 1 / (1 + np.exp((x - 37) / 4.0))
    probs = np.stack([np.full((h, w), 0.05), 0.95 * left, 0.95 * (1 - left)]).astype(np.float32)
    net = probs.argmax(0)
    before, after = scores(net, label), scores(crf_labels(image, probs), label)
    assert before["boundary_acc"] < 0.8  # the set-up: the network misses the edge by 5 columns
    assert after["boundary_acc"] > before["boundary_acc"] + 0.15, (before, after)
    assert after["miou"] > before["miou"] + 0.05, (before, after)
    assert after["miou"] > 0.97 and after["internal_acc"] >= before["internal_acc"]

    # without the bilateral (colour) kernel the CRF has nothing that says where the edge is
    blind = crf_labels(image, probs, CRFParams(bi_w=0))
    assert scores(blind, label)["boundary_acc"] < before["boundary_acc"] + 0.05


def test_crf_leaves_a_confident_correct_prediction_unchanged() -> None:
    rng = np.random.default_rng(1)
    image, label = two_halves(noise=40, seed=2)  # strong texture: colour alone would split the halves
    label[10:30, 8:20] = 0                       # and a third region, grey, inside the red half
    image[10:30, 8:20] = np.clip(128 + rng.integers(-40, 41, (20, 12, 3)), 0, 255)
    probs = np.full((3, *label.shape), 0.01, np.float32)
    np.put_along_axis(probs, label[None], 0.98, axis=0)
    image.setflags(write=False)  # as np.asarray(PIL image) gives it
    marginals = dense_crf(image, probs)
    assert marginals.shape == probs.shape and np.allclose(marginals.sum(0), 1, atol=1e-4)
    assert np.array_equal(marginals.argmax(0), label)
    assert marginals.max(0).min() > 0.9  # and it stays confident


def test_crf_errors_and_settings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    image, label = two_halves(h=20, w=30)
    probs = np.full((3, 20, 30), 1 / 3, np.float32)
    with pytest.raises(ValueError, match=r"image is 30x20 but the class probabilities are 31x20 \(width x height\)"):
        dense_crf(image, np.full((3, 20, 31), 1 / 3, np.float32))
    with pytest.raises(ValueError, match="logits\\? apply a softmax"):
        dense_crf(image, np.log(probs))
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        dense_crf(image.astype(np.float32) / 255, probs)
    with pytest.raises(ValueError, match="bi_xy_std must be > 0"):
        CRFParams(bi_xy_std=0)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        CRFParams(iters=0)
    # the process pool checks the pair before it sends it away, with the same message
    with CRFPool([CRFParams()], workers=1) as pool, pytest.raises(ValueError, match="30x20 but the class"):
        list(pool.map([(0, image, np.full((3, 21, 30), 1 / 3, np.float32))]))

    # settings in file names: a CRF score never lands in a plain score's file
    plain = EvalSettings("val", (1.0,), False)
    with_crf = EvalSettings("val", (1.0,), False, crf=CRFParams())
    tuned = EvalSettings("val", (1.0,), False, crf=CRFParams(bi_xy_std=10))
    names = {score_path("run/final.pth", s).name for s in (plain, with_crf, tuned)}
    assert names == {"eval_final_val.json", "eval_final_val_crf.json",
                     "eval_final_val_crf-i10-bi4x10r3-pos3x3.json"}
    assert plain.to_json()["crf"] is None and with_crf.to_json()["crf"]["bi_xy_std"] == 67
    assert len(crf_grid(CRFParams(iters=5), [3, 4], [30, 67], [3])) == 4
    assert {p.iters for p in crf_grid(CRFParams(iters=5), [3], [30], [3])} == {5}

    # the package missing: the error names the pip command, in the library and in the CLI before any work
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(CRFUnavailableError, match=r"pip install 'pydensecrf2>=1\.1'"):
        dense_crf(image, probs)
    capsys.readouterr()
    for option in ("--crf", "--crf-search"):
        assert evaluate.main(["--checkpoint", "does/not/exist.pth", option]) == 2
        assert "needs the pydensecrf2 package" in capsys.readouterr().err


def test_probabilities_for_the_crf_in_both_prediction_modes() -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, 3, padding=1).eval()
    x = torch.randn(1, 3, 12, 16)
    one = predict_probabilities(model, x)
    assert torch.allclose(one, predict(model, x).softmax(1)) and torch.allclose(one.sum(1), torch.ones(1, 12, 16))
    many = predict_probabilities(model, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert torch.allclose(many.sum(1), torch.ones(1, 12, 16), atol=1e-5)
    assert torch.equal(many.argmax(1), predict(model, x, scales=(0.5, 1.0, 1.5), flip=True).argmax(1))


# --- the evaluator's CRF paths on a tiny fine-tuned network ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A briefly trained network (its predictions are blurred: room for the CRF) and its VOCdevkit."""
    devkit = make_voc(tmp_path_factory.mktemp("voc"), n_train=6, n_val=3)
    run_dir = tmp_path_factory.mktemp("crf") / "run"
    cfg = load_config(FinetuneConfig, TINY, [f"data.root={devkit}", f"run.dir={run_dir}", "train.iterations=10",
                                             "eval.every=0"])
    assert run(cfg) == "finished"
    return run_dir / "final.pth", devkit


def by_hand(checkpoint: Path, devkit: Path, settings: list[CRFParams], scales: tuple[float, ...] = (1.0,),
            flip: bool = False) -> tuple[np.ndarray, list[np.ndarray], bool]:
    """Per-image (tp, fp, fn) of the network alone and of the CRF under each setting, applied here image by
    image with no pool; and whether the CRF changed any prediction."""
    model, _ = load_model(checkpoint)
    model.eval()
    samples = build_samples("voc", "val", devkit)
    dataset = SegmentationDataset(samples, 21)
    to_input = eval_transform(getattr(model, "normalization", (MEAN, STD)))
    counts: dict[int, list[np.ndarray]] = {k: [] for k in range(-1, len(settings))}  # -1: the network
    changed = False
    for i in range(len(dataset)):
        raw, label = dataset.load(i)
        image, _ = to_input(raw, label)
        probs = predict_probabilities(model, image.as_subclass(torch.Tensor)[None], scales, flip)[0].numpy()
        guide = raw.as_subclass(torch.Tensor).permute(1, 2, 0).numpy()
        preds = {-1: probs.argmax(0), **{k: crf_labels(guide, probs, p) for k, p in enumerate(settings)}}
        changed |= any(bool((preds[k] != preds[-1]).any()) for k in range(len(settings)))
        for key, pred in preds.items():
            metrics = SegmentationMetrics(21)
            conf, _ = metrics.update(torch.from_numpy(pred.astype(np.int64)), label.as_subclass(torch.Tensor))
            tp = conf.diag()
            counts[key].append(torch.stack([tp, conf.sum(0) - tp, conf.sum(1) - tp], 1).numpy())
    return np.stack(counts[-1]), [np.stack(counts[k]) for k in range(len(settings))], changed


def miou_of(tp_fp_fn: np.ndarray) -> float:
    """mIoU of summed per-image counts: the mean IoU over the classes with a non-empty union, as the metrics take it."""
    tp, fp, fn = tp_fp_fn.sum(0).T
    union = tp + fp + fn
    return float((tp[union > 0] / union[union > 0]).mean())


@pytest.mark.slow
def test_evaluate_cli_crf_matches_the_crf_by_hand(tiny_run: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    checkpoint, devkit = tiny_run
    common = ["--checkpoint", str(checkpoint), "--scales", "0.75,1", "--flip", "--workers", "0"]
    assert evaluate.main(common) == 0
    assert evaluate.main([*common, "--crf", "--crf-workers", "2"]) == 0
    plain_path = checkpoint.parent / "eval_final_val_s0.75-1_flip.json"
    crf_path = checkpoint.parent / "eval_final_val_s0.75-1_flip_crf.json"
    assert plain_path.exists() and crf_path.exists()  # the CRF score did not overwrite the plain one
    plain, with_crf = json.loads(plain_path.read_text()), json.loads(crf_path.read_text())
    assert plain["crf"] is None and with_crf["crf"] == CRFParams().to_json()
    assert with_crf["crf_workers"] == 2 and with_crf["crf_seconds_per_image"] > 0
    assert with_crf["crf_cpu_seconds_per_image"] > 0
    npz = np.load(crf_path.with_suffix(".per_image.npz"))
    assert list(npz["names"]) == ["2008_000006", "2008_000007", "2008_000008"] and npz["band"].shape == (3, 4)

    # the same numbers as the CRF run here on the evaluator's own probabilities, image by image
    tuned_params = CRFParams(iters=3, bi_xy_std=5)
    net_counts, (crf_counts, tuned_counts), changed = by_hand(checkpoint, devkit, [CRFParams(), tuned_params],
                                                              (0.75, 1.0), True)
    assert changed  # the set-up: the CRF does change this network's predictions
    assert np.array_equal(np.load(plain_path.with_suffix(".per_image.npz"))["tp_fp_fn"], net_counts)
    assert np.array_equal(npz["tp_fp_fn"], crf_counts)
    assert with_crf["miou"] == pytest.approx(miou_of(crf_counts), abs=1e-12)

    # in this process (no pool), other parameters: their own file, again the CRF by hand
    tuned = ["--crf", "--crf-workers", "0", "--crf-bi-xy-std", "5", "--crf-iters", "3"]
    assert evaluate.main([*common, *tuned]) == 0
    tuned_path = checkpoint.parent / "eval_final_val_s0.75-1_flip_crf-i3-bi4x5r3-pos3x3.json"
    tuned_npz = np.load(tuned_path.with_suffix(".per_image.npz"))
    assert np.array_equal(tuned_npz["tp_fp_fn"], tuned_counts)

    # the search: the grid's rows are the --crf runs of those settings on the first 2 images
    capsys.readouterr()
    out = tmp_path / "search.json"
    assert evaluate.main([*common, "--crf-search", "--crf-search-images", "2", "--crf-grid-w", "4,8",
                          "--crf-grid-xy-std", "67", "--crf-grid-rgb-std", "3", "--crf-workers", "2",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| no CRF |" in printed and "best: --crf --crf-iters 10 --crf-bi-w" in printed
    search = json.loads(out.read_text())
    assert search["images"] == 2 and [r["bi_w"] for r in search["rows"]] == [4, 8]
    assert search["rows"][0]["miou"] == pytest.approx(miou_of(crf_counts[:2]), abs=1e-12)
    assert search["no_crf"]["miou"] == pytest.approx(miou_of(net_counts[:2]), abs=1e-12)
    best = max(search["rows"], key=lambda r: r["miou"])
    assert search["best"] == {k: best[k] for k in CRFParams().to_json()}

