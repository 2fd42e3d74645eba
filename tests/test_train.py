"""The pretraining trainer on CPU: recipe pieces, resume determinism, final.pth, bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from signal_after import SignalAfter

import backbone
from backbone.antialias import anti_aliasing_of
from backbone.artifacts import load_backbone
from backbone.train import (
    NonFiniteLossError,
    PretrainConfig,
    check_inputs,
    lr_at,
    main,
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


# --- a full tiny run, interrupted and resumed -----------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(pretrain_betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain") / "straight"
    assert run(tiny(pretrain_betons, run_dir)) == "finished"
    return run_dir


@pytest.mark.slow
def test_resumed_run_ends_with_identical_weights(uninterrupted: Path, pretrain_betons: dict[str, Path],
                                                 tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "interrupted"
    cfg = tiny(pretrain_betons, run_dir)
    assert run(cfg, preempt=SignalAfter(11)) == "preempted"  # mid second epoch (8 steps per epoch)
    (saved,) = ckpt.list_checkpoints(run_dir)[-1:]
    meta = ckpt.peek_checkpoint(saved)
    assert meta["epoch"] == 1 and 0 < meta["step_in_epoch"] < 8 and meta["step"] == 8 + meta["step_in_epoch"]
    assert not (run_dir / "final.pth").exists()
    with caplog.at_level("INFO"):
        assert run(cfg) == "finished"
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
    assert {"loss", "lr", "resolution", "images_per_s", "step"} <= train[0].keys()
    assert [r["epoch"] for r in val] == [1, 2] and val[-1]["top1"] >= 0.6 and val[-1]["top5"] == 1.0
    assert {r["resolution"] for r in train} == {32, 64}  # progressive resizing over the ramp

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


# --- bad input: clear errors before any loader starts, nothing overwritten ------------------------------
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


def test_cli_help_lists_config_keys() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "backbone.train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "120"}, check=True).stdout
    assert "--config" in out and "optim.lr = 1.7" in out and "key=value" in out

