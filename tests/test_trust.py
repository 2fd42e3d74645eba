"""Files you can trust (issue 23): no code runs from a checkpoint, damaged checkpoints are found and passed over,
a refused resume writes nothing, numbers out of range stop a run before it starts, and the command lines
read options and overrides in any order.

A hostile file here is a ``torch.save`` of a pickle that runs ``touch <marker>`` when unpickled (what a pickle
calling ``os.system`` does): every test that reads one asserts that the marker was never created, and
:func:`test_the_hostile_payload_runs_when_unpickled_unsafely` shows that it would be with ``weights_only=False``.

One tiny fine-tune (4 iterations, checkpoints at 2 and 4) is trained once per module; the pretraining tests
use the session's tiny pretraining run (conftest ``pretrain_straight``). Each test copies what it changes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from seg_fixtures import make_voc

import backbone  # noqa: F401 - registers resnet50_gcn with timm
from backbone.artifacts import FinalWeights
from backbone.models import create_backbone
from backbone.train import PretrainConfig
from backbone.train import main as pretrain_main
from backbone.train import run as pretrain_run
from backbone.weights import WeightsMismatchError, read_state_dict
from engine import checkpoint as ckpt
from engine.config import ConfigError, load_config
from engine.provenance import config_recipe_hash, read_run_record
from segmentation.finetune import FinetuneConfig
from segmentation.finetune import main as finetune_main
from segmentation.finetune import run as finetune_run

ROOT = Path(__file__).resolve().parents[1]
SEG_TINY = ROOT / "configs/segmentation/tiny_cpu.yaml"
PRE_TINY = ROOT / "configs/pretrain/tiny_cpu.yaml"
SEG_SHORT = ("train.iterations=4", "eval.every=0", "run.checkpoint_every=2", "data.global_batch=2",
             "data.crop_size=32")


def seg_args(devkit: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={devkit}", f"run.dir={run_dir}", *SEG_SHORT, *extra]


def seg_cfg(devkit: Path, run_dir: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, SEG_TINY, seg_args(devkit, run_dir, *extra))


def pre_args(betons: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train={betons['train']}", f"data.val={betons['val']}", f"run.dir={run_dir}", "train.epochs=2",
            *extra]


def pre_cfg(betons: dict[str, Path], run_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, PRE_TINY, pre_args(betons, run_dir, *extra))


@pytest.fixture(scope="module")
def devkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=6, n_val=3)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: runs compared bit for bit must not depend on what this process did before (importing
    ffcv sets torch's thread count to 1, so a pretraining in this process changes it for what follows)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seg_run(devkit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny fine-tune: checkpoints at iterations 2 and 4, final.pth."""
    run_dir = tmp_path_factory.mktemp("seg") / "run"
    with one_thread():
        assert finetune_run(seg_cfg(devkit, run_dir)) == "finished"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["checkpoint_000000002.pt", "checkpoint_000000004.pt"]
    return run_dir


def copy_run(src: Path, dst: Path, final: bool = False) -> Path:
    shutil.copytree(src, dst)
    if not final:
        (dst / "final.pth").unlink()
    return dst


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hostile(path: Path, marker: Path, **fields: object) -> Path:
    """A checkpoint-looking file whose unpickling runs ``touch marker``."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(2)}, "state_dict": {"w": torch.zeros(2)}, "step": 99, **fields,
                "payload": Payload()}, path)
    return path


def overwrite_middle(path: Path, n: int = 4096) -> None:
    """Overwrite ``n`` bytes in the middle of a file (a bad block, a partial copy) with a fixed pattern."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        f.write((bytes(range(7, 256, 3)) * n)[:n])


def same_weights(a: Path, b: Path) -> list[str]:
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


# =============================================================================================================
# 1. No code from a checkpoint
# =============================================================================================================
def test_the_hostile_payload_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The payload is real: torch.load(weights_only=False), what resume used to do, creates the marker."""
    marker = tmp_path / "ran"
    torch.load(hostile(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_hostile_checkpoint_in_a_finetune_run_runs_nothing_and_the_run_resumes_from_the_one_before(
        seg_run: Path, devkit: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "ran"
    run_dir = copy_run(seg_run, tmp_path / "run")
    evil = hostile(ckpt.checkpoint_path(run_dir, 99), marker)
    with caplog.at_level(logging.INFO):
        assert finetune_run(seg_cfg(devkit, run_dir)) == "finished"
    assert not marker.exists()
    assert f"cannot read checkpoint {evil}: it holds Python objects (posix.system)" in caplog.text
    assert f"resumed from checkpoint {ckpt.checkpoint_path(run_dir, 4)}" in caplog.text
    assert not evil.exists() and evil.with_name(evil.name + ".damaged").exists()  # moved aside, kept
    assert same_weights(seg_run / "final.pth", run_dir / "final.pth") == []

    # the only checkpoint: a one-line error naming it, nothing run, nothing written
    alone = tmp_path / "alone"
    hostile(ckpt.checkpoint_path(alone, 1), marker)
    before = snapshot(alone)
    capsys.readouterr()
    assert finetune_main(["--config", str(SEG_TINY), *seg_args(devkit, alone)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: cannot read checkpoint {ckpt.checkpoint_path(alone, 1)}" in err, err
    assert "posix.system" in err and "Traceback" not in err
    assert snapshot(alone) == before and not marker.exists()


@pytest.mark.slow
def test_hostile_checkpoint_in_a_pretraining_run_runs_nothing_and_the_run_resumes_from_the_one_before(
        pretrain_straight: Path, pretrain_betons: dict[str, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "ran"
    run_dir = copy_run(pretrain_straight, tmp_path / "run")
    evil = hostile(ckpt.checkpoint_path(run_dir, 99), marker, format="lkm-train-v2", model_name="resnet18")
    with caplog.at_level(logging.INFO):
        assert pretrain_run(pre_cfg(pretrain_betons, run_dir)) == "finished"
    assert not marker.exists()
    assert f"cannot read checkpoint {evil}: it holds Python objects (posix.system)" in caplog.text
    assert f"resumed from checkpoint {ckpt.latest_checkpoint(run_dir)}" in caplog.text
    assert same_weights(pretrain_straight / "final.pth", run_dir / "final.pth") == []


def _compare_overrides(output: Path, betons: dict[str, Path], devkit: Path) -> list[str]:
    return [f"output={output}", "backbones=[resnet18]", "heads=[baseline]", "seeds=[0]", "pretrain.seeds=[0]",
            f"pretrain.config={PRE_TINY}",
            f"pretrain.overrides=[data.train={betons['train']}, data.val={betons['val']}, train.epochs=1]",
            f"finetune.config={SEG_TINY}", f"finetune.overrides=[data.root={devkit}, train.iterations=2]"]


def test_compare_dry_run_and_collect_on_an_output_with_hostile_files_run_nothing(
        pretrain_betons: dict[str, Path], devkit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine.provenance import file_sha256
    from experiments.compare import main as compare_main

    marker = tmp_path / "ran"
    output = tmp_path / "table6"
    pretrain_dir, finetune_dir = output / "pretrain/resnet18/seed0", output / "finetune/resnet18_baseline/seed0"
    evil = hostile(ckpt.checkpoint_path(pretrain_dir, 1), marker, format="lkm-train-v2", model_name="resnet18")
    args = _compare_overrides(output, pretrain_betons, devkit)

    assert compare_main([*args, "--dry-run"]) == 2  # the dry run checks the run directories: it reads no pickle
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {evil}: it holds Python objects (posix.system)" in err, err
    assert not marker.exists()

    # --collect scores finished runs: their final.pth are hostile too
    hostile(pretrain_dir / "final.pth", marker, format="lkm-weights-v2", model_name="resnet18")
    hostile(finetune_dir / "final.pth", marker, format="lkm-seg-weights-v2")
    # started from that pretraining's final.pth (else it is stale and not scored)
    started_from = file_sha256(pretrain_dir / "final.pth")
    (finetune_dir / "run.json").write_text(json.dumps({"pretrained": {"sha256": started_from}}))
    assert compare_main([*args, "--collect"]) == 2
    err = capsys.readouterr().err
    assert "final.pth" in err and "posix.system" in err, err
    assert not marker.exists()


def test_evaluation_and_every_weights_route_refuse_a_hostile_file(
        devkit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """These routes already loaded with weights_only=True; they stay tested."""
    from backbone.evaluate import main as backbone_evaluate
    from segmentation.evaluate import main as segmentation_evaluate

    marker = tmp_path / "ran"
    evil = hostile(tmp_path / "final.pth", marker, format="lkm-weights-v2", model_name="resnet50_gcn")
    assert segmentation_evaluate(["--checkpoint", str(evil)]) == 2
    assert backbone_evaluate(["--weights", str(evil), "--data", str(tmp_path / "val.beton"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"cannot read checkpoint {evil}: it holds Python objects besides tensors and plain values "
                     "(posix.system)") == 2, err
    for key in ("--pretrained", "model.init_from"):  # the fine-tune's two routes in
        arg = [key, str(evil)] if key.startswith("--") else [f"{key}={evil}"]
        assert finetune_main(["--config", str(SEG_TINY), *seg_args(devkit, tmp_path / "run"), *arg]) == 2
        assert str(evil) in capsys.readouterr().err
    with pytest.raises(WeightsMismatchError, match="cannot read checkpoint .*final.pth"):  # timm, the project's route
        timm.create_model("resnet50_gcn", pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    with pytest.raises(Exception, match="weights_only"):  # timm's own loader (checkpoint_path=)
        timm.create_model("resnet18", checkpoint_path=str(evil))
    with pytest.raises(WeightsMismatchError, match="cannot read checkpoint"):
        FinalWeights.load(evil)
    assert not marker.exists() and not (tmp_path / "run").exists()


# =============================================================================================================
# 3. Damaged checkpoints are found, named and passed over
# =============================================================================================================
def test_checkpoint_with_4_kib_overwritten_is_named_as_damaged(tmp_path: Path) -> None:
    model = create_backbone("resnet18", num_classes=4)
    path = ckpt.save_checkpoint({"format": "x", "step": 3, "model": model.state_dict()}, tmp_path, 3)
    assert ckpt.peek_checkpoint(path)["step"] == 3
    overwrite_middle(path)
    with pytest.raises(ckpt.DamagedCheckpointError, match=rf"{path} is damaged: its content is not what was written"):
        ckpt.peek_checkpoint(path)
    with pytest.raises(ckpt.DamagedCheckpointError, match=rf"{path} is damaged"):
        ckpt.load_checkpoint(path)
    final = ckpt.save_atomic({"state_dict": model.state_dict(), "model_name": "resnet18"}, tmp_path / "final.pth")
    read_state_dict(final)
    overwrite_middle(final)
    with pytest.raises(WeightsMismatchError, match=rf"{final} is damaged"):
        read_state_dict(final)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_one_before_and_ends_with_the_same_weights(
        seg_run: Path, devkit: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = copy_run(seg_run, tmp_path / "run")
    latest = ckpt.checkpoint_path(run_dir, 4)
    overwrite_middle(latest)
    with caplog.at_level(logging.INFO), one_thread():
        assert finetune_run(seg_cfg(devkit, run_dir)) == "finished"
    assert f"{latest} is damaged: its content is not what was written" in caplog.text
    assert f"resumed from checkpoint {ckpt.checkpoint_path(run_dir, 2)}" in caplog.text
    assert latest.with_name(latest.name + ".damaged").exists()
    assert same_weights(seg_run / "final.pth", run_dir / "final.pth") == []  # iterations 3, 4 trained again


@pytest.mark.slow
def test_damaged_final_weights_are_refused_by_evaluation_and_written_again_by_the_run(
        seg_run: Path, devkit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from segmentation.evaluate import main as segmentation_evaluate

    run_dir = copy_run(seg_run, tmp_path / "run", final=True)
    final = run_dir / "final.pth"
    overwrite_middle(final)
    assert segmentation_evaluate(["--checkpoint", str(final)]) == 2
    assert f"{final} is damaged" in capsys.readouterr().err
    assert finetune_run(seg_cfg(devkit, run_dir)) == "finished"  # not "done before": redone from iteration 4
    assert final.with_name("final.pth.damaged").exists()
    assert same_weights(seg_run / "final.pth", final) == []


# =============================================================================================================
# 4. A refused resume writes nothing
# =============================================================================================================
@pytest.mark.slow
def test_refused_finetune_resume_leaves_the_run_directory_as_it_was(seg_run: Path, devkit: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    run_dir = copy_run(seg_run, tmp_path / "run")
    before = snapshot(run_dir)
    capsys.readouterr()
    code = finetune_main(["--config", str(SEG_TINY), *seg_args(devkit, run_dir, "data.global_batch=3")])
    err = capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError) as iterations:
        finetune_run(seg_cfg(devkit, run_dir, "train.iterations=6"))
    assert snapshot(run_dir) == before  # config.yaml, run.json, train.log: untouched
    assert code == 2 and "was trained with global_batch=2; this run has global_batch=3" in err, err
    assert "nothing was written" in err
    assert "total_steps=4; this run has total_steps=6" in str(iterations.value)


@pytest.mark.slow
def test_refused_pretraining_resume_leaves_the_run_directory_as_it_was(
        pretrain_straight: Path, pretrain_betons: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_run(pretrain_straight, tmp_path / "run")
    before = snapshot(run_dir)
    with pytest.raises(ckpt.CheckpointError) as refused:
        pretrain_run(pre_cfg(pretrain_betons, run_dir, "data.global_batch=8"))
    assert snapshot(run_dir) == before
    assert "global_batch=16; this run has global_batch=8" in str(refused.value)


@pytest.mark.slow
def test_run_json_records_the_recipe_hash_of_the_config(seg_run: Path, devkit: Path) -> None:
    recorded = read_run_record(seg_run)["recipe_hash"]
    assert recorded == config_recipe_hash(seg_cfg(devkit, seg_run))
    assert recorded == config_recipe_hash(seg_cfg(devkit, Path("/moved/elsewhere"), "run.log_every_s=1"))
    assert recorded != config_recipe_hash(seg_cfg(devkit, seg_run, "optim.lr=0.02"))


# =============================================================================================================
# 6. Numbers out of range stop both stages before they start, in one line
# =============================================================================================================
@pytest.mark.parametrize(("stage", "override", "message"), [
    ("pretrain", "optim.lr=-1", "optim.lr must be above 0, not -1.0"),
    ("pretrain", "optim.momentum=1.5", r"optim.momentum must be in [0, 1), not 1.5"),
    ("pretrain", "optim.label_smoothing=1", r"optim.label_smoothing must be in [0, 1), not 1.0"),
    ("pretrain", "optim.weight_decay=-1e-4", "optim.weight_decay must be at least 0, not -0.0001"),
    ("pretrain", "optim.lr=.nan", "optim.lr must be a finite number, not nan"),
    ("pretrain", "train.ema_decay=2", "train.ema_decay must be in [0, 1], not 2.0"),
    ("finetune", "optim.lr=-1", "optim.lr must be above 0, not -1.0"),
    ("finetune", "optim.lr=.inf", "optim.lr must be a finite number, not inf"),
    ("finetune", "optim.head_lr_mult=-2", "optim.head_lr_mult must be at least 0, not -2.0"),
    ("finetune", "eval.overlap=1", "eval.overlap must be in [0, 1), not 1.0"),
    ("finetune", "run.keep_checkpoints=-1", "run.keep_checkpoints must be at least 0, not -1"),
])
def test_numbers_out_of_range_are_one_line_errors_before_anything_runs(
        stage: str, override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    if stage == "pretrain":
        code = pretrain_main(["--config", str(PRE_TINY), f"data.train={tmp_path}/t.beton",
                              f"data.val={tmp_path}/v.beton", f"run.dir={run_dir}", override])
    else:
        code = finetune_main(["--config", str(SEG_TINY), f"data.root={tmp_path}", f"run.dir={run_dir}", override])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {message}\n", err
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(PretrainConfig if stage == "pretrain" else FinetuneConfig, None, [override])


# =============================================================================================================
# 13. Options after overrides; another architecture's weights through the resnet50_gcn timm route
# =============================================================================================================
def test_options_and_overrides_come_in_any_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from backbone.submit import parse_args as submit_args
    from experiments.compare.cli import build_parser as compare_parser
    from segmentation.finetune import parse_args as finetune_args

    args = compare_parser().parse_args([f"output={tmp_path}", "--collect", "seeds=[0]", "--config", "c.yaml"])
    assert args.collect and args.overrides == [f"output={tmp_path}", "seeds=[0]"] and args.config == Path("c.yaml")
    assert finetune_args([f"run.dir={tmp_path}", "--backbone", "resnet18", "optim.lr=0.1"]) == \
        (None, ["model.backbone=resnet18", f"run.dir={tmp_path}", "optim.lr=0.1"])
    assert submit_args(["optim.lr=0.1", "--local", "run.dir=x"]).overrides == ["optim.lr=0.1", "run.dir=x"]
    # the case, end to end: run.dir=X before an option reaches the config (here: refused for its lr)
    assert pretrain_main([f"run.dir={tmp_path / 'r'}", "--config", str(PRE_TINY), "optim.lr=-1"]) == 2
    assert capsys.readouterr().err == "error: optim.lr must be above 0, not -1.0\n"


def test_resnet18_weights_through_the_resnet50_gcn_route_name_the_file_and_both_architectures(tmp_path: Path) -> None:
    model = create_backbone("resnet18", num_classes=5, anti_aliasing="blurpool")
    path = FinalWeights(state_dict=model.state_dict(), model_name="resnet18", num_classes=5, pretrained_cfg={},
                        model_kwargs={"anti_aliasing": "blurpool"}).save(tmp_path / "final.pth")
    with pytest.raises(WeightsMismatchError) as e:
        timm.create_model("resnet50_gcn", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert f"checkpoint {path} does not fit model 'resnet50_gcn' (checkpoint architecture: resnet18)" in str(e.value)


def test_lock_holder_is_this_process_while_a_run_writes(seg_run: Path) -> None:
    """The finished run's lock file names the process that trained it (this one, in the fixture)."""
    from engine.lock import holder_of

    holder = holder_of(seg_run)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
