"""The pretraining trainer on CPU: recipe pieces, resume determinism, final.pth, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import timm
import torch
from signal_after import RandomDraws

import backbone
from backbone.antialias import anti_aliasing_of
from backbone.artifacts import load_backbone
from backbone.evaluate import classification_totals, tta_logits
from backbone.train import (
    NonFiniteLossError,
    PretrainConfig,
    check_inputs,
    lr_at,
    main,
    param_groups,
    peak_lr,
    resolution_at,
    run,
)
from engine import checkpoint as ckpt
from engine.config import ConfigError, load_config
from engine.logs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain/tiny_cpu.yaml"


def tiny(betons: dict[str, Path], run_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, TINY, [f"data.train={betons['train']}", f"data.val={betons['val']}",
                                              f"run.dir={run_dir}", "train.epochs=2", *extra])


# --- recipe ---------------------------------------------------------------------------------------
def test_recipe_schedules() -> None:
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/resnet50_88_epochs.yaml")
    assert peak_lr(cfg.optim, 4096) == pytest.approx(1.7) and peak_lr(cfg.optim, 1024) == pytest.approx(0.425)
    res = [resolution_at(cfg.resolution, e) for e in range(88)]
    assert res[:66] == [160] * 66 and res[76:] == [192] * 12 and all(r % 32 == 0 for r in res)
    assert res == sorted(res)
    o, peak = cfg.optim, 1.7
    assert lr_at(o, 88, 0, peak) == pytest.approx(1.7e-4) and lr_at(o, 88, 2, peak) == pytest.approx(peak)
    assert lr_at(o, 88, 45, peak) == pytest.approx(peak * 43 / 86) and lr_at(o, 88, 88, peak) == 0
    step = load_config(PretrainConfig, None, ["optim.schedule=step", "optim.step_length=30"]).optim
    assert [lr_at(step, 88, e, 1.0) for e in (0, 29.9, 30, 61)] == pytest.approx([1, 1, 0.1, 0.01])


# ffcv-imagenet's resolution per epoch (np.interp over the ramp, then int(np.round(res / 32)) * 32),
# worked out by hand: e.g. 88 epochs, ramp 65 -> 76: epoch 70 gives 160 + 32 * 5/11 = 174.5 -> 5.45 x 32
# -> 160, epoch 71 gives 177.5 -> 5.55 x 32 -> 192; 32 epochs, ramp 23 -> 27: epoch 25 gives exactly
# 176 = 5.5 x 32, which rounds half to even -> 192; 16 epochs, ramp 11 -> 13: epoch 12 -> 176 -> 192.
@pytest.mark.parametrize("config, expected", [
    ("resnet50_88_epochs", [160] * 71 + [192] * 17),
    ("resnet50_gcn_88_epochs", [160] * 71 + [192] * 17),
    ("resnet50_32_epochs", [160] * 25 + [192] * 7),
    ("resnet50_gcn_32_epochs", [160] * 25 + [192] * 7),
    ("resnet50_16_epochs", [160] * 12 + [192] * 4),
    ("resnet50_gcn_16_epochs", [160] * 12 + [192] * 4),
])
def test_resolution_per_epoch_is_ffcv_imagenets(config: str, expected: list[int]) -> None:
    cfg = load_config(PretrainConfig, ROOT / f"configs/pretrain/{config}.yaml")
    assert len(expected) == cfg.train.epochs
    assert [resolution_at(cfg.resolution, e) for e in range(cfg.train.epochs)] == expected


def test_ramp_rounds_to_the_nearest_multiple() -> None:
    r = load_config(PretrainConfig, None, ["resolution.min_res=128", "resolution.max_res=256",
                                            "resolution.start_ramp=0", "resolution.end_ramp=8"]).resolution
    # 128 + 16 e: 144 (4.5 x 32: half to even -> 128), 160, 176 (5.5 -> 192), 192, 208 (6.5 -> 192), 224, 240
    # (7.5 -> 256), then 256
    assert [resolution_at(r, e) for e in range(10)] == [128, 128, 160, 192, 192, 192, 224, 256, 256, 256]


def test_weight_decay_skips_every_one_dimensional_parameter() -> None:
    model = timm.create_model("resnet18", num_classes=4)
    decay, no_decay = param_groups(model, 3e-5)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (3e-5, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"] + no_decay["params"]) == sorted(names.values())
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.ndim > 1}
    assert {"bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "fc.bias"} <= {names[id(p)] for p in no_decay["params"]}
    assert "fc.weight" in {names[id(p)] for p in decay["params"]}


# --- validation metrics -------------------------------------------------------------------------------
def test_classification_totals_by_hand() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0],   # label 0: top-1
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0],   # label 4: 5th, top-5 only
                           [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],    # label 1: 6th, neither
                           [0.0, 0.0, 9.0, 1.0, 2.0, 3.0, 4.0]])   # label 3: 5th, top-5 only
    labels = torch.tensor([0, 4, 1, 3])
    top1, top5, loss, n = classification_totals(logits, labels, 5).tolist()
    assert (top1, top5, n) == (1, 3, 4)
    log_p = logits.double().log_softmax(1)
    assert loss == pytest.approx(-sum(float(log_p[i, c]) for i, c in enumerate(labels.tolist())), rel=1e-6)
    assert classification_totals(logits, labels, 1)[:2].tolist() == [1, 1]
    assert classification_totals(logits, labels, 7)[:2].tolist() == [1, 4]


def test_flip_tta_adds_the_mirror_images_logits() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 5, 6))  # sees left from right
    images = torch.randn(2, 3, 4, 5)
    mirrored = images[..., [4, 3, 2, 1, 0]]
    with torch.no_grad():
        torch.testing.assert_close(tta_logits(model, images, flip=True), model(images) + model(mirrored))
        torch.testing.assert_close(tta_logits(model, images, flip=False), model(images))


# --- a full tiny run, interrupted and resumed -----------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(pretrain_straight: Path) -> Path:
    """The straight run (conftest, shared with test_faults); what its RandomDraws flag drew is in draws.json beside
    the run directory."""
    return pretrain_straight


@pytest.mark.slow
def test_resumed_run_ends_with_identical_weights(uninterrupted: Path, pretrain_betons: dict[str, Path],
                                                 tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "interrupted"
    cfg = tiny(pretrain_betons, run_dir)
    first = RandomDraws(11)
    assert run(cfg, preempt=first) == "preempted"  # mid second epoch (8 steps per epoch)
    (saved,) = ckpt.list_checkpoints(run_dir)[-1:]
    meta = ckpt.peek_checkpoint(saved)
    assert meta["epoch"] == 1 and 0 < meta["step_in_epoch"] < 8 and meta["step"] == 8 + meta["step_in_epoch"]
    assert not (run_dir / "final.pth").exists()
    saved_python_rng = torch.load(saved, weights_only=True)["rng"][0]["python"]
    second = RandomDraws()
    with caplog.at_level("INFO"):
        assert run(cfg, preempt=second) == "finished"
    # The RNG states saved at the interruption are restored: NumPy's and torch's random streams (seeded
    # by the trainer) go on exactly as in the straight run, not from the seed again; Python's (not
    # seeded by the trainer) goes on from the state the checkpoint holds.
    straight = json.loads((uninterrupted.parent / "draws.json").read_text())
    assert len(first.draws) == 12 and len(first.draws) + len(second.draws) == len(straight)
    assert [list(d[1:]) for d in first.draws + second.draws] == [d[1:] for d in straight]
    version, internal, gauss = saved_python_rng
    python = random.Random()
    python.setstate((version, tuple(internal), gauss))
    assert [d[0] for d in second.draws] == [python.random() for _ in second.draws]
    assert f"resumed from checkpoint {saved} at epoch 1, step {meta['step']}" in caplog.text
    a = torch.load(uninterrupted / "final.pth", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "final.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"resumed run differs in {different[:5]}"
    # the same directory again: nothing to do, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    assert run(cfg) == "done before"
    assert {p: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.suffix != ".log"} == \
        {p: t for p, t in before.items() if p.suffix != ".log"}


@pytest.mark.slow
def test_metrics_and_final_weights_load_through_timm(uninterrupted: Path) -> None:
    records = read_metrics(uninterrupted / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert {"loss", "lr", "resolution", "img_per_s", "img_per_s_per_process", "data_wait", "mfu", "step"} \
        <= train[0].keys()
    assert all(r["mfu"] is None and 0 <= r["data_wait"] <= 1 and r["img_per_s"] > 0 for r in train)  # CPU: no peak
    assert (uninterrupted / "curves.png").exists() and list(uninterrupted.glob("events.out.tfevents.*"))
    assert [r["epoch"] for r in val] == [1, 2] and val[-1]["top1"] >= 0.6 and val[-1]["top5"] == 1.0
    assert all(r["images"] == 32 and r["top5_error"] == pytest.approx(1 - r["top5"]) for r in val)
    assert [r["resolution"] for r in train] == [32] * 8 + [64] * 8  # progressive resizing over the ramp

    final = torch.load(uninterrupted / "final.pth", weights_only=True)
    assert final["format"] == "lkm-weights-v2" and final["model_name"] == "resnet18"
    assert final["num_classes"] == 4 and final["model_kwargs"] == {"anti_aliasing": "blurpool"}
    assert final["provenance"]["world_size"] == 1 and final["provenance"]["global_batch"] == 16
    for path in (uninterrupted / "final.pth", ckpt.latest_checkpoint(uninterrupted)):
        model, _ = load_backbone(path)  # the network as trained: blurred strided convs, 4 classes
        assert anti_aliasing_of(model) == "blurpool" and model.fc.out_features == 4
        assert all(torch.equal(v, final["state_dict"][k]) for k, v in model.state_dict().items())
        # timm's own resnet18 cannot build the blur: its loaders refuse the weights instead of ignoring it
        with pytest.raises(RuntimeError, match="blur_filter"):
            timm.create_model("resnet18", pretrained=True, num_classes=4,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=4))
    with pytest.raises(backbone.WeightsMismatchError, match="final.pth"):
        backbone.load_weights(timm.create_model("resnet34", num_classes=4), uninterrupted / "final.pth")


@pytest.mark.slow
def test_lr_of_every_step_and_optimiser_groups(uninterrupted: Path) -> None:
    # tiny_cpu: lr 1.6 per 256 images, batch 16 on one process -> peak 0.1; warm-up from 1e-4 x peak over
    # lr_peak_epoch = 1, then linear to 0 at epoch 2; 8 steps per epoch, step s runs at epoch (s - 1) / 8
    train = [r for r in read_metrics(uninterrupted / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 17))
    peak = 1.6 * 16 / 256

    def expected(t: float) -> float:
        return 1e-4 * peak + (peak - 1e-4 * peak) * t if t <= 1 else peak * (2 - t)

    assert [r["lr"] for r in train] == pytest.approx([expected((s - 1) / 8) for s in range(1, 17)], rel=1e-9)

    state = torch.load(ckpt.latest_checkpoint(uninterrupted), weights_only=False)
    groups = state["optimizer"]["param_groups"]
    model = timm.create_model("resnet18", num_classes=4, aa_layer=timm.layers.BlurPool2d)
    n_matrix = sum(p.ndim > 1 for p in model.parameters())
    n_vector = sum(p.ndim <= 1 for p in model.parameters())
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(5e-5, n_matrix), (0.0, n_vector)]
    assert all(g["momentum"] == 0.9 and g["lr"] == pytest.approx(expected(15 / 8)) for g in groups)


@pytest.fixture(scope="module")
def smoothed_ema_run(pretrain_betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch with strong label smoothing and an EMA of the weights."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "smoothed_ema"
    assert run(tiny(pretrain_betons, run_dir, "train.epochs=1", "optim.label_smoothing=0.9",
                    "train.ema=true")) == "finished"
    return run_dir


@pytest.mark.slow
def test_label_smoothing_bounds_the_training_loss(smoothed_ema_run: Path, uninterrupted: Path) -> None:
    # Cross-entropy against the smoothed target q (1 - eps + eps/K on the label, eps/K elsewhere) is
    # H(q) + KL(q || p) >= H(q): with eps = 0.9 and K = 4 no batch can go below H(q) = 1.372 (ln 4 = 1.386),
    # while the plain cross-entropy of a net that learns does (the straight run's, with eps = 0.1).
    eps, k = 0.9, 4
    q = [1 - eps + eps / k] + [eps / k] * (k - 1)
    bound = -sum(v * math.log(v) for v in q)
    losses = [r["loss"] for r in read_metrics(smoothed_ema_run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 8 and min(losses) >= bound - 1e-5, (bound, losses)
    straight = [r["loss"] for r in read_metrics(uninterrupted / "metrics.jsonl") if r["kind"] == "train"]
    smoothed_bound = -(0.925 * math.log(0.925) + 3 * 0.025 * math.log(0.025))  # eps = 0.1
    assert min(straight) >= smoothed_bound - 1e-5 and min(straight[:8]) < bound


@pytest.mark.slow
def test_ema_weights_are_what_final_pth_holds(smoothed_ema_run: Path) -> None:
    final = torch.load(smoothed_ema_run / "final.pth", weights_only=True)
    state = torch.load(ckpt.latest_checkpoint(smoothed_ema_run), weights_only=False)
    assert final["ema"] is True and final["state_dict"].keys() == state["model_ema"].keys()
    assert all(torch.equal(v, state["model_ema"][k]) for k, v in final["state_dict"].items())
    # the EMA lags behind the trained weights, and was updated (BN statistics left their initial 0 / 1)
    assert not torch.equal(state["model_ema"]["conv1.weight"], state["model"]["conv1.weight"])
    assert state["model_ema"]["bn1.running_mean"].abs().sum() > 0
    running_var = state["model_ema"]["bn1.running_var"]
    assert not torch.equal(running_var, torch.ones_like(running_var))


# --- bad input: clear errors before any loader starts, nothing overwritten ------------------------------
@pytest.mark.slow
def test_bad_inputs_are_refused_before_training(uninterrupted: Path, pretrain_betons: dict[str, Path],
                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"data\.train: .*missing\.beton does not exist.*write_beton"):
        check_inputs(tiny({"train": tmp_path / "missing.beton", "val": pretrain_betons["val"]}, tmp_path / "r"))
    broken = tmp_path / "broken.beton"
    broken.write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match=r"cannot read .*broken\.beton"):
        check_inputs(tiny({"train": broken, "val": pretrain_betons["val"]}, tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"model.num_classes=10 but .* has 4 classes"):
        check_inputs(tiny(pretrain_betons, tmp_path / "r", "model.num_classes=10"))
    with pytest.raises(ConfigError, match=r"unknown model 'resnet5O'.*resnet50"):
        check_inputs(tiny(pretrain_betons, tmp_path / "r", "model.name=resnet5O"))

    other = tmp_path / "other_model"
    shutil.copytree(uninterrupted, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(ckpt.CheckpointError, match=r"model_name='resnet18'.*model_name='resnet50_gcn'"):
        check_inputs(tiny(pretrain_betons, other, "model.name=resnet50_gcn"))
    code = main(["--config", str(TINY), f"data.train={pretrain_betons['train']}",
                 f"data.val={pretrain_betons['val']}", f"run.dir={other}", "model.name=resnet34"])
    assert code == 2 and "model_name='resnet34'" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(uninterrupted: Path,
                                                              pretrain_betons: dict[str, Path],
                                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "diverging"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "final.pth").unlink()
    good = ckpt.latest_checkpoint(run_dir)
    with pytest.raises(NonFiniteLossError, match=f"non-finite training loss.*{good.name}"):
        run(tiny(pretrain_betons, run_dir, "train.epochs=3", "optim.lr=1e30"))
    assert ckpt.latest_checkpoint(run_dir) == good and not (run_dir / "final.pth").exists()


@pytest.mark.slow
def test_resnet50_gcn_end_to_end(pretrain_betons: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "gcn"
    assert run(tiny(pretrain_betons, run_dir, "model.name=resnet50_gcn", "train.epochs=1",
                    "resolution.max_res=32")) == "finished"
    model = timm.create_model("resnet50_gcn", pretrained=True,  # follows the weights: 4 classes, blurred
                              pretrained_cfg_overlay=dict(file=str(run_dir / "final.pth")))
    assert anti_aliasing_of(model) == "blurpool" and model.fc.out_features == 4
    final = torch.load(run_dir / "final.pth", weights_only=True)
    assert final["model_name"] == "resnet50_gcn"
    assert all(torch.equal(v, final["state_dict"][k]) for k, v in model.state_dict().items())


def test_beton_files_are_opened_and_class_maps_compared_before_a_run(pretrain_betons: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    from backbone.write_beton import meta_path

    val = pretrain_betons["val"]
    meta = json.loads(meta_path(val).read_text())

    def beside_a_json(name: str, content: bytes, **changes: object) -> Path:
        beton = tmp_path / f"{name}.beton"
        beton.write_bytes(content)
        meta_path(beton).write_text(json.dumps({**meta, **changes}))
        return beton

    cases = [  # a .beton with a JSON beside it that does not belong to it: refused before the run exists
        (beside_a_json("random", os.urandom(4096)), r"data\.val: cannot read .*random\.beton: not a readable \.beton"),
        (beside_a_json("truncated", val.read_bytes()[:len(val.read_bytes()) // 2]), r"not a readable \.beton"),
        (beside_a_json("other_count", val.read_bytes(), num_images=31), r"holds 32 images, its JSON says 31"),
        (beside_a_json("renamed", val.read_bytes(), classes=["a", "b", "c", "d"]),
         r"data\.train and data\.val map classes differently \(label 0 is 'n00000001' in one and 'a' in the other; "
         r"4 differ\)"),
    ]
    for beton, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_inputs(tiny({"train": pretrain_betons["train"], "val": beton}, tmp_path / "r"))
    with pytest.raises(ConfigError, match=rf"data\.train: {tmp_path} is a folder, not a file"):
        check_inputs(tiny({"train": tmp_path, "val": val}, tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"data\.num_workers must be at least 1, not 0"):
        tiny(pretrain_betons, tmp_path / "r", "data.num_workers=0")  # ffcv needs a thread to decode in
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_nan_validation_loss_stops_the_run_before_the_epochs_checkpoint(
        uninterrupted: Path, pretrain_betons: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Weights that are finite but give a NaN validation loss (as with optim.lr=1e6 or 1e12) are not a good
    checkpoint: the run stops as for a NaN training loss, exit 2, before writing the epoch's checkpoint."""
    import backbone.train

    run_dir = tmp_path / "nan_val"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "final.pth").unlink()
    good = ckpt.latest_checkpoint(run_dir)
    evaluate = backbone.train.evaluate_classifier

    def nan_loss(*args, **kwargs):
        return {**evaluate(*args, **kwargs), "loss": float("nan")}

    monkeypatch.setattr(backbone.train, "evaluate_classifier", nan_loss)
    code = main(["--config", str(TINY), f"data.train={pretrain_betons['train']}", f"data.val={pretrain_betons['val']}",
                 f"run.dir={run_dir}", "train.epochs=3"])
    err = capsys.readouterr().err
    assert code == 2 and "the run diverged: non-finite validation loss after epoch 3 at step 24" in err, err
    assert f"Last good checkpoint: {good} (its weights were checked finite when it was written)" in err, err
    assert ckpt.latest_checkpoint(run_dir) == good and not (run_dir / "final.pth").exists()


def test_cli_help_lists_config_keys() -> None:
    import sys

    from conftest import run_watched

    out = run_watched([sys.executable, "-m", "backbone.train", "--help"], env={"COLUMNS": "120"}, check=True).stdout
    assert "--config" in out and "optim.lr = 1.7" in out and "key=value" in out

