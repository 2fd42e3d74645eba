"""Checkpoint-and-requeue on SLURM's warning signals.

Why a flag and not work in the handler: a signal can arrive in the middle of a step, inside a
collective or a CUDA kernel; saving from the handler would write a half-updated model and could
deadlock DDP. The handler only records the signal; the train loop looks at the flag at each step
boundary, all ranks agree (a rank may get the signal a step later than another), rank 0 writes
a checkpoint, and then ``requeue()`` puts the job back in the queue before exiting.

Which signals: ``sbatch --signal=USR1@<s>`` (the time-limit warning we ask for in
slurm/imagenet_pretrain.sh) sends SIGUSR1; preemption by a higher-priority partition, ``scancel``
and ``scontrol requeue`` send SIGTERM (then SIGKILL after ``KillWait``), so SIGTERM must be
handled too. On SIGTERM SLURM has usually requeued the job itself (preemption with
``PreemptMode=REQUEUE``); the extra ``scontrol requeue`` is then refused, which is harmless.

Under submitit, submitit's own handler (SIGUSR2) calls ``Checkpointable.checkpoint`` right
inside the signal handler, requeues and exits mid-step, on rank 0 only. We want the checkpoint
at a step boundary on all ranks, so ``install`` takes the signal over and ``hand_over`` calls
submitit's handler afterwards: it then resubmits (``checkpoint()`` in backbone/submit.py) and
requeues exactly as it would have, with a fresh checkpoint on disk to resume from.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

log = logging.getLogger(__name__)

# USR1: our sbatch scripts' time-limit warning; USR2: submitit's; TERM: preemption, scancel; HUP: what
# newer submitit sends (some NCCL versions caught USR1, NVIDIA/nccl#704); INT: Ctrl-C at a terminal.
# ``LKM_PREEMPT_SIGNALS=USR2,TERM`` (names) narrows the set where a library in the job owns one of them.
DEFAULT_SIGNALS = ("USR1", "USR2", "TERM", "HUP", "INT")


def handled_signals() -> tuple[signal.Signals, ...]:
    """The signals the trainers turn into a checkpoint at the next step (``LKM_PREEMPT_SIGNALS`` or the default)."""
    names = [n.strip().upper().removeprefix("SIG") for n in os.environ.get("LKM_PREEMPT_SIGNALS", "").split(",")
             if n.strip()] or list(DEFAULT_SIGNALS)
    try:
        return tuple(signal.Signals[f"SIG{n}"] for n in names)
    except KeyError as e:
        raise ValueError(f"LKM_PREEMPT_SIGNALS names an unknown signal {e}; e.g. USR1,USR2,TERM,HUP,INT") from None


class PreemptionFlag:
    """Set by the signals of :func:`handled_signals`; read by the train loop at step boundaries.

    A second Ctrl-C (SIGINT) stops at once, without a checkpoint, as Ctrl-C always does.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.requeued = False  # hand_over put the job back in the queue (SLURM or submitit)
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def set(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.signum is None:
            again = "; press Ctrl-C again to stop at once, without one" if signum == signal.SIGINT else ""
            log.warning("received %s: will checkpoint at the next step boundary and stop%s",
                        signal.Signals(signum).name, again)
        self.signum = signum

    def install(self) -> PreemptionFlag:
        """Handle the signals above from now on (main thread only, as Python requires)."""
        for sig in handled_signals():
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def hand_over(self, is_main: bool) -> None:
        """After the checkpoint is on disk: requeue the job (rank 0) so that it resumes.

        Under submitit, submitit's handler for the signal does it (and exits the process).
        """
        if self.signum is None or self.signum == signal.SIGINT:  # Ctrl-C: the person at the terminal resumes
            return
        if in_slurm_job():
            # a refused requeue usually means SLURM requeued the job itself (preemption with PreemptMode=REQUEUE)
            self.requeued = True
        if not is_main:
            return
        prev = self._previous.get(self.signum)
        if os.environ.get("SUBMITIT_EXECUTOR") and callable(prev):
            name = signal.Signals(self.signum).name
            log.info("handing %s over to submitit (checkpoint() and requeue)", name)
            self.requeued = True
            self.uninstall()
            prev(self.signum, None)
            return
        if in_slurm_job():
            requeue()


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def requeue() -> bool:
    """``scontrol requeue $SLURM_JOB_ID``; True if SLURM accepted it.

    SLURM_JOB_ID is the task's own id in a job array too, so one array task is requeued.
    Interactive allocations (salloc) cannot be requeued; SLURM refuses and we log it.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return False
    if out.returncode != 0:
        log.warning("scontrol requeue %s refused (%s); the job may already be requeued", job,
                    out.stderr.strip())
        return False
    log.info("requeued SLURM job %s; it will resume from the checkpoint", job)
    return True
