"""Session fixtures shared by the pretraining tests: tiny .beton files and a local SLURM cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Class colours for the pretraining fixture (far apart: a tiny net separates them in a few steps).
PRETRAIN_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40)]


def write_flat_colour_folder(root: Path, per_class: int, seed: int) -> None:
    """ImageNet-style tree of single-colour JPEGs (one colour per class, jittered per image).

    Single-colour images look the same after any crop, resize or flip, so the (unseeded, numba)
    random augmentation of the ffcv loader cannot change a batch: two runs see identical data,
    which the resume test needs to compare weights exactly.
    """
    rng = np.random.default_rng(seed)
    for label, colour in enumerate(PRETRAIN_COLOURS):
        folder = root / f"n{label + 1:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(40, 80, size=2))
            c = np.clip(np.array(colour) + rng.integers(-25, 26, size=3), 0, 255).astype(np.uint8)
            image = Image.fromarray(np.broadcast_to(c, (h, w, 3)).copy())
            image.save(folder / f"img_{i:04d}.JPEG", quality=95)


@pytest.fixture(scope="session")
def pretrain_betons(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train.beton (4 classes x 32 images) and val.beton (4 x 8), written by backbone.write_beton."""
    base = tmp_path_factory.mktemp("pretrain_data")
    out = {}
    for split, per_class, seed in (("train", 32, 0), ("val", 8, 1)):
        write_flat_colour_folder(base / split, per_class, seed)
        out[split] = base / f"{split}.beton"
        subprocess.run([PYTHON, "-m", "backbone.write_beton", "--data-dir", str(base / split), "--out",
                        str(out[split]), "--num-workers", "1", "--max-resolution", "80"],
                       cwd=ROOT, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """A real single-node SLURM cluster on localhost (slurm/local/start.sh), started once.

    Skips, with the reason, where it cannot start (not root, no apt/packages); CI runs as root on
    Debian, where it starts. Stops at the end what this session started.
    """
    if os.geteuid() != 0:
        pytest.skip("local SLURM cluster needs root (slurm/local/start.sh installs and starts daemons)")
    proc = subprocess.run(["bash", str(ROOT / "slurm/local/start.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"local SLURM cluster could not start (slurm/local/start.sh exit {proc.returncode}):\n"
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
        pytest.skip("the 2-node SLURM cluster needs root (slurm/local/start_2node.sh starts daemons in "
                    "their own UTS namespaces and writes /etc/hosts)")
    proc = subprocess.run(["bash", str(ROOT / "slurm/local/start_2node.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"2-node SLURM cluster could not start (slurm/local/start_2node.sh exit {proc.returncode}):\n"
                    f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    started = "started slurm" in proc.stdout  # slurmctld or either slurmd
    env = {"PATH": f"{Path(PYTHON).parent}:{SLURM_2NODE_DIR / 'bin'}:{os.environ['PATH']}",
           "SLURM_CONF": str(SLURM_2NODE_DIR / "etc/slurm.conf")}
    yield env
    if started:
        subprocess.run(["bash", str(ROOT / "slurm/local/stop_2node.sh")], capture_output=True, text=True)
