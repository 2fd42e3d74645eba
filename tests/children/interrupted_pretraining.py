"""A pretraining stopped at a chosen step, by SIGTERM or SIGKILL (test_pretrain_reproducible.py).
"""
import os
import signal
import sys

from backbone import train

at, how = int(sys.argv[1]), sys.argv[2]
train_step = train.Trainer.train_step

def train_step_interrupted(self, micro_batches, lr):
    if self.loop.step + 1 == at:
        if how == "kill":
            self.optimizer.step = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
    return train_step(self, micro_batches, lr)

train.Trainer.train_step = train_step_interrupted
sys.exit(train.main(sys.argv[3:]))
