"""Segmentation fine-tuning and evaluation on CPU: overfitting a few images, resume determinism,
staged initialisation, the evaluator's CLI and fusion, bad input, and a 2-task job on local SLURM."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hangs import files_progress, run_watched, wait_until
from PIL import Image
from seg_fixtures import make_voc
from signal_after import RandomDraws, SignalAfter

from backbone.weights import WeightsMismatchError
from engine import checkpoint as ckpt
from engine.config import ConfigError, load_config
from engine.logs import read_metrics
from engine.runner import NonFiniteLossError
from segmentation import evaluate
from segmentation.artifacts import SEG_TRAIN_FORMAT
from segmentation.datasets import voc_palette
from segmentation.finetune import (
    EpochSampler,
    FinetuneConfig,
    OptimConfig,
    build_model,
    check_inputs,
    main,
    param_groups,
    poly_lr,
    run,
    segmentation_loss,
)
from segmentation.network import build_segmentation_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/segmentation/tiny_cpu.yaml"


def tiny(devkit: Path, run_dir: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, TINY, [f"data.root={devkit}", f"run.dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def devkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=6, n_val=3)


@pytest.fixture(scope="module")
def overfit(devkit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 iterations on the 6 training images, validated on the same images."""
    run_dir = tmp_path_factory.mktemp("finetune") / "overfit"
    assert run(tiny(devkit, run_dir, "data.val_split=train", "train.iterations=50", "eval.every=25")) == "finished"
    return run_dir


# --- recipe pieces -----------------------------------------------------------------------------------
def test_poly_lr_param_groups_and_sampler() -> None:
    assert poly_lr(0.01, 0, 100) == 0.01 and poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    model = build_segmentation_model("resnet10t", "gcn_br", num_classes=21, kernel_size=7)
    groups = param_groups(model, OptimConfig(head_lr_mult=10.0, weight_decay=1e-4))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by_name["head"]["lr_mult"] == 10 and by_name["backbone"]["lr_mult"] == 1
    assert by_name["backbone_no_decay"]["weight_decay"] == 0 and by_name["head"]["weight_decay"] == 1e-4
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    encoder = {id(p) for p in model.encoder.parameters()}
    assert all(id(p) in encoder for p in by_name["backbone"]["params"])
    assert not any(id(p) in encoder for p in by_name["head"]["params"])

    # two ranks share each epoch's permutation without overlap; a restart mid-epoch continues it
    ranks = [EpochSampler(23, 3, r, 2, seed=5) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    a, b = (list(s) for s in ranks)
    assert len(a) == len(b) == 9 and not {i for i, _ in a} & {i for i, _ in b}
    ranks[0].set_epoch(1, start_step=2)
    assert list(ranks[0]) == a[6:]
    ranks[0].set_epoch(2)
    assert [i for i, _ in ranks[0]] != [i for i, _ in a]
    # every sample of every rank and epoch gets its own augmentation seed
    seeds = []
    for epoch in (1, 2):
        for s in ranks:
            s.set_epoch(epoch)
            seeds += [seed for _, seed in s]
    assert len(seeds) == 36 and len(set(seeds)) == 36


def test_segmentation_loss_is_the_mean_over_labelled_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 3)
    masks = torch.tensor([[[0, 1, 255], [2, 2, 255]], [[255, 255, 255], [1, 0, 255]]])
    log_p = logits.double().log_softmax(1)
    labelled = [(n, y, x) for n in range(2) for y in range(2) for x in range(3) if masks[n, y, x] != 255]
    expected = -sum(float(log_p[n, masks[n, y, x], y, x]) for n, y, x in labelled) / len(labelled)
    assert len(labelled) == 6 and float(segmentation_loss(logits, masks)) == pytest.approx(expected, rel=1e-6)
    all_void = torch.full_like(masks, 255)
    assert float(segmentation_loss(logits, all_void)) == 0.0


# --- the tiny run ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_overfits_a_handful_of_images(overfit: Path) -> None:
    records = read_metrics(overfit / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [25, 50]
    assert val[-1]["miou"] > 0.9, val[-1]
    assert {"pixel_acc", "boundary_acc", "internal_acc", "per_class_iou"} <= val[-1].keys()
    assert all({"img_per_s", "img_per_s_per_process", "data_wait", "mfu"} <= r.keys() for r in train)
    assert (overfit / "curves.png").exists() and list(overfit.glob("events.out.tfevents.*"))
    assert train[-1]["loss"] < train[0]["loss"] / 5 and train[-1]["lr"] < train[0]["lr"]
    final = torch.load(overfit / "final.pth", weights_only=True)
    assert final["format"] == "lkm-seg-weights-v2" and final["val"]["miou"] == val[-1]["miou"]
    assert final["model_args"] == {"backbone": "resnet10t", "head": "gcn_br", "num_classes": 21, "kernel_size": 7,
                                   "anti_aliasing": None}
    assert (overfit / "config.yaml").exists() and "val mIoU" in (overfit / "train.log").read_text()


@pytest.mark.slow
def test_evaluate_cli_scores_and_writes_colour_pngs(overfit: Path, devkit: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "scores.json"
    code = evaluate.main(["--checkpoint", str(overfit / "final.pth"), "--split", "train", "--scales", "0.75,1",
                          "--flip", "--window", "32", "--max-images", "3", "--save-png", str(tmp_path / "png"),
                          "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "aeroplane" in printed and "boundary acc. (w=5)" in printed
    scores = json.loads(out.read_text())
    assert scores["images"] == 3 and scores["miou"] > 0.8 and scores["scales"] == [0.75, 1.0] and scores["flip"]
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.stem for p in pngs] == ["2008_000000", "2008_000001", "2008_000002"]
    im = Image.open(pngs[0])
    label = np.asarray(Image.open(devkit / "VOC2012/SegmentationClass/2008_000000.png"))
    assert im.mode == "P" and im.size == (label.shape[1], label.shape[0])
    assert np.array_equal(np.asarray(im.getpalette(), dtype=np.uint8).reshape(-1, 3), voc_palette())
    pred = np.asarray(im)
    assert np.mean(pred[label != 255] == label[label != 255]) > 0.9

    # a checkpoint of another kind is refused with its name
    bad = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "format": "lkm-weights-v1"}, bad)
    assert evaluate.main(["--checkpoint", str(bad)]) == 2
    assert "other.pth is not a checkpoint of segmentation.finetune" in capsys.readouterr().err


def test_window_fusion_and_multiscale_prediction() -> None:
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(3, 4, 1)  # no context: window fusion must equal whole-image inference
    x = torch.randn(1, 3, 37, 90)
    whole = pointwise(x)
    with torch.no_grad():
        for window, overlap in ((32, 0.5), (40, 0.0), (16, 0.66)):
            assert torch.allclose(evaluate.window_logits(pointwise, x, window, overlap), whole, atol=1e-6)
        assert evaluate._starts(2048, 1024, int(1024 * (1 - 0.66))) == [0, 341, 683, 1024]
        probs = evaluate.predict(pointwise, x, scales=(1.0,), flip=True)
        assert torch.allclose(probs, 2 * whole.softmax(1), atol=1e-5)  # flip of a pointwise map is itself
        ms = evaluate.predict(pointwise, x, scales=(0.5, 1.0, 1.5))
        assert ms.shape == (1, 4, 37, 90) and torch.allclose(ms.sum(1), torch.full((1, 37, 90), 3.0), atol=1e-4)


def test_multiscale_flip_prediction_by_hand() -> None:
    """Each scale sees the image resized to round(s x H) x round(s x W), each flip the mirrored image;
    class probabilities, resized back (and mirrored back), are summed."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)  # not mirror-symmetric: a flip that is not undone shows
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return conv(x)

    x = torch.randn(1, 3, 37, 90)
    with torch.no_grad():
        got = evaluate.predict(model, x, scales=(0.5, 1.0, 1.5), flip=True)
        expected = torch.zeros(1, 4, 37, 90)
        for size in ((18, 45), (37, 90), (56, 135)):  # round(18.5) = 18 (half to even), round(55.5) = 56
            xs = x if size == (37, 90) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for mirror in (False, True):
                out = conv(xs[..., torch.arange(size[1] - 1, -1, -1)] if mirror else xs)
                if mirror:
                    out = out[..., torch.arange(size[1] - 1, -1, -1)]
                if size != (37, 90):
                    out = F.interpolate(out, size=(37, 90), mode="bilinear", align_corners=False)
                expected += out.softmax(1)
    assert [tuple(v.shape[-2:]) for v in seen] == [(18, 45), (18, 45), (37, 90), (37, 90), (56, 135), (56, 135)]
    assert torch.equal(seen[3], torch.flip(seen[2], dims=[3])) and torch.equal(seen[2], x)
    torch.testing.assert_close(got, expected)
    # one scale, no flip: the raw logits
    torch.testing.assert_close(evaluate.predict(conv, x), conv(x))


def test_window_logits_average_overlapping_crops() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 20, 50)

    def model(crop: torch.Tensor) -> torch.Tensor:  # depends on where the crop starts: overlaps differ
        return crop[:, :2] + crop.mean()

    with torch.no_grad():
        got = evaluate.window_logits(model, x, window=20, overlap=0.5)  # crops start at 0, 10, 20, 30
        total = torch.zeros(1, 2, 20, 50)
        count = torch.zeros(50)
        for left in (0, 10, 20, 30):
            total[..., left:left + 20] += model(x[..., left:left + 20])
            count[left:left + 20] += 1
    assert count.tolist() == [1] * 10 + [2] * 30 + [1] * 10
    torch.testing.assert_close(got, total / count)


# --- resume after interruption ---------------------------------------------------------------------------
@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_weights(devkit: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    short = ("train.iterations=8", "eval.every=0", "run.checkpoint_every=3", "data.global_batch=2")
    # Float sums depend on the CPU thread count (and importing ffcv elsewhere in the suite changes this
    # process's), so the subprocess and this process run with one thread each. The subprocess needs
    # MKL_NUM_THREADS as well as OMP_NUM_THREADS: torch takes its default thread count from
    # MKL_NUM_THREADS when that is set, whatever OMP_NUM_THREADS says.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _interrupt_and_resume(devkit, tmp_path, caplog, short)
    finally:
        torch.set_num_threads(threads)


def _interrupt_and_resume(devkit: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, short: tuple) -> None:
    # 3 iterations per epoch: the interruption falls mid-epoch. Straight run: by path, with the CLI flags.
    straight = tmp_path / "straight"
    proc = run_watched([sys.executable, "segmentation/finetune.py", "--config", str(TINY), "--backbone",
                        "resnet10t", "--head", "gcn_br", f"data.root={devkit}", f"run.dir={straight}", *short],
                       env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished:" in proc.stderr

    run_dir = tmp_path / "interrupted"
    cfg = tiny(devkit, run_dir, *short)
    assert run(cfg, preempt=SignalAfter(4)) == "preempted"
    meta = ckpt.peek_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert meta["step"] == 5 and meta["epoch"] == 1 and meta["step_in_epoch"] == 2
    assert not (run_dir / "final.pth").exists()
    with caplog.at_level("INFO"):  # resumed with a loader worker: augmentation does not depend on it
        assert run(tiny(devkit, run_dir, *short, "data.num_workers=1")) == "finished"
    assert "resumed from checkpoint" in caplog.text and "at iteration 5/8 (epoch 1)" in caplog.text
    a = torch.load(straight / "final.pth", weights_only=True)
    b = torch.load(run_dir / "final.pth", weights_only=True)
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    assert a["val"]["miou"] == b["val"]["miou"]
    assert run(tiny(devkit, run_dir, *short)) == "done before"


@pytest.fixture(scope="module")
def short_runs(devkit: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 iterations (3 per epoch) with head_lr_mult 4 and power 0.5: straight, and interrupted after
    iteration 2 then resumed; each with a RandomDraws flag, and the RNG state of the checkpoint resumed from."""
    base = tmp_path_factory.mktemp("short")
    short = ("train.iterations=4", "eval.every=0", "run.checkpoint_every=2", "run.check_every_steps=1",
             "data.global_batch=2", "data.crop_size=32", "optim.head_lr_mult=4", "optim.power=0.5")
    out = {"straight": base / "straight", "interrupted": base / "interrupted"}
    flags = {"straight": RandomDraws(), "first": RandomDraws(1), "second": RandomDraws()}
    assert run(tiny(devkit, out["straight"], *short), preempt=flags["straight"]) == "finished"
    assert run(tiny(devkit, out["interrupted"], *short), preempt=flags["first"]) == "preempted"
    saved = ckpt.latest_checkpoint(out["interrupted"])
    out["saved_step"] = ckpt.peek_checkpoint(saved)["step"]
    out["saved_rng"] = torch.load(saved, weights_only=True)["rng"][0]
    assert run(tiny(devkit, out["interrupted"], *short), preempt=flags["second"]) == "finished"
    out["draws"] = {k: f.draws for k, f in flags.items()}
    return out


@pytest.mark.slow
def test_resume_restores_the_random_streams(short_runs: dict) -> None:
    draws, saved = short_runs["draws"], short_runs["saved_rng"]
    assert short_runs["saved_step"] == 2 and len(draws["first"]) == 2
    assert len(draws["first"]) + len(draws["second"]) == len(draws["straight"]) == 4
    # torch's stream (seeded by the trainer) goes on as in the straight run, not from the seed again
    assert [d[2] for d in draws["first"] + draws["second"]] == [d[2] for d in draws["straight"]]
    # and all three go on from the states the checkpoint holds
    version, internal, gauss = saved["python"]
    python = random.Random()
    python.setstate((version, tuple(internal), gauss))
    n = saved["numpy"]
    numpy = np.random.RandomState()
    numpy.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    generator = torch.Generator()
    generator.set_state(saved["torch"])
    expected = [(python.random(), float(numpy.rand()), float(torch.rand((), generator=generator)))
                for _ in draws["second"]]
    assert draws["second"] == expected


@pytest.mark.slow
def test_poly_lr_and_head_lr_mult_reach_the_optimiser(short_runs: dict) -> None:
    # lr 0.01 x (1 - it / 4) ^ 0.5 at iteration it = 0..3 (the step logged as it + 1); new layers x 4
    def expected(it: int) -> float:
        return 0.01 * math.sqrt(1 - it / 4)

    for name in ("straight", "interrupted"):
        train = [r for r in read_metrics(short_runs[name] / "metrics.jsonl") if r["kind"] == "train"]
        assert [r["step"] for r in train] == list(range(1, 5))
        assert [r["lr"] for r in train] == pytest.approx([expected(it) for it in range(4)], rel=1e-9)
    paths = ckpt.list_checkpoints(short_runs["straight"])
    assert [ckpt.peek_checkpoint(p)["step"] for p in paths] == [2, 4]
    for path in paths:
        state = torch.load(path, weights_only=False)
        lr = expected(state["step"] - 1)
        groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
        assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
        assert groups["backbone"]["lr"] == pytest.approx(lr) and groups["backbone_no_decay"]["lr"] == pytest.approx(lr)
        assert groups["head"]["lr"] == pytest.approx(4 * lr) and groups["head_no_decay"]["lr"] == pytest.approx(4 * lr)
        assert [groups[k]["weight_decay"] for k in ("backbone", "backbone_no_decay", "head", "head_no_decay")] \
            == [1e-4, 0.0, 1e-4, 0.0]
        assert all(g["momentum"] == 0.9 for g in groups.values())


def test_non_finite_loss_stops_the_run(devkit: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "diverging"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss before step \d.*checkpoint: none"):
        run(tiny(devkit, run_dir, "train.iterations=3", "eval.every=0", "run.check_every_steps=1",
                 "data.global_batch=2", "optim.lr=1e30"))
    assert ckpt.list_checkpoints(run_dir) == [] and not (run_dir / "final.pth").exists()


def test_diverged_fine_tune_stops_naming_a_checked_checkpoint(devkit: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """The issue's repro (optim.lr=3), shortened: a checkpoint every step, the loss looked at only at the end. The
    weights go non-finite before any loss check; no checkpoint of them is written, none of the finite ones is
    rotated away, and the error names the latest (finite) one."""
    run_dir = tmp_path / "diverged"
    code = main(["--config", str(TINY), f"data.root={devkit}", f"run.dir={run_dir}", "train.iterations=12",
                 "eval.every=0", "run.checkpoint_every=1", "run.check_every_steps=12", "optim.lr=3",
                 "data.global_batch=2", "data.crop_size=32"])
    err = capsys.readouterr().err
    latest = ckpt.latest_checkpoint(run_dir)
    assert code == 2 and re.search(r"error: the run diverged: (the weights hold NaN/inf|non-finite training loss)",
                                   err), err
    assert f"Last good checkpoint: {latest} (its weights were checked finite when it was written)" in err, err
    for path in ckpt.list_checkpoints(run_dir):
        assert ckpt.nonfinite_tensors(torch.load(path, weights_only=False)["model"]) == [], path
    assert not (run_dir / "final.pth").exists()


@pytest.mark.parametrize("args, message", [
    (["--scales", "nan"], "scales must be positive finite numbers, got 'nan'"),
    (["--scales", "1,inf"], "scales must be positive finite numbers, got '1,inf'"),
    (["--overlap", "1"], "must be at least 0 and below 1, got '1'"),
    (["--overlap", "nan"], "must be at least 0 and below 1, got 'nan'"),
    (["--boundary-width", "-1"], "must be at least 0, got '-1'"),
    (["--window", "-512"], "must be at least 0, got '-512'"),
])
def test_evaluate_refuses_numbers_that_cannot_work(args: list[str], message: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.build_parser().parse_args(["--checkpoint", "final.pth", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_folders_and_files_that_are_not_checkpoints_are_named(devkit: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from backbone.weights import read_state_dict

    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    pickled = tmp_path / "module.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a whole module: Python objects, not just tensors
    for args, message in (
        (["--pretrained", str(tmp_path)], f"model.pretrained: {tmp_path} is a folder, not a file"),
        ([f"model.init_from={tmp_path}"], f"model.init_from: {tmp_path} is a folder, not a file"),
        (["--pretrained", str(notes)], f"cannot read checkpoint {notes}: it is not a PyTorch checkpoint"),
        (["--pretrained", str(pickled)], f"cannot read checkpoint {pickled}: it holds Python objects besides tensors"),
    ):
        assert main(["--config", str(TINY), f"data.root={devkit}", f"run.dir={tmp_path / 'r'}", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err  # one line, no traceback
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is a folder, not a checkpoint"):
        read_state_dict(tmp_path)
    assert not (tmp_path / "r").exists()


def test_error_in_a_data_loader_worker_is_one_line_naming_the_file(devkit: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "VOCdevkit"
    shutil.copytree(devkit, broken)
    image = broken / "VOC2012/JPEGImages/2008_000001.jpg"
    image.write_bytes(image.read_bytes()[:200])
    code = main(["--config", str(TINY), f"data.root={broken}", f"run.dir={tmp_path / 'r'}", "data.num_workers=1",
                 "train.iterations=3", "eval.every=0", "data.global_batch=6"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Original Traceback" not in err, err
    assert errors[0].startswith(f"error: cannot read image {image}: ") and \
        errors[0].endswith("(raised in a data loader worker)"), err


# --- stages and bad input ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_next_stage_starts_from_previous_final(overfit: Path, devkit: Path, tmp_path: Path) -> None:
    cfg = tiny(devkit, tmp_path / "stage2", f"model.init_from={overfit / 'final.pth'}")
    model = build_model(cfg)
    final = torch.load(overfit / "final.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    with pytest.raises(WeightsMismatchError, match=r"final\.pth does not fit"):
        build_model(tiny(devkit, tmp_path / "s", f"model.init_from={overfit / 'final.pth'}", "model.head=baseline"))


def test_bad_inputs_are_refused_before_training(devkit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'data.crop'. Did you mean 'data.crop_size'"):
        tiny(devkit, tmp_path / "r", "data.crop=32")
    assert main(["--config", str(TINY), f"run.dir={tmp_path / 'r'}", "data.root=" + str(tmp_path / "none")]) == 2
    assert "no PASCAL VOC 2012 under" in capsys.readouterr().err
    assert main(["--config", str(TINY), "--backbone", "resnet5O", f"data.root={devkit}"]) == 2
    assert "unknown backbone 'resnet5O'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"model.kernel_size=6: .*odd kernel size"):
        check_inputs(tiny(devkit, tmp_path / "r", "model.kernel_size=6"))
    with pytest.raises(ConfigError, match=r"model.pretrained: .*missing\.pth does not exist"):
        check_inputs(tiny(devkit, tmp_path / "r", f"model.pretrained={tmp_path / 'missing.pth'}"))

    # a run directory holding another network's checkpoint: refused, nothing touched
    other = tmp_path / "other"
    other.mkdir()
    ckpt.save_checkpoint({"format": SEG_TRAIN_FORMAT, "dataset": "voc", "backbone": "resnet18", "head": "gcn_br",
                          "num_classes": 21, "kernel_size": 7}, other, 3)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert main(["--config", str(TINY), f"data.root={devkit}", f"run.dir={other}"]) == 2
    assert "backbone='resnet18'" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert not (tmp_path / "r").exists()


def test_module_entry_point_and_configs_load() -> None:
    out = run_watched([sys.executable, "-m", "segmentation.finetune", "--help"], env={"COLUMNS": "120"},
                      check=True).stdout
    assert "--backbone" in out and "optim.head_lr_mult = 1.0" in out and "key=value" in out
    for path in sorted((ROOT / "configs/segmentation").glob("*.yaml")):
        cfg = load_config(FinetuneConfig, path)
        assert cfg.train.iterations > 0, path


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


# --- DDP: two tasks through the sbatch script on the local SLURM cluster ------------------------------------
@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sbatch_two_tasks(slurm_cluster: dict, devkit: Path, tmp_path: Path) -> None:
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not on PATH")
    run_dir = tmp_path / "run"
    env = {**os.environ, **slurm_cluster}
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=30", f"--output={tmp_path}/%x-%j.out", "slurm/segmentation_finetune.sh", str(TINY),
         f"data.root={devkit}", f"run.dir={run_dir}", "train.iterations=4", "eval.every=0",
         "data.global_batch=4"], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    job = job.split(";")[0]
    files = files_progress(tmp_path)  # the job's log and run directory: they grow while it gets anywhere
    try:  # poll every second (sbatch --wait backs off to long sleeps)
        wait_until(lambda: _job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                   f"job {job} to end", lambda: (_job_state(job), files()),
                   report=lambda: "".join(p.read_text() for p in tmp_path.glob("lkm-finetune-*.out"))[-3000:])
        state = _job_state(job)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    logs = "".join(p.read_text() for p in tmp_path.glob("lkm-finetune-*.out"))
    assert state == "COMPLETED", logs[-3000:]
    assert "[rank 0]" in logs and "[rank 1]" in logs and "gloo" in logs and "val mIoU" in logs
    final = torch.load(run_dir / "final.pth", weights_only=True)
    assert final["val"]["images"] == 3  # the 3 val images, sharded over both ranks and summed
    assert "global batch 4 (2 processes)" in logs
