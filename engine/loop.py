"""The training-step loop both stages run: everything around ``train_step`` that is not the model's business.

A trainer iterates :meth:`TrainLoop.steps` over its batches, as torchvision's references iterate
``MetricLogger.log_every(loader)``, and calls :meth:`TrainLoop.record` once per optimiser step::

    for micro_batches in self.loop.steps(batches, accumulation=2, length=n, desc="epoch 3/88"):
        loss = backward_accumulated(model, micro_batches, loss_of, distributed)  # forward + backward of each
        ...
        self.loop.record(loss, images_per_step, lr=lr, epoch=self.epoch)

Each step is a :class:`MicroBatches`: ``accumulation`` batches (the global batch's share of this process, split
where one pass cannot hold it: :func:`split_batch`) drawn from the data one at a time as the step reads them.

Between two batches the loop counts the step and, every ``check_every`` steps (and at the end of the
batches), does what needs the ranks to agree, since each such check synchronises them:

* **preemption** -- a SLURM signal may reach the ranks at different steps; they agree through an
  all-reduce, then the checkpoint is written (``save``) *before* the data pipeline is shut down (a
  drained ffcv epoch can outlast SLURM's grace period) and the job is requeued;
* **non-finite loss** -- the run stops with :class:`NonFiniteLossError` naming the latest checkpoint
  (which is finite: ``engine.checkpoint`` writes no other);
* **throughput and metrics** -- mean loss over the window (all ranks), images per second (per process
  and in all), the share of the time spent waiting for the next batch (``data_wait``), the model FLOPs
  utilisation (``mfu``, where the device's peak is known), one ``kind=train`` record in ``metrics.jsonl``
  (and TensorBoard) and the progress line; at the end of the batches one summary line;
* **checkpoint cadence** -- every ``checkpoint_every`` steps and at the last step of the run.

The batch iterator is closed whenever the loop ends early (``close()`` when it has one), so an ffcv
epoch is shut down rather than left with its loader thread waiting.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import checkpoint as ckpt
from . import distributed as distrib
from .complexity import device_peak_flops
from .config import ConfigError
from .logs import MetricsWriter, Progress
from .preemption import PreemptionFlag
from .runner import RunStatus, diverged

T = TypeVar("T")
REHEARSAL_SIGNAL = signal.SIGUSR1  # what our sbatch jobs get before their time limit (engine.slurm.SBATCH_SIGNAL)


@dataclass(frozen=True)
class BatchSplit:
    """How a global batch is spread: per process, and within a process over accumulated micro-batches."""

    global_batch: int
    world_size: int
    per_process: int
    micro_batch: int
    accumulation: int  # micro-batches per optimiser step


def split_batch(global_batch: int, world_size: int, max_per_process: int = 0, key: str = "data.global_batch"
                ) -> BatchSplit:
    """The recipe states the global batch; the per-process batch follows from the world size, and where
    one process cannot hold it (``max_per_process``, 0 = no limit) the gradients of the fewest equal
    micro-batches that fit are accumulated. Raises ConfigError when the batch does not divide."""
    if global_batch < 1 or global_batch % world_size:
        raise ConfigError(f"{key}={global_batch} cannot be split evenly over {world_size} processes: choose a "
                          f"multiple of {world_size}, or another number of processes")
    per_process = global_batch // world_size
    accumulation = 1
    if max_per_process > 0:
        accumulation = next(a for a in range(-(-per_process // max_per_process), per_process + 1)
                            if per_process % a == 0)
    return BatchSplit(global_batch, world_size, per_process, per_process // accumulation, accumulation)


class MicroBatches:
    """One optimiser step's micro-batches, each drawn from the data only when the step asks for it.

    Why lazily: an ffcv loader hands out views into a few buffer slots (``batches_ahead + 2``) and reuses a
    slot once the next batch is asked for, so a micro-batch held while the next ones are drawn can be
    overwritten before its forward pass runs. Drawn one at a time, each is trained on before the next
    exists (on a GPU, ffcv's stream events then order the reuse after the work queued on it). The time spent
    waiting for the data goes to ``on_wait``.
    """

    def __init__(self, first: T, rest: Iterator[T], n: int, on_wait: Callable[[float], None]) -> None:
        self._first, self._rest, self.n, self._on_wait = first, rest, n, on_wait
        self.taken = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[T]:
        if self.taken:
            raise RuntimeError("a step's micro-batches can be read only once")
        self.taken = 1
        first, self._first = self._first, None  # not kept past its step
        yield first
        for k in range(1, self.n):
            t = time.perf_counter()
            try:
                batch = next(self._rest)
            except StopIteration:
                raise RuntimeError(f"the data ended inside an optimiser step (after {k} of its {self.n} "
                                   "micro-batches)") from None
            self._on_wait(time.perf_counter() - t)
            self.taken += 1
            yield batch


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision on ``device`` with ``amp_dtype`` (bf16 on GPUs), or nothing when it is None."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def backward_accumulated(model: torch.nn.Module, micro_batches: Sequence[T] | MicroBatches,
                         loss_of: Callable[[T], torch.Tensor], distributed: bool) -> torch.Tensor:
    """Forward and backward over one step's micro-batches (a list, or the lazy :class:`MicroBatches`), each loss
    divided by their number, so the gradients are those of the whole batch; under DDP they are all-reduced
    once, on the last one (``no_sync`` before). Returns the step's loss (detached)."""
    total = None
    for k, batch in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not distributed else model.no_sync():
            loss = loss_of(batch) / len(micro_batches)
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


class _Window:
    """Sums since the last check: loss (on the device, no sync), steps, images, time waiting for data."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.bad = torch.zeros((), device=device, dtype=torch.bool)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.images, self.data_wait_s, self.flops = 0, 0, 0.0, 0.0
        self.t0 = time.perf_counter()


class Throughput:
    """Images per second (per process, and in all), share of time waiting for data, MFU, of a stretch."""

    def __init__(self, images: int, seconds: float, data_wait_s: float, world_size: int, flops: float,
                 peak_flops: float | None) -> None:
        seconds = max(seconds, 1e-9)
        self.per_process = images / seconds
        self.total = self.per_process * world_size
        self.data_wait = data_wait_s / seconds
        self.mfu = flops / seconds / peak_flops if peak_flops and flops else None

    def record(self) -> dict[str, float | None]:
        return {"img_per_s": self.total, "img_per_s_per_process": self.per_process, "data_wait": self.data_wait,
                "mfu": self.mfu}

    def line(self, unit: str) -> str:
        mfu = f"MFU {100 * self.mfu:.0f} %" if self.mfu is not None else "MFU n/a (no known peak for this device)"
        return (f"{self.per_process:,.1f} img/s per {unit} ({self.total:,.1f} in all), data wait "
                f"{100 * self.data_wait:.0f} %, {mfu}")


class TrainLoop:
    """Step counting, cross-rank checks, preemption, non-finite detection, throughput, records, checkpoints."""

    def __init__(self, *, env: distrib.DistEnv, device: torch.device, preempt: PreemptionFlag,
                 metrics: MetricsWriter, logger: logging.Logger, models: Sequence[torch.nn.Module],
                 checkpoint_state: Callable[[list[dict[str, Any]]], dict[str, Any]], run_dir: Path,
                 keep_checkpoints: int = 2, step: int = 0, total_steps: int | None = None, check_every: int = 50,
                 checkpoint_every: int = 0, log_every_s: float = 30.0, nonfinite_hint: str = "",
                 flops_per_image: Callable[[], float] | None = None, preempt_at_step: int = 0) -> None:
        self.env, self.device, self.preempt, self.metrics, self.log = env, device, preempt, metrics, logger
        self.models = list(models)  # whose weights a checkpoint holds: checked finite before each one
        self.checkpoint_state, self.run_dir, self.keep_checkpoints = checkpoint_state, run_dir, keep_checkpoints
        self.step, self.total_steps = step, total_steps
        self.check_every, self.checkpoint_every, self.log_every_s = check_every, checkpoint_every, log_every_s
        self.nonfinite_hint = nonfinite_hint
        # a rehearsal's preemption: at this step, act as if SLURM's time-limit signal arrived (once: a run resumed
        # at or past it does not stop again)
        self.preempt_at_step = preempt_at_step
        self._first_step: int | None = None  # where this process started (after a resume)
        # MFU needs the device's peak (known GPUs only) and the model's FLOPs (counted once per input size)
        self.peak_flops = device_peak_flops(device)
        self.flops_per_image = flops_per_image if self.peak_flops else None
        self.unit = "GPU" if device.type == "cuda" else "process"
        self.status: RunStatus | None = None  # PREEMPTED once a signal stopped the loop
        self.last_train: dict[str, Any] = {}  # the latest train record
        self._window = _Window(device)
        self._run = _Window(device)  # the whole of one steps() call, for its summary line
        self._values: dict[str, Any] = {}
        self._recorded = False

    @property
    def preempted(self) -> bool:
        return self.status is RunStatus.PREEMPTED

    def save(self) -> Path | None:
        """Checkpoint the current step (a collective: all ranks call this); returns its path on rank 0.

        Every rank first checks its weights: a diverged run writes nothing and stops, all ranks alike (a
        rank raising alone would leave the others waiting). Every rank's RNG state is gathered, rank 0
        builds the state (``checkpoint_state(rng_states)``) and writes it, and the ranks agree on whether
        that worked (a full disk stops them all, with rank 0's reason).
        """
        if distrib.any_rank(not self._weights_finite(), self.device):
            raise diverged(f"the weights hold NaN/inf at step {self.step}", self.run_dir, self.nonfinite_hint)
        rng = ckpt.gather_rng_states(self.env.world_size)
        path, error = None, None
        if self.env.is_main:
            try:
                path = ckpt.save_checkpoint(self.checkpoint_state(rng), self.run_dir, self.step,
                                            keep=self.keep_checkpoints)
                self.log.info("checkpoint: %s (step %d)", path, self.step)
            except ckpt.CheckpointError as e:
                error = e
        if distrib.any_rank(error is not None, self.device):
            raise error or ckpt.CheckpointError("rank 0 could not write the checkpoint; its log says why")
        return path

    def _weights_finite(self) -> bool:
        flags = [torch.isfinite(v).all() for m in self.models for v in m.state_dict().values() if v.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def stop_requested(self) -> bool:
        """Between epochs: did a signal reach any rank? Then hand over to SLURM (the caller saved already)."""
        if distrib.any_rank(bool(self.preempt), self.device):
            self.preempt.hand_over(self.env.is_main)
            self.status = RunStatus.PREEMPTED
        return self.preempted

    def record(self, loss: torch.Tensor, batch_size: int, **values: Any) -> None:
        """This step's loss (a tensor: no sync here), this process's batch size, and values for the record."""
        w = self._window
        loss = loss.detach()
        w.bad |= ~torch.isfinite(loss)
        w.loss += loss
        flops = self.flops_per_image() * batch_size if self.flops_per_image is not None else 0.0
        for acc in (w, self._run):
            acc.steps += 1
            acc.images += batch_size
            acc.flops += flops
        self._values.update(values)
        self._recorded = True

    def steps(self, batches: Iterable[T], *, length: int, desc: str, accumulation: int = 1, total: int | None = None,
              initial: int = 0) -> Iterator[MicroBatches]:
        """Yield up to ``length`` optimiser steps, each as its :class:`MicroBatches` (``accumulation`` batches
        of ``batches``, drawn as the step reads them), with the bookkeeping of each step after it.

        ``total``/``initial`` are what the progress display counts (default: ``length`` from 0). Ends
        early, with :attr:`status` PREEMPTED, when a signal arrived; raises NonFiniteLossError. A step must
        read all its micro-batches and call :meth:`record`.
        """
        if accumulation < 1:
            raise ValueError(f"accumulation must be at least 1, not {accumulation}")
        it = iter(batches)
        if self._first_step is None:
            self._first_step = self.step
        progress = Progress(None, total if total is not None else length, desc, enabled=self.env.is_main,
                            every_s=self.log_every_s, logger=self.log, initial=initial)
        self._window.reset()
        self._run.reset()
        try:
            for i in range(length):
                t = time.perf_counter()
                try:
                    first = next(it)
                except StopIteration:
                    return
                self._waited(time.perf_counter() - t)
                self._recorded = False
                group = MicroBatches(first, it, accumulation, self._waited)
                yield group
                if group.taken != accumulation:
                    raise RuntimeError(f"the training step read {group.taken} of its {accumulation} micro-batches")
                if not self._recorded:
                    raise RuntimeError("the training step did not call TrainLoop.record()")
                self.step += 1
                rehearsed = self.step == self.preempt_at_step and self._first_step < self.step
                if rehearsed:  # every rank at the same step: they agree at once, not at the next periodic check
                    self.log.info("run.preempt_at_step=%d: acting as if SLURM's warning signal (%s) arrived",
                                  self.step, REHEARSAL_SIGNAL.name)
                    self.preempt.set(REHEARSAL_SIGNAL)
                end_of_run = self.total_steps is not None and self.step >= self.total_steps
                periodic = self.step % self.check_every == 0 or i + 1 == length or end_of_run or rehearsed
                # Agreeing on a signal is an all-reduce (a sync): multi-process runs look only periodically.
                stop = distrib.any_rank(bool(self.preempt), self.device) \
                    if periodic or not self.env.distributed else False
                if periodic or stop:
                    self._check_finite()
                    self._write_train_record(progress)
                progress.advance()  # after the record: a progress line shows this step's values
                if stop and not end_of_run:  # on the last step, finishing is quicker than a requeue
                    self.save()
                    _close(it)
                    self.preempt.hand_over(self.env.is_main)
                    self.status = RunStatus.PREEMPTED
                    return
                if self.checkpoint_every and (self.step % self.checkpoint_every == 0 or end_of_run):
                    self.save()
        finally:
            _close(it)
            progress.close()
            if self._run.steps and self.env.is_main:
                self.log.info("%s: %d steps, %s", desc, self._run.steps, self._throughput(self._run).line(self.unit))

    def _waited(self, seconds: float) -> None:
        self._window.data_wait_s += seconds
        self._run.data_wait_s += seconds

    def _check_finite(self) -> None:
        if distrib.any_rank(bool(self._window.bad.item()), self.device):
            raise diverged(f"non-finite training loss before step {self.step}", self.run_dir, self.nonfinite_hint)

    def check_validation(self, value: float, what: str) -> None:
        """Stop a run whose validation gave a NaN/inf ``value`` (e.g. its loss) as a diverged one."""
        if not math.isfinite(value):
            raise diverged(f"non-finite {what} at step {self.step}", self.run_dir, self.nonfinite_hint)

    def _throughput(self, w: _Window) -> Throughput:
        return Throughput(w.images, time.perf_counter() - w.t0, w.data_wait_s, self.env.world_size, w.flops,
                          self.peak_flops)

    def _write_train_record(self, progress: Progress) -> None:
        w = self._window
        world = self.env.world_size
        mean_loss = (distrib.all_reduce_sum(w.loss.clone()) / (max(w.steps, 1) * world)).item()
        speed = self._throughput(w)
        shown = {k: v for k, v in self._values.items() if k in ("lr", "epoch", "resolution")}
        progress.update(loss=mean_loss, **shown, img_s=round(speed.total, 1))
        self.last_train = {"step": self.step, "loss": mean_loss, **self._values, **speed.record(),
                           "device": self.device.type, "world_size": world}
        self.metrics.write(kind="train", **self.last_train)
        w.reset()


def _close(it: Any) -> None:
    close = getattr(it, "close", None)
    if callable(close):
        close()
