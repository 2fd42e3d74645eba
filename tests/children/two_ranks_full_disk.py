"""One rank of test_faults.py's two-rank run on a disk that fills up.

    python -m children.two_ranks_full_disk RUN_ROOT DISK      (RANK, WORLD_SIZE, LOCAL_RANK, ... set)
"""
import json
import logging
import sys
from pathlib import Path

import torch

from engine import distributed as distrib
from engine.logs import MetricsWriter
from engine.loop import TrainLoop
from engine.preemption import PreemptionFlag

run_dir, disk = Path(sys.argv[1]), Path(sys.argv[2])
env = distrib.detect_env()
cpu = torch.device("cpu")
distrib.init(env, cpu)
torch.manual_seed(0)
model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights

def loop_in(directory):
    return TrainLoop(env=env, device=cpu, preempt=PreemptionFlag(), logger=logging.getLogger("two_ranks"),
                     metrics=MetricsWriter(directory / "metrics.jsonl", enabled=False), models=[model],
                     checkpoint_state=lambda rng: {"model": model.state_dict(), "rng": rng}, run_dir=directory,
                     keep_checkpoints=5)

results = {}

def attempt(name, loop, step):
    loop.step = step
    try:
        results[name] = {"saved": str(loop.save())}
    except Exception as e:
        results[name] = {"error": type(e).__name__, "message": str(e)}

loop = loop_in(run_dir)
attempt("good", loop, 1)
for bad_rank in (1, 0):  # NaN in one rank's weights only
    with torch.no_grad():
        kept = model.weight[0, 0].item()
        if env.rank == bad_rank:
            model.weight[0, 0] = float("nan")
        attempt(f"nan_on_rank{bad_rank}", loop, 2 + bad_rank)
        model.weight[0, 0] = kept
full = loop_in(disk)
attempt("fits", full, 1)
if env.is_main:
    (disk / "filler").write_bytes(b"\0" * (6 << 20))  # leaves about 2 MiB of the 12
distrib.barrier()
attempt("disk_full", full, 2)
print("RESULT", json.dumps(results), flush=True)
distrib.teardown()
