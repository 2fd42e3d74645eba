"""A pretraining that kills itself (SIGKILL) at a step (test_faults.py).

    python -m children.killed_pretraining AT_STEP --config ... key=value ...
"""
import os
import signal
import sys

from backbone import train

at_step = int(sys.argv[1])
train_step = train.Trainer.train_step

def train_step_or_die(self, micro_batches, lr):
    if self.loop.step + 1 == at_step:  # after the forward and backward passes, before the update
        self.optimizer.step = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    return train_step(self, micro_batches, lr)

train.Trainer.train_step = train_step_or_die
sys.exit(train.main(sys.argv[2:]))
