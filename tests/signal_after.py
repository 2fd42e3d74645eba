"""A preemption flag that fires after a given number of step boundaries, for the resume tests.

The signal handler itself is tested in test_config.py and, with real SLURM signals, in
test_slurm.py; the trainers only ever ask the flag at step boundaries, so this is enough to stop
a run at a chosen step.
"""
from __future__ import annotations

from engine.preemption import PreemptionFlag


class SignalAfter(PreemptionFlag):
    """Behaves as if SIGUSR1 arrived after ``n`` step boundaries."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __bool__(self) -> bool:
        self.n -= 1
        if self.n < 0 and self.signum is None:
            self.set()
        return self.signum is not None
