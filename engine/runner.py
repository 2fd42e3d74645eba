"""The life of one training run, shared by pretraining and fine-tuning.

Both stages do the same around their own training: inspect the run directory before anything
starts (:func:`inspect_run_dir`: the latest checkpoint whose content is intact, falling back past damaged
ones), refuse a resume with other settings (:func:`check_resume`), set determinism, pick the device,
install the SLURM signal handler, join the process group, take the run directory's lock
(``engine.lock``: one process, or one job's ranks, per run directory), and only then write: the log, the
resolved config (``config.yaml`` always describes the attempt that is running; earlier attempts' configs
are kept beside it) and ``run.json``. Then fit, write the final weights on rank 0, and tear everything down
again so that in-process callers (tests, notebooks) get their state back.
"""
from __future__ import annotations

import enum
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from . import checkpoint as ckpt
from . import distributed as distrib
from .config import ConfigError, to_dict
from .lock import FolderLock, FolderLocked
from .logs import setup_logging
from .preemption import PreemptionFlag
from .provenance import code_version, config_recipe_hash, write_run_record

log = logging.getLogger("engine.runner")

FINAL_NAME = "final.pth"
CONFIG_NAME = "config.yaml"
CUBLAS_WORKSPACE = ":4096:8"  # CUBLAS_WORKSPACE_CONFIG of deterministic runs (cuBLAS's documented setting)


class RunStatus(enum.StrEnum):
    """How a call of a stage ended (a str, so ``status == "finished"`` reads naturally)."""

    FINISHED = "finished"
    PREEMPTED = "preempted"  # a signal arrived: checkpoint written, job requeued
    DONE_BEFORE = "done before"  # the run directory already held the final weights


class NonFiniteLossError(RuntimeError):
    """The run diverged (a NaN/inf loss or weights): it stops, and its last good checkpoint stays the latest."""


def diverged(what: str, run_dir: Path, hint: str = "") -> NonFiniteLossError:
    """The error of a diverged run, naming the checkpoint to resume from (finite weights: checked when written)."""
    latest = ckpt.latest_checkpoint(run_dir)
    good = f"{latest} (its weights were checked finite when it was written)" if latest else "none"
    return NonFiniteLossError(f"the run diverged: {what}; it stopped without writing a new checkpoint. Last good "
                              f"checkpoint: {good}. {hint or 'Lower optim.lr or check the data'}, then start again "
                              "with the same run.dir to resume from it.")


def short_error(e: BaseException) -> str:
    """The message of ``e``; for an error a DataLoader worker re-raised, the original one (torch wraps it in
    a traceback whose last line is what names the file)."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[-1] + " (raised in a data loader worker)"
    return text


def run_cli(load: Callable[[], Any], run: Callable[[Any, PreemptionFlag], RunStatus],
            errors: tuple[type[BaseException], ...]) -> int:
    """What both stages' command lines do around a run: expected errors as one line (exit 2); a run
    stopped by a signal says how to resume (exit 128 + the signal, or 0 when SLURM requeued the job);
    a second Ctrl-C stops at once (exit 130)."""
    flag = PreemptionFlag()
    cfg = None
    try:
        cfg = load()
        status = run(cfg, flag.install())
    except errors as e:
        print(f"error: {short_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted at once: no new checkpoint; the same command resumes from the last one", file=sys.stderr)
        return 130
    finally:
        flag.uninstall()
    if status is RunStatus.PREEMPTED and not flag.requeued:
        print(f"stopped by {signal.Signals(flag.signum).name}: a checkpoint is in {cfg.run.dir}; start the same "
              "command again to resume", file=sys.stderr)
        return 128 + int(flag.signum)
    return 0


@dataclass(frozen=True)
class RunDirState:
    """What a run directory holds before a run starts."""

    resume_from: Path | None  # the latest intact checkpoint (checked against this run's identity)
    finished: bool  # intact final weights are there
    resume_meta: dict[str, Any] = field(default_factory=dict)  # its scalars: step, global_batch, world_size...
    damaged: tuple[Path, ...] = ()  # checkpoints (or final weights) whose content is not what was written


class StageTrainer(Protocol):
    def fit(self) -> RunStatus: ...

    def write_final(self) -> Path: ...


def inspect_run_dir(run_dir: str | Path, expect: dict[str, Any]) -> RunDirState:
    """The latest intact checkpoint (which must match ``expect``, e.g. model name and format) and whether the
    run finished; nothing is written.

    A checkpoint that cannot be read or whose content is not what was written (``engine.checkpoint``'s
    digest) is named in a warning and passed over for the one before it; damaged final weights are redone
    from the latest checkpoint. Raises CheckpointError (another network's checkpoint, or no intact one
    left) or ConfigError (final weights without any checkpoint: not a run directory of this trainer).
    """
    run_dir = Path(run_dir)
    damaged: list[Path] = []
    errors: list[ckpt.DamagedCheckpointError] = []
    latest, meta = None, {}
    for path in reversed(ckpt.list_checkpoints(run_dir)):
        try:
            meta = ckpt.peek_checkpoint(path)
        except ckpt.DamagedCheckpointError as e:
            damaged.append(path)
            errors.append(e)
            continue
        latest = path
        break
    if latest is not None:
        ckpt.check_compatible(meta, latest, expect)
    final = run_dir / FINAL_NAME
    if final.exists() and latest is None and not damaged:
        raise ConfigError(f"{final} exists without a checkpoint beside it: not a run directory this trainer "
                          "can resume; choose another run.dir")
    finished = final.exists()
    if finished:
        try:
            ckpt.read_sealed(final, mmap=True)
        except ckpt.DamagedCheckpointError as e:
            damaged.append(final)
            errors.append(e)
            finished = False
    if finished:
        return RunDirState(latest, True, meta if latest is not None else {})
    if latest is None and damaged:
        raise ckpt.CheckpointError(f"{errors[0]} No intact checkpoint is left in {run_dir} to fall back to "
                                   f"({len(damaged)} damaged): move them away to start the run again.")
    for e in errors:
        log.warning("%s -- the run resumes from %s", e, latest)
    return RunDirState(latest, False, meta if latest is not None else {}, tuple(damaged))


def check_resume(state: RunDirState, settings: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint trained with other ``settings`` (checkpoint keys: global batch, world size,
    iterations...): the sample order and the BatchNorm statistics depend on them. Made on every rank before
    anything is written, so a refused resume leaves the run directory as it was."""
    if state.resume_from is None:
        return
    differ = {k: (state.resume_meta.get(k), v) for k, v in settings.items() if state.resume_meta.get(k) != v}
    if differ:
        had = ", ".join(f"{k}={have}" for k, (have, _) in differ.items())
        has = ", ".join(f"{k}={want}" for k, (_, want) in differ.items())
        raise ckpt.CheckpointError(
            f"the checkpoint {state.resume_from} was trained with {had}; this run has {has}. Resume with the same "
            "settings (the sample order and the BatchNorm statistics depend on them), or start a new run.dir; "
            "nothing was written.")


def record_config(cfg: Any, run_dir: Path) -> Path:
    """Write ``config.yaml`` for this attempt; an earlier attempt's differing one becomes ``config.attempt<N>.yaml``."""
    path = run_dir / CONFIG_NAME
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path.exists() and path.read_text() != text:
        n = 1
        while (run_dir / f"config.attempt{n}.yaml").exists():
            n += 1
        path.rename(run_dir / f"config.attempt{n}.yaml")
        log.info("the recipe changed since the last attempt: its config is kept as config.attempt%d.yaml", n)
    path.write_text(text)
    return path


def set_deterministic(on: bool) -> None:
    """Deterministic kernels (slower) for runs that must be bit-for-bit repeatable.

    On CUDA, cuBLAS needs a fixed workspace for that (``CUBLAS_WORKSPACE_CONFIG``, read when its first
    handle is made: this runs before the device is chosen); ops without a deterministic CUDA kernel
    raise, naming the op (the stages avoid the ones they would meet: see ``segmentation_loss``).
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=False)


def run_stage(
    cfg: Any,
    state: RunDirState,
    make_trainer: Callable[[distrib.DistEnv, torch.device, PreemptionFlag], StageTrainer],
    preempt: PreemptionFlag | None = None,
    provenance: dict[str, Any] | None = None,
    resume_settings: Mapping[str, Any] | None = None,
) -> RunStatus:
    """Run (or resume) a checked run.

    ``cfg`` needs ``run.dir``, ``train.seed``, ``train.deterministic`` and ``train.device``; its class may
    name the keys that cannot change a result (``NOT_RECIPE``), which the recipe hash leaves out.
    ``state`` comes from the stage's own checks (:func:`inspect_run_dir` among them), made on every rank
    before any loader or worker exists; ``resume_settings`` are what a checkpoint must have been trained with
    to be resumed, besides the world size (:func:`check_resume`); ``provenance`` (e.g. the hashes of the
    inputs) goes into ``run.json``. Nothing is written before those checks pass and the run directory's lock
    is held.
    """
    env = distrib.detect_env()
    run_dir = Path(cfg.run.dir)
    setup_logging(env.rank)
    if state.finished:
        log.info("%s already holds %s: nothing to do", run_dir, FINAL_NAME)
        return RunStatus.DONE_BEFORE
    check_resume(state, {"world_size": env.world_size, **(resume_settings or {})})
    was_deterministic, was_benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    set_deterministic(cfg.train.deterministic)
    device = distrib.select_device(env, cfg.train.device)
    own_flag = preempt is None
    preempt = PreemptionFlag().install() if preempt is None else preempt
    lock = FolderLock(run_dir)
    try:
        distrib.init(env, device)
        take_lock(lock, env, device)
        if env.is_main:
            prepare_run_dir(cfg, state, env, provenance)
        log.info("process %d/%d (local %d) via %s%s", env.rank, env.world_size, env.local_rank, env.source,
                 f", {torch.distributed.get_backend()} process group" if distrib.is_initialized() else "")
        trainer = make_trainer(env, device, preempt)
        status = trainer.fit()
        if status is RunStatus.FINISHED and env.is_main:
            log.info("finished: %s", trainer.write_final())
        distrib.barrier()
        return status
    finally:
        # DDP (its reducer's threads) before its process group: the other way round, gloo can abort at exit
        trainer = None
        if distrib.is_initialized():
            gc.collect()
        distrib.teardown()
        set_deterministic(was_deterministic)
        torch.backends.cudnn.benchmark = was_benchmark  # set_deterministic turns it on for non-deterministic runs
        if own_flag:
            preempt.uninstall()
        lock.release()


def take_lock(lock: FolderLock, env: distrib.DistEnv, device: torch.device) -> None:
    """Rank 0 takes the run directory's lock; every rank stops when it could not (a collective)."""
    error = None
    if env.is_main:
        try:
            lock.acquire()
        except ConfigError as e:
            error = e
    if distrib.any_rank(error is not None, device):
        raise error or FolderLocked(f"rank 0 could not lock the run directory {lock.folder}: its error says why")


def prepare_run_dir(cfg: Any, state: RunDirState, env: distrib.DistEnv, provenance: dict[str, Any] | None) -> None:
    """Rank 0, holding the lock: the log file, temporaries of killed writers removed, damaged files moved aside
    (``<name>.damaged``: kept, never resumed from again), ``config.yaml`` and ``run.json``."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(env.rank, log_file=run_dir / "train.log")
    ckpt.remove_stale_temporaries(run_dir)
    for path in state.damaged:
        if path.exists():
            aside = path.with_name(path.name + ".damaged")
            path.replace(aside)
            log.warning("%s is damaged: moved to %s; resuming from %s", path, aside, state.resume_from or "the start")
    record_config(cfg, run_dir)
    write_run_record(run_dir, world_size=env.world_size, seed=cfg.train.seed, code_version=code_version(),
                     recipe_hash=config_recipe_hash(cfg), attempt_started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     **(provenance or {}))
