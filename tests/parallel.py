"""The suite in parallel (pytest-xdist: ``make test`` runs ``-n auto --dist loadfile --no-loadscope-reorder``).

A serial run leaves a 2-core machine idle ~40 % of the time (process start-up, imports, numba compiles, one-task
SLURM jobs), so two workers share it. A unit of work is a test file (its module fixtures are computed once), except
that every test needing a SLURM cluster is in one unit, "slurm": the clusters are daemons of this machine, started
once and stopped by the session that started them, and jobs of two workers would queue behind each other on the
same 2 CPUs. The scheduler sees node ids only, so those tests are found by name (``tests/test_slurm*.py``, or a test
named ``test_slurm_*``); collection checks that every test asking for a cluster fixture is named so. The units known
to take longest go first, so that no long unit starts last. conftest.py imports the hooks below.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from segmentation.crf import default_workers  # numpy only: torch is not imported before OMP_NUM_THREADS is set

SLURM_FIXTURES = ("slurm_cluster", "slurm_2node_cluster")
LONGEST_FIRST = ("slurm", "tests/test_compare.py", "tests/test_faults.py")
MAX_WORKERS = 8  # more gains little (about 20 units); each worker holds its own session fixtures


def xdist_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: ``slurm`` or its file."""
    path, _, name = nodeid.partition("::")
    if Path(path).name.startswith("test_slurm") or name.startswith("test_slurm"):
        return "slurm"
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return min(default_workers(), MAX_WORKERS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile``: xdist's file-by-file scheduling, with the SLURM tests as one unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit(nodeid)

    return UnitScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misnamed = [item.nodeid for item in items
                if any(f in item.fixturenames for f in SLURM_FIXTURES) and xdist_unit(item.nodeid) != "slurm"]
    if misnamed:
        raise pytest.UsageError(f"tests that need a SLURM cluster must be named test_slurm_* (or live in "
                                f"tests/test_slurm*.py) so that one worker runs them all: {misnamed}")
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return  # a plain run keeps pytest's order
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_unit(item.nodeid), len(rank)))  # stable: file order otherwise


def share_cores_between_workers() -> None:
    """One worker's torch (and its children's) gets cores / workers threads: oversubscribed OpenMP threads
    spin-wait on each other. An explicit OMP_NUM_THREADS is left as it is."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(default_workers(workers))
