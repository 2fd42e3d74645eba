"""What a SLURM task sees of its CPUs, printed as one line ``CPU-PROBE {json}``: run as a job's task by the binding
tests of tests/test_slurm.py (through slurm/launch.sh's srun and through submitit).

Reported: the CPUs the task may run on (``os.sched_getaffinity``, what task/affinity and task/cgroup restrict),
numba's thread count (which ``backbone.train`` checks ``data.num_workers`` against: it follows the affinity) and
the thread settings and SLURM variables the task got. Extra arguments (``lkm_launch`` appends ``--config ...``)
are ignored.
"""
from __future__ import annotations

import json
import os


def report() -> dict:
    import numba  # reads the affinity when imported

    return {"rank": int(os.environ.get("SLURM_PROCID", "-1")), "cpus": sorted(os.sched_getaffinity(0)),
            "numba_threads": numba.config.NUMBA_NUM_THREADS, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "slurm_cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"), "step": os.environ.get("SLURM_STEP_ID")}


if __name__ == "__main__":
    print("CPU-PROBE " + json.dumps(report()), flush=True)
