"""Training-step and inference throughput of the GCN segmentation network vs torchvision's FCN and DeepLabv3.

Our network (Figure 2) on resnet50 and resnet50_gcn with the ``baseline`` (1x1) and ``gcn_br`` (k=15)
heads, next to torchvision's ``fcn_resnet50`` and ``deeplabv3_resnet50`` (random init, no aux
head): the peers a user would otherwise pick. All get the same input, batch, class count (21) and
memory format in one process; timed rounds are interleaved (A, B, C, ... A, B, C) and the median
kept, so load from other processes hits every model alike. GMACs per image come from
``torch.utils.flop_counter`` on the meta device.

    python benchmarks/segmentation_speed.py [--batch 2] [--size 512] [--rounds 1] [--format channels_last]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from segmentation.network import build_segmentation_model

NUM_CLASSES = 21
OURS = [(b, h) for b in ("resnet50", "resnet50_gcn") for h in ("baseline", "gcn_br")]
PEERS = ("fcn_resnet50", "deeplabv3_resnet50")
HEADLINE = ("resnet50_gcn+gcn_br", "deeplabv3_resnet50")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


class _Logits(nn.Module):
    """torchvision's segmentation models return ``{'out': logits}``; the benchmark wants the tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _builders() -> dict[str, Callable[[], nn.Module]]:
    builders: dict[str, Callable[[], nn.Module]] = {
        f"{b}+{h}": (lambda b=b, h=h: build_segmentation_model(b, h, NUM_CLASSES, kernel_size=15)) for b, h in OURS
    }
    for name in PEERS:
        make = getattr(torchvision.models.segmentation, name)
        builders[name] = lambda make=make: _Logits(make(weights=None, weights_backbone=None, num_classes=NUM_CLASSES))
    return builders


def _gmacs(make: Callable[[], nn.Module], size: int) -> float:
    with torch.device("meta"):
        model = make().eval()
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2e9


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _infer(model: nn.Module, _opt: torch.optim.Optimizer, x: torch.Tensor, _y: torch.Tensor) -> None:
    model.eval()
    with torch.inference_mode():
        model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2, help="images per step (default: %(default)s)")
    ap.add_argument("--size", type=int, default=512, help="square input size (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per case, median kept (default: %(default)s)")
    ap.add_argument("--format", choices=FORMATS, default="channels_last", help="memory format (default: %(default)s)")
    args = ap.parse_args()
    torch.manual_seed(0)
    fmt = FORMATS[args.format]
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size))

    builders = _builders()
    cases, gmacs, params = {}, {}, {}
    for name, make in tqdm(builders.items(), desc="building", leave=False):
        gmacs[name] = _gmacs(make, args.size)
        model = make().to(memory_format=fmt)
        params[name] = sum(p.numel() for p in model.parameters())
        cases[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))

    times: dict[tuple[str, str], list[float]] = {}
    steps = [(mode, fn, name) for mode, fn in (("infer", _infer), ("train", _train_step)) for name in cases]
    with tqdm(total=len(cases) + len(steps) * args.rounds, desc="timing", leave=False) as bar:
        # Warm-up (allocator, oneDNN primitive caches) with one forward pass: a training step at 512x512
        # costs tens of seconds on a laptop-class CPU, and its first-call overhead is small next to that.
        for model, opt in cases.values():
            _infer(model, opt, x, y)
            bar.update()
        for _ in range(args.rounds):
            for mode, fn, name in steps:
                t0 = time.perf_counter()
                fn(*cases[name], x, y)
                times.setdefault((mode, name), []).append(time.perf_counter() - t0)
                bar.update()

    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    ref = HEADLINE[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.size}x{args.size}, {args.format}, {NUM_CLASSES} classes, median of {args.rounds} "
          f"interleaved rounds (images/s; ratios vs {ref})")
    print(f"{'model':28s} {'params':>8s} {'GMACs/img':>10s} {'infer':>7s} {'ratio':>6s} {'train':>7s} {'ratio':>6s}")
    for name in cases:
        inf, trn = ips[("infer", name)], ips[("train", name)]
        print(f"{name:28s} {params[name] / 1e6:7.1f}M {gmacs[name]:10.1f} {inf:7.2f} "
              f"{inf / ips[('infer', ref)]:6.2f} {trn:7.2f} {trn / ips[('train', ref)]:6.2f}")
    ratio = ips[("infer", HEADLINE[0])] / ips[("infer", ref)]
    print(f"{HEADLINE[0]} inference vs {ref}: {ratio:.2f}x (target >= 1x)")


if __name__ == "__main__":
    main()
