"""What watching a run costs: a training step with the engine's bookkeeping against the bare step.

    python benchmarks/logging_overhead.py [--steps 40 --rounds 5] [--clock cpu|wall] [--threads 1]

The same model (resnet18, 64 px, batch 16, SGD, on the CPU) trains on the same in-memory batches, with
the bare loop (forward, backward, step) and with ``engine.loop.TrainLoop`` around it: step counting,
the periodic checks (non-finite loss, preemption), throughput, data wait, the ``metrics.jsonl`` record
and TensorBoard scalars; at the trainers' default check interval (``run.check_every_steps``, 50) and
at the most costly one (every step). Rounds alternate between the variants so that a machine whose
load changes affects them alike; the table shows the median time per step. The last line is the ratio
bare / with bookkeeping at the default interval: 1.00x means free.

Clock: by default the process's CPU time (``time.process_time``) with one torch thread, which other
jobs on the machine barely move (the wall clock on a busy 2-core machine swung by more than the
overhead measured: 0.87x and 1.34x in two runs). ``--clock wall --threads 2`` measures what a quiet
machine's user sees.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch import nn

from engine.distributed import DistEnv
from engine.logs import MetricsWriter
from engine.loop import TrainLoop
from engine.preemption import PreemptionFlag

TARGET = 0.98
clock = time.process_time  # set by --clock


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))) for _ in range(8)]
    return model, opt, batches


def step(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    opt.step()
    return loss


def bare(steps: int) -> float:
    model, opt, batches = make()
    t0 = clock()
    for i in range(steps):
        step(model, opt, *batches[i % len(batches)])
    return (clock() - t0) / steps


def with_loop(steps: int, check_every: int, work: Path) -> float:
    model, opt, batches = make()
    run_dir = Path(tempfile.mkdtemp(dir=work))
    loop = TrainLoop(env=DistEnv(), device=torch.device("cpu"), preempt=PreemptionFlag(),
                     metrics=MetricsWriter(run_dir / "metrics.jsonl"), logger=logging.getLogger("bench"),
                     models=[model], checkpoint_state=lambda rng: {}, run_dir=run_dir, check_every=check_every,
                     log_every_s=3600)
    source = (batches[i % len(batches)] for i in range(steps))
    t0 = clock()
    for images, labels in loop.steps(source, length=steps, desc="bench"):
        loop.record(step(model, opt, images, labels), images.shape[0], lr=0.01, epoch=0)
    seconds = (clock() - t0) / steps
    loop.metrics.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: the process's CPU time (steady under load, the default); wall: elapsed time")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see --clock)")
    args = p.parse_args(argv)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    names = ("bare step", "TrainLoop, check every 50", "TrainLoop, check every step")
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as work:
        bare(4)  # warm-up: first allocations, oneDNN kernels
        for _ in range(args.rounds):
            times["bare step"].append(bare(args.steps))
            times["TrainLoop, check every 50"].append(with_loop(args.steps, 50, Path(work)))
            times["TrainLoop, check every step"].append(with_loop(args.steps, 1, Path(work)))
    base = statistics.median(times["bare step"])
    print(f"{'variant':<30} {'ms / step':>10} {'vs bare':>8}")
    for name, t in times.items():
        print(f"{name:<30} {1000 * statistics.median(t):>10.1f} {base / statistics.median(t):>7.3f}x")
    ratio = base / statistics.median(times["TrainLoop, check every 50"])
    print(f"\n{args.rounds} rounds of {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock")
    print(f"training step with logging vs without: {ratio:.3f}x (target >= {TARGET}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
