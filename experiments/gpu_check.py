"""Prove the GPU paths on a single-GPU machine in a few minutes: ``make gpu-check``.

    python -m experiments.gpu_check                 # on a machine with one CUDA GPU (exit 2 without one)
    python -m experiments.gpu_check --device cpu    # the same sequence on the CPU (GPU-only parts skipped)

The project runs on GPU clusters but is developed on CPUs, and a GPU is lent only now and then: this
script runs every CUDA path in one go and exits non-zero on any failure:

1. a small ImageNet-layout data set and its ``.beton`` files (``backbone.write_beton``);
2. ffcv's GPU pipeline (with cupy and pytorch_pfn_extras where they import, else the project's torch
   fallback, saying which), checked against the CPU pipeline on the same validation images;
3. bf16 autocast in channels_last against fp32, and ``torch.compile`` against eager;
4. a 1-rank NCCL process group with SyncBatchNorm under DDP;
5. a few steps of pretraining for both backbones through the real launcher path (``torchrun``, a process group,
   DDP, the global batch accumulated over two micro-batches), preempted at a step boundary and resumed, with
   ``train.amp=false`` and ``train.deterministic=true`` once each;
6. fine-tuning both backbones from those weights the same way (SyncBatchNorm, accumulation, preemption and resume),
   then multi-scale + flip evaluation;
7. a table of training throughput (images/s per GPU, data wait, MFU) of resnet50 vs resnet50_gcn at
   176 and 224 px from the trainer's own records, and the GCN/ResNet50 ratio in channels_last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.runner import CUBLAS_WORKSPACE

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("resnet50", "resnet50_gcn")
NOT_CHECKED = ("Not checked on one GPU: NCCL reductions between several GPUs and nodes (the all-reduce of "
               "gradients, SyncBatchNorm's statistics, the ranks agreeing on a signal), ffcv's per-rank shards, the "
               "data-loader threads of several ranks on one node. The CPU tests drive the same code with 2-3 gloo "
               "processes; `python -m experiments.compare --rehearse` checks them on your cluster.")
WORKERS = min(8, os.cpu_count() or 1)  # ffcv decoding threads (numba allows at most one per core)
SPEED_RESOLUTIONS = (176, 224)


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: str


class Checks:
    """Runs named checks, each in isolation: a failure is recorded with its traceback, the rest go on."""

    def __init__(self) -> None:
        self.done: list[Check] = []

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            detail, ok = fn(), True
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the others
            traceback.print_exc()
            detail, ok = f"{type(e).__name__}: {e}".splitlines()[0][:160], False
        self.done.append(Check(name, ok, time.monotonic() - t0, detail))
        print(f"   {'ok' if ok else 'FAILED'} ({time.monotonic() - t0:.0f} s): {detail}", flush=True)
        return ok

    def table(self) -> str:
        width = max(len(c.name) for c in self.done)
        lines = [f"{'check':<{width}}  result   time  detail", f"{'-' * width}  ------  -----  ------"]
        lines += [f"{c.name:<{width}}  {'ok' if c.ok else 'FAILED':<6}  {c.seconds:4.0f}s  {c.detail}"
                  for c in self.done]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def write_data(root: Path, classes: int, per_class: int, val_per_class: int) -> dict[str, Path]:
    """Synthetic ImageNet folders (class-coloured noise, 160-320 px) and their .beton files."""
    import numpy as np
    from PIL import Image

    from backbone.write_beton import WriterSettings, write_beton

    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(0, 256, 3)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(160, 321, 2))
                pixels = np.clip(colour + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:05d}.JPEG", quality=90)
        out[split] = root / f"{split}.beton"
        write_beton(root / "imagenet" / split, out[split], WriterSettings(max_resolution=320),
                    num_workers=min(8, os.cpu_count() or 1), overwrite=True)
    return out


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------
def check_environment(device: torch.device) -> str:
    from engine.complexity import device_peak_flops

    if device.type != "cuda":
        return f"torch {torch.__version__}, CPU run (GPU-only checks skipped)"
    props = torch.cuda.get_device_properties(device)
    peak = device_peak_flops(device)
    assert torch.cuda.is_bf16_supported(), "this GPU has no bf16: the recipe's autocast needs it"
    return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name}, {props.total_memory / 2**30:.0f} "
            f"GiB, sm_{props.major}{props.minor}, bf16 peak "
            + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (MFU will be n/a: add it to PEAK_BF16_TFLOPS)"))


def check_ffcv_pipeline(betons: dict[str, Path], device: torch.device) -> str:
    from backbone.data import ffcv_gpu_normalize_available, make_train_loader, make_val_loader

    kind = "cupy NormalizeImage" if ffcv_gpu_normalize_available() else \
        "torch fallback (cupy or pytorch_pfn_extras missing)"
    train = make_train_loader(betons["train"], batch_size=64, num_workers=WORKERS, resolution=160, device=device)
    n = 0
    for images, labels in train:
        assert images.device.type == device.type and labels.device.type == device.type
        assert images.is_contiguous(memory_format=torch.channels_last) and images.shape[1:] == (3, 160, 160)
        assert images.dtype == (torch.float16 if device.type == "cuda" else torch.float32)
        n += images.shape[0]
    assert n > 0
    if device.type != "cuda":
        return f"{n} training images on the CPU pipeline"
    # the same validation images through both pipelines: the GPU normalisation must match the CPU one
    gpu = make_val_loader(betons["val"], batch_size=32, num_workers=WORKERS, resolution=160, device=device)
    cpu = make_val_loader(betons["val"], batch_size=32, num_workers=WORKERS, resolution=160, device=torch.device("cpu"))
    worst = 0.0
    for (xg, yg), (xc, yc) in zip(gpu, cpu, strict=True):
        assert torch.equal(yg.cpu(), yc)
        worst = max(worst, float((xg.float().cpu() - xc).abs().max()))
    assert worst < 0.02, f"GPU and CPU pipelines differ by {worst:.3g} (normalised units)"
    return f"{kind}; {n} training images; val batches match the CPU pipeline within {worst:.1e}"


def _model(name: str, device: torch.device) -> torch.nn.Module:
    from backbone.models import create_backbone

    torch.manual_seed(0)
    return create_backbone(name, num_classes=10, anti_aliasing="blurpool").to(device, memory_format=torch.channels_last)


def check_autocast(device: torch.device) -> str:
    from engine.loop import autocast

    model = _model("resnet50_gcn", device).eval()
    x = torch.randn(8, 3, 160, 160, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x).float()
        with autocast(device, torch.bfloat16 if device.type == "cuda" else None):
            out = model(x)
    if device.type == "cuda":
        assert out.dtype == torch.bfloat16, f"autocast gave {out.dtype}"
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    assert err < 0.05, f"bf16 logits differ from fp32 by {err:.3g} (relative)"
    return f"logits {out.dtype}, relative difference to fp32 {err:.2e}"


def check_compile(device: torch.device) -> str:
    model = _model("resnet50_gcn", device).train()
    compiled = torch.compile(model)
    x = torch.randn(8, 3, 128, 128, device=device).contiguous(memory_format=torch.channels_last)
    t0 = time.monotonic()
    loss_c = compiled(x).float().logsumexp(1).mean()
    loss_c.backward()
    first = time.monotonic() - t0
    loss_e = model(x).float().logsumexp(1).mean()
    diff = abs(float(loss_c) - float(loss_e))
    assert diff < 1e-2 * max(1.0, abs(float(loss_e))), f"compiled loss {float(loss_c)} vs eager {float(loss_e)}"
    return f"inductor, first step (compile) {first:.0f} s, loss matches eager within {diff:.1e}"


def check_nccl_syncbn(device: torch.device) -> str:
    import torch.distributed as dist
    from torch import nn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device)
    try:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(_model("resnet50", device))
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        x = torch.randn(8, 3, 128, 128, device=device).contiguous(memory_format=torch.channels_last)
        for _ in range(2):
            opt.zero_grad()
            ddp(x).float().logsumexp(1).mean().backward()
            opt.step()
        t = torch.ones(1, device=device)
        dist.all_reduce(t)
        n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        assert n_sync > 0 and float(t) == 1.0
        return f"{dist.get_backend()} process group, {n_sync} SyncBatchNorm layers, 2 DDP steps"
    finally:
        dist.destroy_process_group()


# Every stage runs as a child through the real launcher path, as on a cluster: torchrun, one process per GPU (one
# here), a process group (NCCL), DDP, SyncBatchNorm (fine-tuning), gradient accumulation (pretraining: the global
# batch in two micro-batches) and a preemption at a step boundary (run.preempt_at_step: the checkpoint, exit, then
# the same command resumes).
ACCUMULATION = ["data.max_batch_per_process=32"]  # data.global_batch=64 on one process: 2 micro-batches of 32


def launch(entry: Sequence[str], overrides: Sequence[str], run_dir: Path) -> int:
    """``torchrun --standalone --nproc-per-node 1 ENTRY OVERRIDES``; returns the exit code (output: this process's)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", *entry, *overrides]
    print("   $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr).returncode


def launched_path(run_dir: Path, *expected: str) -> str:
    """What train.log says of the launcher path (it must name each of ``expected``)."""
    text = (run_dir / "train.log").read_text()
    missing = [e for e in expected if e not in text]
    assert not missing, f"{run_dir / 'train.log'} does not mention {missing}: not the launcher's path"
    return ", ".join(expected)


def pretrain(betons: dict[str, Path], run_dir: Path, device: torch.device, name: str, *extra: str) -> int:
    return launch(["-m", "backbone.train"], [
        f"model.name={name}", f"data.train={betons['train']}", f"data.val={betons['val']}", f"run.dir={run_dir}",
        "data.global_batch=64", "data.val_batch_size=64", f"data.num_workers={WORKERS}", "optim.lr_batch_size=256",
        "optim.lr=0.4", "train.epochs=2", "resolution.min_res=128", "resolution.max_res=160",
        "resolution.start_ramp=0", "resolution.end_ramp=1", "resolution.val_res=160", "run.check_every_steps=5",
        f"train.device={device.type}", "run.log_every_s=15", *extra], run_dir)


def check_pretraining(betons: dict[str, Path], work: Path, device: torch.device, name: str,
                      extra: Sequence[str] = ()) -> str:
    """``extra``: overrides last (the CPU test shrinks the run with them)."""
    from backbone.artifacts import load_backbone
    from engine.logs import read_metrics

    run_dir = work / "pretrain" / name
    assert pretrain(betons, run_dir, device, name, *ACCUMULATION, "run.preempt_at_step=3", *extra) != 0, \
        "the run did not stop at its preemption"
    assert pretrain(betons, run_dir, device, name, *ACCUMULATION, *extra) == 0, "the resumed run failed"
    path = launched_path(run_dir, "process group", "accumulated over 2 micro-batches", "resumed from checkpoint")
    model, meta = load_backbone(run_dir / "final.pth")
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    protocol = json.loads((run_dir / "eval_imagenet_224_crop0.875.json").read_text())
    mfu = train[-1]["mfu"]
    if device.type == "cuda":
        assert mfu is None or 0 < mfu < 1, f"MFU {mfu}"
    return (f"torchrun ({path}): preempted at step 3, resumed, finished: {train[-1]['img_per_s_per_process']:.0f} "
            f"img/s per process, data wait {100 * train[-1]['data_wait']:.0f} %, MFU "
            f"{'n/a' if mfu is None else f'{100 * mfu:.0f} %'}; Table 6 protocol top-5 error "
            f"{100 * protocol['top5_error']:.1f} %; final.pth rebuilds ({meta.get('model_kwargs')})")


def check_fp32_and_deterministic(betons: dict[str, Path], work: Path, device: torch.device) -> str:
    assert pretrain(betons, work / "fp32", device, "resnet50", "train.amp=false", "train.epochs=1") == 0
    # what is checked: every kernel of both stages runs in deterministic mode (no "does not have a deterministic
    # implementation" error) with cuBLAS's workspace set before any CUDA work, pretraining here and fine-tuning below
    assert pretrain(betons, work / "det", device, "resnet50", "train.deterministic=true", "train.epochs=1") == 0
    return "train.amp=false trains with fp32 batches; train.deterministic=true runs (cuBLAS workspace set)"


def check_finetuning(work: Path, device: torch.device, name: str, extra: Sequence[str] = ()) -> str:
    """Fine-tunes ``name`` from its pretraining's final.pth; ``extra``: overrides last."""
    from experiments.shapes import ShapesSpec, write_shapes
    from segmentation import evaluate

    data = work / "shapes"
    if not (data / "shapes.json").exists():
        write_shapes(data, ShapesSpec(train_per_class=4, val_per_class=2, voc_train=24, voc_val=12, sbd=48),
                     progress=False)
    run_dir = work / "finetune" / name
    overrides = [
        f"model.backbone={name}", "model.head=gcn_br", "model.kernel_size=7",
        f"model.pretrained={work / 'pretrain' / name / 'final.pth'}", f"data.root={data / 'VOCdevkit'}",
        f"data.sbd_root={data / 'benchmark_RELEASE'}", "data.crop_size=128", "data.global_batch=8",
        "data.max_batch_per_process=4", f"data.num_workers={WORKERS}", "train.iterations=12", "eval.every=0",
        "run.checkpoint_every=4", "run.check_every_steps=2", f"run.dir={run_dir}", f"train.device={device.type}",
        # the GCN network's kernels in deterministic mode (the 2-D cross-entropy has none on CUDA)
        f"train.deterministic={str(name == 'resnet50_gcn').lower()}", *extra]
    entry = [str(ROOT / "segmentation" / "finetune.py")]
    assert launch(entry, [*overrides, "run.preempt_at_step=5"], run_dir) != 0, "the run did not stop at its preemption"
    assert launch(entry, overrides, run_dir) == 0, "the resumed run failed"
    path = launched_path(run_dir, "process group", "SyncBatchNorm", "accumulated over 2 micro-batches",
                         "resumed from checkpoint")
    out = run_dir / "eval_ms_flip.json"
    with contextlib.redirect_stdout(sys.stderr):
        rc = evaluate.main(["--checkpoint", str(run_dir / "final.pth"), "--ms", "--flip", "--out", str(out),
                            "--device", device.type])
    assert rc == 0, f"evaluation exit {rc}"
    scores = json.loads(out.read_text())
    return (f"torchrun ({path}): preempted, resumed, finished; MS + flip mIoU {100 * scores['miou']:.1f} % on "
            f"{scores['images']} images")


def throughput(betons: dict[str, Path], work: Path, device: torch.device) -> list[dict[str, Any]]:
    """Steady-state training speed of both backbones at each resolution, from the trainer's records."""
    from engine.logs import read_metrics

    rows = []
    for res in SPEED_RESOLUTIONS:
        for name in BACKBONES:
            run_dir = work / "speed" / f"{name}_{res}"
            rc = pretrain(betons, run_dir, device, name, "train.epochs=3", f"resolution.min_res={res}",
                          f"resolution.max_res={res}", "data.global_batch=128", "run.check_every_steps=4",
                          "train.eval_every=100")
            if rc != 0:
                raise RuntimeError(f"{name} at {res} px: exit {rc}")
            train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][2:]  # warm-up out
            if not train:
                raise RuntimeError(f"{name} at {res} px wrote too few training records")
            rows.append({"backbone": name, "resolution": res,
                         "img_per_s": sum(r["img_per_s_per_process"] for r in train) / len(train),
                         "data_wait": sum(r["data_wait"] for r in train) / len(train),
                         "mfu": None if train[-1]["mfu"] is None else sum(r["mfu"] for r in train) / len(train)})
    return rows


def format_throughput(rows: Sequence[dict[str, Any]], unit: str = "GPU") -> str:
    lines = [f"{'backbone':<14} {'px':>4} {'img/s per ' + unit:>16} {'data wait':>10} {'MFU':>6}",
             "-" * 55]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.0f} %"
        lines.append(f"{r['backbone']:<14} {r['resolution']:>4} {r['img_per_s']:>16,.0f} "
                     f"{100 * r['data_wait']:>9.0f} % {mfu:>6}")
    by = {(r["backbone"], r["resolution"]): r["img_per_s"] for r in rows}
    for res in sorted({r["resolution"] for r in rows}):
        if ("resnet50", res) in by and ("resnet50_gcn", res) in by:
            lines.append(f"resnet50_gcn / resnet50 at {res} px (channels_last): "
                         f"{by[('resnet50_gcn', res)] / by[('resnet50', res)]:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the same sequence without the GPU-only checks (a dry run of this script)")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    p.add_argument("--skip-speed", action="store_true", help="leave out the throughput table")
    args = p.parse_args(argv)
    # cuBLAS reads its workspace setting once per process, when its first handle is made: set it before any CUDA
    # work, or the deterministic check (and any deterministic run in this process) fails
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device on this machine, so there is nothing to check here. Run this on "
              "a machine with one GPU (or --device cpu for a dry run of the script).", file=sys.stderr)
        return 2
    from engine.logs import setup_logging

    setup_logging()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        checks = Checks()
        checks.run("environment", lambda: check_environment(device))
        betons: dict[str, Path] = {}

        def data() -> str:
            per_class = 128 if device.type == "cuda" else 16
            betons.update(write_data(work / "data", classes=8, per_class=per_class, val_per_class=16))
            return f"8 classes x {per_class} training images, x 16 validation images"

        have_data = checks.run("data (.beton files)", data)
        if have_data:
            checks.run("ffcv pipeline on the device", lambda: check_ffcv_pipeline(betons, device))
        checks.run("bf16 autocast, channels_last", lambda: check_autocast(device))
        if device.type == "cuda":
            checks.run("torch.compile", lambda: check_compile(device))
            checks.run("NCCL + SyncBatchNorm", lambda: check_nccl_syncbn(device))
        rows: list[dict[str, Any]] = []
        if have_data:
            for name in BACKBONES:
                if checks.run(f"pretraining {name} + resume",
                              lambda n=name: check_pretraining(betons, work, device, n)):
                    checks.run(f"fine-tuning {name} + resume, MS + flip",
                               lambda n=name: check_finetuning(work, device, n))
            checks.run("amp=false, deterministic=true", lambda: check_fp32_and_deterministic(betons, work, device))
            if not args.skip_speed:
                def speed() -> str:
                    rows.extend(throughput(betons, work, device))
                    return f"{len(rows)} runs"

                checks.run("throughput", speed)
    print("\n" + checks.table())
    if rows:
        print("\n" + format_throughput(rows, "GPU" if device.type == "cuda" else "process"))
    print("\n" + NOT_CHECKED)
    failed = [c.name for c in checks.done if not c.ok]
    print(f"\ngpu-check {'FAILED: ' + ', '.join(failed) if failed else 'passed'} in {time.monotonic() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
