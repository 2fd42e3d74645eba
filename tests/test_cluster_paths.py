"""The code paths a GPU cluster takes, driven on the CPU: process groups of 1-3 gloo ranks started by torchrun,
SyncBatchNorm, FLOP counting under a process group, gradient accumulation on the real ffcv loader with a slow
consumer, each validation image counted once under DDP, allocated-but-unusable GPUs, the loader thread's device.

Each test here failed on the code before the defect it names was fixed (issue 21)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hangs import PYTHON, ROOT, run_watched
from seg_fixtures import make_voc
from torch import nn

from engine import distributed as distrib
from engine.batchnorm import SYNCED, CPUSyncBatchNorm, convert_sync_batchnorm
from engine.complexity import TrainFlops
from engine.config import ConfigError, load_config
from engine.loop import BatchSplit, MicroBatches, split_batch

TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone"]


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS`` on this machine's gloo (hangs found by lack of progress)."""
    return run_watched([*TORCHRUN, f"--nproc-per-node={nproc}", *args], env={**os.environ, **(env or {})})


@pytest.fixture
def process_group():
    """A 1-rank gloo process group in this process (what every launched job has), torn down afterwards."""
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# --- defect 1: FLOP counting of a SyncBatchNorm network under a process group ---------------------------------
@pytest.mark.parametrize("convert", [nn.SyncBatchNorm.convert_sync_batchnorm,
                                     lambda m: convert_sync_batchnorm(m, torch.device("cpu"))], ids=["torch", "engine"])
def test_train_flops_of_a_sync_batchnorm_network_under_a_process_group(process_group, convert) -> None:
    import timm

    plain = timm.create_model("resnet18", num_classes=4)
    expected = TrainFlops(plain)(3, 32, 32)
    synced = convert(timm.create_model("resnet18", num_classes=4))
    assert TrainFlops(synced)(3, 32, 32) == expected > 0  # was: ValueError, SyncBatchNorm expected input on GPU
    assert any(isinstance(m, SYNCED) for m in synced.modules())  # the model itself keeps its layers


def test_sync_batchnorm_on_the_cpu_equals_batchnorm_on_the_whole_batch_one_rank(process_group) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -1, 1)
    synced = convert_sync_batchnorm(nn.Sequential(copy.deepcopy(bn)), torch.device("cpu"))[0]
    assert type(synced) is CPUSyncBatchNorm
    assert type(convert_sync_batchnorm(nn.Sequential(copy.deepcopy(bn)), torch.device("cuda"))[0]) is nn.SyncBatchNorm
    x = torch.randn(6, 5, 4, 3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w = torch.randn(6, 5, 4, 3)
    (bn(x) * w).sum().backward()
    (synced(x2) * w).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(synced.weight.grad, bn.weight.grad)
    torch.testing.assert_close(synced.running_var, bn.running_var)  # unbiased, as torch's
    torch.testing.assert_close(synced.running_mean, bn.running_mean)
    synced.eval()
    bn.eval()
    torch.testing.assert_close(synced(x.detach()), bn(x.detach()))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["syncbn", "accumulation"])
def test_two_gloo_ranks_train_like_one_process_on_the_global_batch(scenario: str, tmp_path: Path) -> None:
    """SyncBatchNorm + DDP, and DDP + accumulation: after one step both ranks hold the weights one process gets
    on the whole batch (catches a loss not divided by the micro-batches, ``no_sync`` on the wrong one, BatchNorm
    statistics of one rank)."""
    done = torchrun(2, "-m", "children.gloo_ranks", scenario, str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = [json.loads((tmp_path / f"{scenario}_{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2] and results[0]["pid"] != results[1]["pid"]
    for r in results:
        assert r["state_diff"] < 1e-5, r
        assert r.get("rank_spread", 0.0) == 0.0, r  # DDP: the very same weights on every rank
        assert r.get("accumulation", 2) == 2


# --- defect 2 and the accumulation recipe ----------------------------------------------------------------------
@pytest.mark.parametrize(("global_batch", "world", "limit", "expected"), [
    (4096, 16, 0, BatchSplit(4096, 16, 256, 256, 1)),
    (4096, 16, 128, BatchSplit(4096, 16, 256, 128, 2)),
    (4096, 16, 100, BatchSplit(4096, 16, 256, 64, 4)),  # the fewest equal micro-batches that fit: 3 does not divide
    (64, 8, 8, BatchSplit(64, 8, 8, 8, 1)),
    (96, 8, 5, BatchSplit(96, 8, 12, 4, 3)),
    (10, 2, 1, BatchSplit(10, 2, 5, 1, 5)),
])
def test_split_batch(global_batch: int, world: int, limit: int, expected: BatchSplit) -> None:
    got = split_batch(global_batch, world, limit)
    assert got == expected
    assert got.micro_batch * got.accumulation * got.world_size == global_batch
    assert limit == 0 or got.micro_batch <= limit


def test_split_batch_refuses_an_uneven_split() -> None:
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 processes"):
        split_batch(64, 3)


def test_micro_batches_are_drawn_one_at_a_time() -> None:
    """A micro-batch is drawn only when the step asks for it: a loader that reuses its buffers (ffcv) cannot
    overwrite one the step holds but has not trained on yet."""
    drawn: list[int] = []

    def source():
        for i in range(10):
            drawn.append(i)
            yield i

    it = source()
    waits: list[float] = []
    group = MicroBatches(next(it), it, 3, waits.append)
    seen = []
    for b in group:
        seen.append(b)
        assert drawn == list(range(b + 1))  # nothing drawn ahead of the step
    assert seen == [0, 1, 2] and len(waits) == 2 and group.taken == 3
    with pytest.raises(RuntimeError, match="only once"):
        list(group)
    short = MicroBatches(8, iter([9]), 3, waits.append)
    with pytest.raises(RuntimeError, match="ended inside an optimiser step"):
        list(short)


@pytest.fixture(scope="module")
def accumulated(pretrain_betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Two pretrainings of a BatchNorm-free timm model (test_convnext: LayerNorm, per image) on the same global
    batch of 16: one in two micro-batches of 8, each forward pass made slow so that the ffcv loader runs ahead,
    one without accumulation. Records what every forward pass trained on."""
    import backbone.train as train

    base = tmp_path_factory.mktemp("accumulation")
    seen: dict[str, list[tuple[list[int], np.ndarray]]] = {}
    real_loss = train.Trainer.loss

    def run(name: str, *extra: str, slow: bool = False) -> Path:
        seen[name] = []

        def loss(self, batch):
            images, labels = batch
            if slow:
                time.sleep(0.2)  # the loader fills its queue and reuses the buffers of batches handed out earlier
            seen[name].append((labels.tolist(), images.mean(dim=(2, 3)).numpy().copy()))
            return real_loss(self, batch)

        cfg = load_config(train.PretrainConfig, ROOT / "configs/pretrain/tiny_cpu.yaml", [
            f"data.train={pretrain_betons['train']}", f"data.val={pretrain_betons['val']}", f"run.dir={base / name}",
            "model.name=test_convnext", "model.blurpool=false", "train.epochs=1", "data.global_batch=16",
            "resolution.max_res=32", "resolution.val_res=32", *extra])
        train.Trainer.loss = loss
        try:
            assert train.run(cfg) == "finished"
        finally:
            train.Trainer.loss = real_loss
        return base / name

    dirs = {"accumulated": run("accumulated", "data.max_batch_per_process=8", slow=True), "whole": run("whole")}
    return dirs, seen


def _epoch_reference(beton: Path, batch_size: int) -> list[tuple[list[int], np.ndarray]]:
    """What the loader produces for epoch 0 (seed 0, 32 px), read by a fast consumer that copies each batch."""
    from backbone.data import make_train_loader, set_epoch

    loader = make_train_loader(beton, batch_size=batch_size, num_workers=1, resolution=32,
                               device=torch.device("cpu"), seed=0, dtype=torch.float32)
    set_epoch(loader, 0)
    return [(y.tolist(), x.mean(dim=(2, 3)).numpy().copy()) for x, y in loader]


@pytest.mark.slow
def test_accumulation_trains_on_the_batches_the_loader_produced(accumulated, pretrain_betons) -> None:
    _, seen = accumulated
    trained = seen["accumulated"]
    assert trained and all(len(labels) == 8 for labels, _ in trained)  # the loader gives micro-batches of 8
    reference = _epoch_reference(pretrain_betons["train"], 8)
    assert len(trained) == len(reference) == 16  # 128 images: 8 steps x 2 micro-batches
    for k, ((labels, means), (ref_labels, ref_means)) in enumerate(zip(trained, reference, strict=True)):
        assert labels == ref_labels, f"micro-batch {k} trained on other images than the loader produced for it"
        np.testing.assert_allclose(means, ref_means, atol=1e-4, err_msg=f"micro-batch {k}")


@pytest.mark.slow
def test_accumulation_gives_the_weights_of_the_whole_batch(accumulated) -> None:
    from backbone.artifacts import FinalWeights

    dirs, seen = accumulated
    assert len(seen["whole"]) == 8 and all(len(labels) == 16 for labels, _ in seen["whole"])
    a = FinalWeights.load(dirs["accumulated"] / "final.pth").state_dict
    b = FinalWeights.load(dirs["whole"] / "final.pth").state_dict
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    log = (dirs["accumulated"] / "train.log").read_text()
    assert "accumulated over 2 micro-batches of 8" in log


# --- a multi-process fine-tune on the CPU: SyncBatchNorm, accumulation, FLOP counting ------------------------
@pytest.mark.slow
def test_two_rank_finetune_with_sync_batchnorm_accumulation_and_flop_counting(tmp_path: Path) -> None:
    devkit = make_voc(tmp_path / "voc", n_train=8, n_val=2)
    run_dir = tmp_path / "run"
    done = torchrun(2, str(ROOT / "segmentation" / "finetune.py"), "--config",
                    str(ROOT / "configs/segmentation/tiny_cpu.yaml"), f"data.root={devkit}", f"run.dir={run_dir}",
                    "data.global_batch=4", "data.max_batch_per_process=1", "train.iterations=3", "eval.every=0",
                    "run.checkpoint_every=2", "run.check_every_steps=1",
                    env={"LKM_PEAK_TFLOPS": "0.5"})  # a known peak: MFU, hence FLOP counting, as on every GPU
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    log = (run_dir / "train.log").read_text()
    assert "via torchrun, gloo process group" in log and "SyncBatchNorm layers" in log
    assert "accumulated over 2 micro-batches of 1" in log
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in line]
    assert train and all(r["mfu"] is not None and 0 < r["mfu"] for r in train)
    assert (run_dir / "final.pth").exists()


# --- defects 5 and 6: each validation image once, one writer --------------------------------------------------
@pytest.mark.slow
def test_backbone_evaluate_on_three_ranks_counts_each_image_once(pretrain_straight: Path, pretrain_betons,
                                                                 tmp_path: Path) -> None:
    n = json.loads(pretrain_betons["val"].with_suffix(".json").read_text())["num_images"]
    assert n % 3 != 0  # ffcv's distributed order would pad this set
    out = tmp_path / "scores.json"
    single = tmp_path / "single.json"
    done = torchrun(3, "-m", "backbone.evaluate", "--weights", str(pretrain_straight / "final.pth"), "--data",
                    str(pretrain_betons["val"]), "--resolution", "64", "--workers", "1", "--batch-size", "5",
                    "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.count("top-1 error") == 1  # rank 0 reports and writes, once
    scores = json.loads(out.read_text())
    assert scores["images"] == n
    alone = run_watched([PYTHON, "-m", "backbone.evaluate", "--weights", str(pretrain_straight / "final.pth"),
                         "--data", str(pretrain_betons["val"]), "--resolution", "64", "--workers", "1",
                         "--out", str(single)], check=True)
    assert alone.returncode == 0
    one = json.loads(single.read_text())
    for key in ("top1", "top5", "images"):
        assert scores[key] == pytest.approx(one[key]), key
    assert scores["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.slow
def test_validation_on_three_ranks_counts_each_image_once(pretrain_betons, tmp_path: Path) -> None:
    n = json.loads(pretrain_betons["val"].with_suffix(".json").read_text())["num_images"]
    assert n % 3 != 0
    done = torchrun(3, "-m", "children.gloo_ranks", "validation", str(tmp_path), str(pretrain_betons["val"]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = [json.loads((tmp_path / f"validation_{r}.json").read_text()) for r in range(3)]
    assert sum(r["labels_seen"] for r in results) == n  # was n + 1: ffcv pads the set to a multiple of 3
    assert all(r["images"] == n for r in results)


@pytest.mark.parametrize(("n", "world"), [(32, 3), (7, 3), (3, 3), (100, 16)])
def test_val_shards_cover_every_image_once(n: int, world: int) -> None:
    from backbone.data import val_shard

    shards = [val_shard(n, r, world) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --- defect 4: GPUs allocated, none usable --------------------------------------------------------------------
@pytest.mark.parametrize(("variables", "refused"), [
    ({"SLURM_GPUS_ON_NODE": "8"}, True),
    ({"SLURM_JOB_GPUS": "0,1"}, True),
    ({"CUDA_VISIBLE_DEVICES": "0"}, True),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, True),
    ({"SLURM_GPUS_ON_NODE": "0"}, False),
    ({"CUDA_VISIBLE_DEVICES": ""}, False),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, False),
    ({}, False),
])
def test_allocated_gpus_that_torch_cannot_see_stop_the_run(monkeypatch, variables, refused) -> None:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS", "SLURM_JOB_GPUS",
                "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = distrib.DistEnv()
    if refused:
        with pytest.raises(ConfigError) as e:
            distrib.select_device(env, "auto")
        text = str(e.value)
        assert next(iter(variables)) in text and f"torch {torch.__version__}" in text
        assert "train.device=cpu" in text and "driver" in text
    else:
        assert distrib.select_device(env, "auto") == torch.device("cpu")
    assert distrib.select_device(env, "cpu") == torch.device("cpu")  # on purpose: always allowed


@pytest.mark.slow
def test_pretraining_with_allocated_gpus_and_none_usable_stops_with_one_line(pretrain_betons, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    done = run_watched([PYTHON, "-m", "backbone.train", "--config", str(ROOT / "configs/pretrain/tiny_cpu.yaml"),
                        f"data.train={pretrain_betons['train']}", f"data.val={pretrain_betons['val']}",
                        f"run.dir={tmp_path / 'run'}", "train.device=auto"],
                       env={**os.environ, "SLURM_GPUS_ON_NODE": "4"})
    assert done.returncode == 2, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "SLURM_GPUS_ON_NODE=4" in error[0] and "train.device=cpu" in error[0]
    assert "Traceback" not in done.stderr


# --- defect 7: the GPU check's deterministic runs ------------------------------------------------------------
def test_gpu_check_sets_the_cublas_workspace_before_any_check(monkeypatch) -> None:
    from experiments import gpu_check

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen: list[str | None] = []

    def first_check(self, name, fn):
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise SystemExit(0)

    monkeypatch.setattr(gpu_check.Checks, "run", first_check)
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])
    assert seen == [":4096:8"]


# --- defect 9: the loader thread's device, cuDNN's benchmark flag ----------------------------------------------
def test_loader_thread_works_on_the_loader_device(pretrain_betons, monkeypatch) -> None:
    from backbone.data import make_val_loader

    loader = make_val_loader(pretrain_betons["val"], batch_size=8, num_workers=1, resolution=16,
                             device=torch.device("cpu"), dtype=torch.float32)
    calls: list[tuple[object, str]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((d, threading.current_thread().name)))
    loader.device = torch.device("cuda", 3)  # only the thread's binding reads it; the pipeline stays the CPU's
    assert sum(len(y) for _, y in loader) == 32
    assert calls and calls[0][0] == torch.device("cuda", 3) and calls[0][1] != threading.current_thread().name


@dataclasses.dataclass
class _Run:
    dir: str = ""


@dataclasses.dataclass
class _Train:
    seed: int = 0
    deterministic: bool = False
    device: str = "cpu"


@dataclasses.dataclass
class _Stage:
    run: _Run = dataclasses.field(default_factory=_Run)
    train: _Train = dataclasses.field(default_factory=_Train)


def test_a_run_leaves_cudnn_benchmark_as_it_found_it(tmp_path) -> None:
    from engine.runner import RunDirState, RunStatus, run_stage

    class Done:
        def fit(self) -> RunStatus:
            return RunStatus.FINISHED

        def write_final(self) -> Path:
            return tmp_path / "final.pth"

    try:
        for before in (False, True):
            torch.backends.cudnn.benchmark = before
            cfg = _Stage(_Run(str(tmp_path / f"run{before}")))
            assert run_stage(cfg, RunDirState(None, False), lambda *a: Done()) is RunStatus.FINISHED
            assert torch.backends.cudnn.benchmark is before  # was: True after any non-deterministic run
    finally:
        torch.backends.cudnn.benchmark = False


def test_launched_single_process_takes_the_distributed_path(monkeypatch) -> None:
    """torchrun --nproc-per-node 1 (a 1-GPU job): a process group, DDP and SyncBatchNorm, as with many."""
    for key in ("RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert not distrib.detect_env().distributed
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    env = distrib.detect_env()
    assert env.world_size == 1 and env.launched and env.distributed
    assert sys.modules["engine.distributed"] is distrib


# --- defect 8: the GPU check takes the launcher's path ----------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_runs_both_stages_through_torchrun_with_accumulation_and_a_preemption(pretrain_betons,
                                                                                       tmp_path) -> None:
    """The GPU check's stage checks, shrunk to the CPU: torchrun, a process group, DDP, SyncBatchNorm, two
    micro-batches per step, a preemption at a step boundary and the resume (before: in-process, one process, no
    process group, no accumulation)."""
    from experiments import gpu_check

    cpu = torch.device("cpu")
    small = ["data.num_workers=1", "data.global_batch=16", "data.max_batch_per_process=8", "data.val_batch_size=16",
             "resolution.min_res=32", "resolution.max_res=32", "resolution.val_res=32", "train.epochs=1"]
    detail = gpu_check.check_pretraining(pretrain_betons, tmp_path, cpu, "resnet10t", extra=small)
    assert detail.startswith("torchrun (process group, accumulated over 2 micro-batches, resumed from checkpoint)")
    detail = gpu_check.check_finetuning(tmp_path, cpu, "resnet10t", extra=[
        "data.crop_size=48", "data.num_workers=0", "train.iterations=6", "model.kernel_size=7"])
    assert detail.startswith("torchrun (process group, SyncBatchNorm, accumulated over 2 micro-batches, resumed")
    log = (tmp_path / "finetune" / "resnet10t" / "train.log").read_text()
    assert "SyncBatchNorm layers (CPUSyncBatchNorm)" in log and "preempt_at_step=5" in log


# --- the device and process-group choices a GPU job makes, with the device facts monkeypatched ----------------
def test_a_gpu_process_takes_the_gpu_of_its_local_rank(monkeypatch) -> None:
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for local_rank, expected in ((0, 0), (3, 3), (5, 1)):  # 8 tasks on a node that shows each task 4 GPUs
        env = distrib.DistEnv(rank=local_rank, world_size=8, local_rank=local_rank, source="torchrun")
        assert distrib.select_device(env, "auto") == torch.device("cuda", expected)
    assert chosen == [torch.device("cuda", i) for i in (0, 3, 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: each task sees its own
    assert distrib.select_device(distrib.DistEnv(rank=5, world_size=8, local_rank=5), "cuda") == torch.device("cuda", 0)


def test_a_gpu_process_group_is_nccl_bound_to_its_device(monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    env = distrib.DistEnv(rank=1, world_size=2, local_rank=1, master_addr="10.0.0.1", master_port=23456,
                          source="slurm (srun)")
    distrib.init(env, torch.device("cuda", 1))
    distrib.init(env, torch.device("cpu"))
    single = distrib.DistEnv()
    distrib.init(single, torch.device("cpu"))  # one process, no launcher: no group
    assert [(c["backend"], c["device_id"], c["rank"], c["world_size"]) for c in calls] == [
        ("nccl", torch.device("cuda", 1), 1, 2), ("gloo", None, 1, 2)]
    assert calls[0]["init_method"] == "tcp://10.0.0.1:23456"
