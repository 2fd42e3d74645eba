"""Shared run infrastructure: configs, checkpoints, distributed env detection, signals."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from backbone.train import PretrainConfig
from engine import checkpoint as ckpt
from engine.config import ConfigError, dump_config, from_dict, load_config, to_dict
from engine.distributed import detect_env
from engine.logs import MetricsWriter, read_metrics
from engine.preemption import PreemptionFlag

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class A:
    lr: float = 0.5
    steps: int = 10
    name: str = "x"
    size: int | None = None


@dataclass
class B:
    lr: float = 0.1
    flag: bool = False
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class Cfg:
    a: A = field(default_factory=A)
    b: B = field(default_factory=B)


def test_defaults_file_and_overrides_in_order(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("a:\n  steps: 20\n  name: file\nb:\n  flag: true\n")
    cfg = load_config(Cfg, f, ["a.steps=30", "flag=false", "a.lr=1e-4", "sizes=[3, 4]", "a.size=null",
                               "name=2024"])
    assert cfg.a.steps == 30 and cfg.b.flag is False and cfg.a.lr == pytest.approx(1e-4)
    assert cfg.b.sizes == [3, 4] and cfg.a.size is None and cfg.a.name == "2024"
    assert cfg.b.lr == 0.1  # untouched default
    assert load_config(Cfg, None, ["a.steps=3"]).a.steps == 3


@pytest.mark.parametrize("override, words", [
    ("a.stpes=3", ["stpes", "a.steps", "Did you mean"]),
    ("nope=1", ["nope", "a.lr", "b.flag"]),
    ("lr=0.3", ["ambiguous", "a.lr", "b.lr"]),
    ("a.steps=abc", ["a.steps", "expected int", "abc"]),
    ("a.steps=1.5", ["a.steps", "expected int"]),
    ("b.flag=maybe", ["b.flag", "expected bool"]),
    ("a.steps", ["key=value"]),
])
def test_bad_overrides_name_the_problem(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_file_names_file_key_and_valid_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("a:\n  stesp: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'stesp'.*Valid keys: lr, steps, name, size"):
        load_config(Cfg, f)
    f.write_text("c:\n  x: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'c' at the top level.*Valid keys: a, b"):
        load_config(Cfg, f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "missing.yaml")


def test_a_whole_section_can_be_overridden_and_its_keys_are_checked() -> None:
    cfg = load_config(Cfg, None, ["b={flag: true, sizes: [5]}"])
    assert cfg.b.flag is True and cfg.b.sizes == [5] and cfg.b.lr == 0.1
    with pytest.raises(ConfigError, match=r"unknown config key 'flg' in section 'b'.*Did you mean 'flag'"):
        load_config(Cfg, None, ["b={flg: true}"])


@pytest.mark.parametrize("name", ["table6.yaml", "demo.yaml"])
def test_shipped_comparison_configs_load(name: str) -> None:
    from experiments.compare import CompareConfig

    cfg = load_config(CompareConfig, ROOT / "configs" / name)
    assert cfg.backbones == ["resnet50", "resnet50_gcn"] and cfg.heads == ["baseline", "gcn_br"]
    for stage in (cfg.pretrain, cfg.finetune):
        assert (ROOT / stage.config.replace("{backbone}", "resnet50_gcn")).is_file()


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Cfg, None, ["a.lr=0.25", "b.sizes=[7]"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert yaml.safe_load((tmp_path / "out.yaml").read_text()) == to_dict(cfg)
    assert load_config(Cfg, tmp_path / "out.yaml") == cfg == from_dict(Cfg, to_dict(cfg))


@pytest.mark.parametrize("path", sorted((ROOT / "configs/pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_pretrain_configs_load(path: Path) -> None:
    cfg = load_config(PretrainConfig, path)
    if path.stem not in ("tiny_cpu", "shapes_cpu"):
        model, epochs = path.stem.rsplit("_", 2)[0], int(path.stem.split("_")[-2])
        assert (cfg.model.name, cfg.train.epochs) == (model, epochs)
        assert cfg.optim.weight_decay == 1e-4  # every ffcv-imagenet rn50 config, 16 epochs included
        assert cfg.data.global_batch == 4096 and cfg.optim.lr == 1.7 and cfg.optim.lr_batch_size == 4096
        assert (cfg.resolution.min_res, cfg.resolution.max_res, cfg.resolution.val_res) == (160, 192, 256)
        assert cfg.optim.label_smoothing == 0.1 and cfg.optim.momentum == 0.9


# --- checkpoints --------------------------------------------------------------------------------
def test_checkpoints_atomic_latest_keep_and_never_overwritten(tmp_path: Path) -> None:
    for step in (3, 10, 7):
        ckpt.save_checkpoint({"step": step, "model_name": "m"}, tmp_path, step, keep=5)
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_000000010.pt"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    first = ckpt.checkpoint_path(tmp_path, 10).read_bytes()
    ckpt.save_checkpoint({"step": 999}, tmp_path, 10, keep=5)  # same step again: left as it was
    assert ckpt.checkpoint_path(tmp_path, 10).read_bytes() == first
    ckpt.save_checkpoint({"step": 11}, tmp_path, 11, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_000000010.pt",
                                                                "checkpoint_000000011.pt"]
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None


def test_failed_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.pt"
    ckpt.save_atomic({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    # an object that is neither a tensor nor a plain value is refused before anything is written (sealing)
    with pytest.raises(TypeError, match="cannot seal Unpicklable at 'v'"):
        ckpt.save_atomic({"v": Unpicklable()}, path)

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_atomic({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_other_model_checkpoint_is_refused(tmp_path: Path) -> None:
    path = ckpt.save_checkpoint({"model_name": "resnet50", "num_classes": 4}, tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError,
                       match=r"model_name='resnet50'.*model_name='resnet50_gcn'.*run\.dir"):
        ckpt.load_checkpoint(path, {"model_name": "resnet50_gcn", "num_classes": 4})
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(path)


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    import random

    import numpy as np

    ckpt.save_atomic({"rng": ckpt.capture_rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.restore_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


# --- distributed environment ----------------------------------------------------------------------
_ENV_KEYS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "SUBMITIT_EXECUTOR", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID",
             "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_JOB_ID", "SLURM_NODEID"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for k in _ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_env_single_process(clean_env: pytest.MonkeyPatch) -> None:
    env = detect_env()
    assert (env.rank, env.world_size, env.distributed) == (0, 1, False)


def test_env_torchrun(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="h0",
                     MASTER_PORT="1234").items():
        clean_env.setenv(k, v)
    env = detect_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == \
        (3, 8, 1, "h0", 1234, "torchrun")


def test_env_srun_multi_node(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_STEP_ID="0",
                     SLURM_JOB_NODELIST="gpu[07-08,11],cpu1", SLURM_JOB_NUM_NODES="4", SLURM_JOB_ID="4242",
                     SLURM_NODEID="2").items():
        clean_env.setenv(k, v)
    env = detect_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr) == \
        (5, 8, 1, 2, "gpu07")
    assert env.master_port == 20000 + 4242 % 40000 and env.source == "slurm (srun)"
    clean_env.delenv("SLURM_STEP_ID")  # the batch script itself: not a task of a distributed run
    assert detect_env().world_size == 1


# --- signals, metrics ---------------------------------------------------------------------------------
def test_signal_sets_flag_and_uninstall_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    flag = PreemptionFlag().install()
    try:
        assert not flag
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag and flag.signum == signal.SIGUSR1
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_metrics_only_rank0_and_json_safe(tmp_path: Path) -> None:
    MetricsWriter(tmp_path / "m.jsonl").write(step=1, loss=torch.tensor(0.5), bad=float("nan"))
    MetricsWriter(tmp_path / "other.jsonl", enabled=False).write(step=1)
    (rec,) = read_metrics(tmp_path / "m.jsonl")
    assert rec["step"] == 1 and rec["loss"] == 0.5 and rec["bad"] == "nan"
    assert not (tmp_path / "other.jsonl").exists()
