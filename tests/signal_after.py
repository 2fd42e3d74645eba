"""A preemption flag that fires after a given number of step boundaries, for the resume tests.

The signal handler itself is tested in test_config.py and, with real SLURM signals, in
test_slurm.py; the trainers only ever ask the flag at step boundaries, so this is enough to stop
a run at a chosen step.
"""
from __future__ import annotations

import random

import numpy as np
import torch

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


class RandomDraws(SignalAfter):
    """A flag that, at every step boundary, draws from Python's, NumPy's and torch's global generators.

    It stands for any random element of a recipe (dropout, drop-path, random erasing) and records
    what it drew, so a test can check that a resumed run continues the random streams of the run it
    resumes. Fires like :class:`SignalAfter` after ``n`` step boundaries (never, by default).
    """

    def __init__(self, n: int = 2**62):
        super().__init__(n)
        self.draws: list[tuple[float, float, float]] = []

    def __bool__(self) -> bool:
        self.draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
        return super().__bool__()
