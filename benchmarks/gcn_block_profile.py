"""Where the time of res-4 / res-5 goes: resnet50_gcn's GCN blocks vs resnet50's bottlenecks, per op.

Forward + backward (a training step's work) of each piece, with the shapes it has inside the network
at ``--res`` px and ``--batch`` images, in NCHW and in channels_last. Every case runs once per round,
rounds are interleaved and the median is kept, so load from other processes hits all cases alike.

Three tables:

1. stages: ``layer3`` and ``layer4`` of both networks, as built by the trainers (``create_backbone``,
   BlurPool on by default), whole;
2. blocks: one stage's first block (strided, projection shortcut) and one later block;
3. ops inside a GCN block: each 1xk / kx1 conv (+BN+ReLU), the merge (concat + 1x1 conv or the
   split 1x1 convs summed), the blur, beside the bottleneck's convs at the same place.

    python benchmarks/gcn_block_profile.py [--batch 16] [--res 224] [--rounds 7] [--no-blurpool]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's backbone, not an installed one
from backbone.gcn_block import separable_pair  # noqa: E402
from backbone.models import create_backbone  # noqa: E402

FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def _fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running module(x) forward and backward (grads of inputs and parameters)."""
    x = x.detach().clone().requires_grad_(True)

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        out = module(x)
        out.backward(torch.ones_like(out))

    return step


class _Fn(nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor], *mods: nn.Module) -> None:
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.mods)


def _time(cases: dict[str, Callable[[], None]], rounds: int, clock: Callable[[], float]) -> dict[str, float]:
    for step in cases.values():  # warm-up: allocator, oneDNN primitive caches
        step()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, step in cases.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _stage_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of layer3 and layer4 (and of their blocks) in this network."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, args[0].detach().clone()))
        for n in ("layer3", "layer3.1", "layer4", "layer4.1")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _table(title: str, rows: list[str], ms: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"{'':46s} {'NCHW ms':>9s} {'CL ms':>9s} {'CL/NCHW':>8s}")
    for r in rows:
        a, b = ms[f"{r}|nchw"], ms[f"{r}|cl"]
        print(f"{r:46s} {a:9.2f} {b:9.2f} {b / a:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-blurpool", action="store_true", help="build the networks without anti-aliasing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see --clock)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this process's CPU time (default; with one thread it ignores time spent "
                         "preempted by other processes), wall: elapsed time")
    ap.add_argument("--ops-first-blocks", action="store_true", help="ops table: also the strided layer3.0")
    ap.add_argument("--only", choices=("stages", "blocks", "ops"), default=None, help="one table only")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    aa = None if args.no_blurpool else "blurpool"
    x0 = torch.randn(args.batch, 3, args.res, args.res)
    nets = {n: create_backbone(n, anti_aliasing=aa).train() for n in ("resnet50", "resnet50_gcn")}
    inputs = {n: _stage_inputs(m, x0) for n, m in nets.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.res}x{args.res}, anti-aliasing {aa}, forward+backward, {args.clock} time, "
          f"median of {args.rounds} interleaved rounds")

    def case(label: str, module: nn.Module, x: torch.Tensor, cases: dict) -> None:
        for f, mf in FORMATS.items():
            # a copy per format: a conv runs channels_last when its input *or* its weight is
            cases[f"{label}|{f}"] = _fwd_bwd(copy.deepcopy(module).to(memory_format=mf),
                                             x.contiguous(memory_format=mf))

    headline = None
    if args.only in (None, "stages"):
        cases: dict[str, Callable[[], None]] = {}
        rows = []
        for stage in ("layer3", "layer4"):
            for n, m in nets.items():
                rows.append(f"{n}.{stage}")
                case(rows[-1], m.get_submodule(stage), inputs[n][stage], cases)
        ms = _time(cases, args.rounds, clock)
        _table("stages (whole layer3 / layer4)", rows, ms)
        for f in FORMATS:
            r = sum(ms[f"resnet50_gcn.{s}|{f}"] for s in ("layer3", "layer4"))
            b = sum(ms[f"resnet50.{s}|{f}"] for s in ("layer3", "layer4"))
            print(f"  layer3+layer4 {f}: resnet50 {b:.1f} ms, resnet50_gcn {r:.1f} ms, time ratio {r / b:.2f}")
            if f == "cl":
                headline = b / r

    if args.only in (None, "blocks"):
        cases, rows = {}, []
        for blk in ("layer3.0", "layer3.1", "layer4.0", "layer4.1"):
            stage = blk.split(".")[0] if blk.endswith(".0") else blk
            for n, m in nets.items():
                rows.append(f"{n}.{blk}")
                case(rows[-1], m.get_submodule(blk), inputs[n][stage], cases)
        _table("blocks (first, strided; and a later one)", rows, _time(cases, args.rounds, clock))

    if args.only in (None, "ops"):
        cases, rows = {}, []
        gcn, r50 = nets["resnet50_gcn"], nets["resnet50"]
        for blk in ("layer3.1", "layer4.1", "layer3.0")[: None if args.ops_first_blocks else 2]:
            stage = blk.split(".")[0] if blk.endswith(".0") else blk
            g, b = gcn.get_submodule(blk), r50.get_submodule(blk)
            xg = inputs["resnet50_gcn"][stage]
            with torch.no_grad():
                xa = g.branch_a[0](xg)
                xb = g.branch_b[0](xg)
                ab = torch.cat([g.branch_a[1](xa), g.branch_b[1](xb)], 1)
            k = g.kernel_size
            w = g.width
            ops = {
                f"gcn {blk} A1 1x{k} {xg.shape[1]}->{w}+BN+ReLU": (g.branch_a[0], xg),
                f"gcn {blk} B1 {k}x1 {xg.shape[1]}->{w}+BN+ReLU": (g.branch_b[0], xg),
                f"gcn {blk} A2 {k}x1 {w}->{w}+BN+ReLU": (g.branch_a[1], xa),
                f"gcn {blk} B2 1x{k} {w}->{w}+BN+ReLU": (g.branch_b[1], xb),
                f"gcn {blk} A1 conv only": (g.branch_a[0].conv, xg),
                f"gcn {blk} B1 conv only": (g.branch_b[0].conv, xg),
                f"gcn {blk} A1 + B1 convs": (_Fn(lambda t, ca, cb: ca(t) + cb(t), g.branch_a[0].conv,
                                                 g.branch_b[0].conv), xg),
                f"gcn {blk} A1 + B1 one matmul (separable_pair)": (
                    _Fn(lambda t, ca, cb: sum(separable_pair(t, ca.weight, cb.weight)), g.branch_a[0].conv,
                        g.branch_b[0].conv), xg),
                f"gcn {blk} cat + 1x1 {2 * w}->{g.conv.out_channels}": (
                    _Fn(lambda t, c, w=w: c(torch.cat([t[:, :w], t[:, w:]], 1)), g.conv), ab),
                f"gcn {blk} 1x1 {2 * w}->{g.conv.out_channels} only": (g.conv, ab),
                f"gcn {blk} two 1x1 {w}->{g.conv.out_channels} summed": (
                    _Fn(lambda t, c, w=w: F.conv2d(t[:, :w], c.weight[:, :w]) + F.conv2d(t[:, w:], c.weight[:, w:]),
                        g.conv), ab),
                f"r50 {blk} conv1 1x1+BN+ReLU": (_Fn(lambda t, c, n: torch.relu(n(c(t))), b.conv1, b.bn1), xg),
                f"r50 {blk} conv2 3x3 (+blur)": (b.conv2, b.conv1(xg).detach()),
            }
            if not g.pair_form:  # strided: no matrix-product form
                ops = {k: v for k, v in ops.items() if "separable_pair" not in k}
            if hasattr(g.branch_a[0].conv, "blur_filter"):
                ops[f"gcn {blk} blur {xg.shape[1]} ch only"] = (
                    _Fn(lambda t, c: F.conv2d(t, c.blur_filter, padding=1, groups=c.in_channels),
                        g.branch_a[0].conv), xg)
            for label, (mod, x) in ops.items():
                rows.append(label)
                case(label, mod, x, cases)
        _table("ops (conv+BN+ReLU units and merges; r50 for scale)", rows, _time(cases, args.rounds, clock))
    value = "n/a (stages table not run)" if headline is None else f"{headline:.2f}x"
    print(f"resnet50_gcn res-4+res-5 speed vs resnet50, channels_last, forward+backward: {value} (target >= 0.95x)")


if __name__ == "__main__":
    main()
