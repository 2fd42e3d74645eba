"""A fine-tune that holds its run directory's lock while the test starts a second one (test_lock.py).
"""
import sys
import time

from segmentation import finetune


def fit_and_wait(self):
    print("HOLDING", flush=True)
    while True:
        time.sleep(1)

finetune.Finetuner.fit = fit_and_wait
sys.exit(finetune.main(sys.argv[1:]))
