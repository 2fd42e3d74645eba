"""Training-step and inference throughput of resnet50_gcn vs resnet50 on this CPU.

Both models run side by side in one process, same batch and resolution, in NCHW and
channels_last; rounds are interleaved (A, B, A, B, ...) and the median is kept, so load from
other processes hits both alike. The headline is resnet50_gcn's training throughput relative
to resnet50's, each in its own faster memory format (the paper claims equal cost).

    python benchmarks/backbone_speed.py [--batch 16] [--res 224] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's backbone, not an installed one
import backbone  # noqa: E402, F401  (registers resnet50_gcn)

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _infer(model, _opt, x, _y) -> None:
    with torch.inference_mode():
        model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per case (median kept)")
    args = ap.parse_args()
    torch.manual_seed(0)
    x0 = torch.randn(args.batch, 3, args.res, args.res)
    y = torch.randint(0, 1000, (args.batch,))

    cases = {}
    for name in ("resnet50", "resnet50_gcn"):
        for fmt_name, fmt in FORMATS.items():
            model = timm.create_model(name).to(memory_format=fmt)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = x0.contiguous(memory_format=fmt)
            cases[(name, fmt_name)] = (model, opt, x)

    times: dict[tuple[str, str, str], list[float]] = {}
    for mode, fn in (("train", _train_step), ("infer", _infer)):
        for model, opt, x in cases.values():  # warm-up: allocator, oneDNN primitive caches
            model.train(mode == "train")
            fn(model, opt, x, y)
        for _ in range(args.rounds):
            for (name, fmt_name), (model, opt, x) in cases.items():
                model.train(mode == "train")
                t0 = time.perf_counter()
                fn(model, opt, x, y)
                times.setdefault((mode, name, fmt_name), []).append(time.perf_counter() - t0)

    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.res}x{args.res}, median of {args.rounds} interleaved rounds (images/s)")
    print(f"{'mode':6s} {'format':14s} {'resnet50':>10s} {'resnet50_gcn':>13s} {'gcn/r50':>8s}")
    for mode in ("train", "infer"):
        for fmt_name in FORMATS:
            a, b = ips[(mode, "resnet50", fmt_name)], ips[(mode, "resnet50_gcn", fmt_name)]
            print(f"{mode:6s} {fmt_name:14s} {a:10.1f} {b:13.1f} {b / a:8.2f}")
    best = {name: max(ips[("train", name, f)] for f in FORMATS) for name in ("resnet50", "resnet50_gcn")}
    ratio = best["resnet50_gcn"] / best["resnet50"]
    print(f"resnet50_gcn train throughput vs resnet50 (each in its faster format): {ratio:.2f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
