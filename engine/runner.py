"""The life of one training run, shared by pretraining and fine-tuning.

Both stages do the same around their own train loop: check the run before anything starts,
create the run directory and its log, record the resolved config (a resume adds its own copy,
nothing is replaced), set determinism, pick the device, install the SLURM signal handler, join
the process group, fit, write ``final.pth`` on rank 0, and tear everything down again so that
in-process callers (tests, notebooks) get their state back.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from . import distributed as distrib
from .config import dump_config
from .logs import setup_logging
from .preemption import PreemptionFlag

log = logging.getLogger("engine.runner")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops, and its last good checkpoint stays the latest."""


class RunPlan(Protocol):
    already_finished: bool
    resume_from: Path | None


class StageTrainer(Protocol):
    def fit(self) -> str: ...

    def write_final(self) -> Path: ...


def set_deterministic(on: bool) -> None:
    """Deterministic kernels (slower) for runs that must be bit-for-bit repeatable."""
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=False)


def run_stage(
    cfg: Any,
    plan: RunPlan,
    make_trainer: Callable[[distrib.DistEnv, torch.device, PreemptionFlag], StageTrainer],
    preempt: PreemptionFlag | None = None,
) -> str:
    """Run (or resume) a planned run; returns 'finished', 'preempted' or 'done before'.

    ``cfg`` needs ``run.dir``, ``train.deterministic`` and ``train.device``; ``plan`` comes from the
    stage's own checks, made on every rank before any loader or worker exists.
    """
    env = distrib.detect_env()
    run_dir = Path(cfg.run.dir)
    setup_logging(env.rank)
    if plan.already_finished:
        log.info("%s already holds final.pth: nothing to do", run_dir)
        return "done before"
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(env.rank, log_file=run_dir / "train.log")
        name = "config.yaml" if plan.resume_from is None else f"config.resume_{int(time.time())}.yaml"
        if not (run_dir / name).exists():
            dump_config(cfg, run_dir / name)
    log.info("process %d/%d (local %d) via %s", env.rank, env.world_size, env.local_rank, env.source)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    set_deterministic(cfg.train.deterministic)
    device = distrib.select_device(env, cfg.train.device)
    own_flag = preempt is None
    preempt = PreemptionFlag().install() if preempt is None else preempt
    distrib.init(env, device)
    try:
        trainer = make_trainer(env, device, preempt)
        status = trainer.fit()
        if status == "finished" and env.is_main:
            log.info("finished: %s", trainer.write_final())
        distrib.barrier()
        return status
    finally:
        distrib.teardown()
        set_deterministic(was_deterministic)
        if own_flag:
            preempt.uninstall()
