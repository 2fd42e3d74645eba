"""The local SLURM clusters the SLURM tests run on (slurm/local/): session fixtures, started once, stopped by the
session that started them. conftest.py imports the fixtures."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hangs import PYTHON, ROOT


def cluster_unavailable(reason: str) -> None:
    """Skip, with the reason, where a SLURM test cluster cannot start (not root, no packages); fail instead
    under ``LKM_REQUIRE_SLURM=1`` (.ci/run sets it), where a skip would hide a broken start script."""
    if os.environ.get("LKM_REQUIRE_SLURM") == "1":
        pytest.fail(f"LKM_REQUIRE_SLURM=1 and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """A real single-node SLURM cluster on localhost (slurm/local/start.sh), started once.

    Skips, with the reason, where it cannot start (not root, no apt/packages); CI runs as root on
    Debian, where it starts. Stops at the end what this session started.
    """
    if os.geteuid() != 0:
        cluster_unavailable("local SLURM cluster needs root (slurm/local/start.sh installs and starts daemons)")
    proc = subprocess.run(["bash", str(ROOT / "slurm/local/start.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        cluster_unavailable(f"local SLURM cluster could not start (slurm/local/start.sh exit {proc.returncode}):\n"
                            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    started = "started slurmctld" in proc.stdout
    # SLURM_CONF names this cluster even where the environment names the 2-node one's (below)
    env = {"PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}", "SLURM_CONF": "/etc/slurm/slurm.conf"}
    yield env
    if started:
        subprocess.run(["bash", str(ROOT / "slurm/local/stop.sh")], capture_output=True, text=True)


SLURM_2NODE_DIR = Path(os.environ.get("LKM_SLURM2_DIR", "/tmp/lkm-slurm-2node"))


@pytest.fixture(scope="session")
def slurm_2node_cluster() -> dict[str, str]:
    """A real two-node SLURM cluster on this machine (slurm/local/start_2node.sh), started once.

    Nodes n1 (127.0.0.11) and n2 (127.0.0.12), one slurmd each in its own UTS namespace, one
    slurmctld; its own config (``SLURM_CONF``, which the returned environment sets: merge it into the
    environment of sbatch/scontrol calls, jobs inherit it) and ports, so it runs beside the
    single-node ``slurm_cluster``. Skips, with the reason, where it cannot start (not root, no
    slurm packages, no ``unshare``); stops at the end what this session started.
    """
    if os.geteuid() != 0:
        cluster_unavailable("the 2-node SLURM cluster needs root (slurm/local/start_2node.sh starts daemons in "
                            "their own UTS namespaces and writes /etc/hosts)")
    proc = subprocess.run(["bash", str(ROOT / "slurm/local/start_2node.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        cluster_unavailable(f"2-node SLURM cluster could not start (slurm/local/start_2node.sh exit "
                            f"{proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    started = "started slurm" in proc.stdout  # slurmctld or either slurmd
    env = {"PATH": f"{Path(PYTHON).parent}:{SLURM_2NODE_DIR / 'bin'}:{os.environ['PATH']}",
           "SLURM_CONF": str(SLURM_2NODE_DIR / "etc/slurm.conf")}
    yield env
    if started:
        subprocess.run(["bash", str(ROOT / "slurm/local/stop_2node.sh")], capture_output=True, text=True)


