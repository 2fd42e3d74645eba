"""A comparison that holds its output's lock while the test starts a second one (test_lock.py).
"""
import sys
import time

from experiments.compare import cli


def handle_stale_and_wait(runs, move):
    print("HOLDING", flush=True)
    while True:
        time.sleep(1)

cli.handle_stale = handle_stale_and_wait
sys.exit(cli.main(sys.argv[1:]))
