"""The suite's shared fixtures (tiny .beton files, a finished tiny pretraining, the local SLURM clusters) and its
plumbing, each in a module of its own that this file wires in: ``hangs`` (hangs found by lack of progress: child
processes and a session watchdog), ``parallel`` (the units pytest-xdist schedules), ``clusters`` (SLURM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clusters import slurm_2node_cluster, slurm_cluster  # noqa: F401 - fixtures, registered by being here
from hangs import PYTHON, ROOT, install_watchdog, pytest_runtest_protocol, run_watched  # noqa: F401 - a hook
from parallel import (  # noqa: F401 - hooks, registered by being here
    pytest_collection_modifyitems,
    pytest_xdist_auto_num_workers,
    pytest_xdist_make_scheduler,
    share_cores_between_workers,
)
from PIL import Image


def pytest_configure(config: pytest.Config) -> None:
    share_cores_between_workers()
    install_watchdog(config)


# Class colours for the pretraining fixture (far apart: a tiny net separates them in a few steps).
PRETRAIN_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40)]


def write_flat_colour_folder(root: Path, per_class: int, seed: int) -> None:
    """ImageNet-style tree of single-colour JPEGs (one colour per class, jittered per image).

    Single-colour images look the same after any crop, resize or flip: the loader's augmentation
    cannot change a batch here, so these runs cannot show whether it is reproducible; the textured
    fixture (:func:`textured_betons`) does.
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
        run_watched([PYTHON, "-m", "backbone.write_beton", "--data-dir", str(base / split), "--out",
                     str(out[split]), "--num-workers", "1", "--max-resolution", "80"], check=True)
    return out


@pytest.fixture(scope="session")
def textured_betons(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train.beton (4 classes x 32 images) and val.beton (4 x 8) of striped, noisy images of 40-80 px
    (tests/imagenet_fixture.py; ``train_dir``: the training images): a different crop or flip gives a
    different batch, so a run's weights depend on the augmentation (the flat-colour fixture hides it)."""
    from imagenet_fixture import make_imagefolder

    base = tmp_path_factory.mktemp("textured_data")
    out = {"train_dir": base / "train"}
    for split, per_class, seed in (("train", 32, 0), ("val", 8, 1)):
        make_imagefolder(base / split, classes=4, per_class=per_class, size_range=(40, 80), seed=seed,
                         oddities=False)
        out[split] = base / f"{split}.beton"
        run_watched([PYTHON, "-m", "backbone.write_beton", "--data-dir", str(base / split), "--out",
                     str(out[split]), "--num-workers", "1", "--max-resolution", "80"], check=True)
    return out


@pytest.fixture(scope="session")
def pretrain_straight(pretrain_betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pretraining run (configs/pretrain/tiny_cpu.yaml, 2 epochs) straight through, in this process, for
    the resume tests to compare with; what its RandomDraws flag drew is in draws.json beside the run directory."""
    import json

    from signal_after import RandomDraws

    from backbone.train import PretrainConfig, run
    from engine.config import load_config

    run_dir = tmp_path_factory.mktemp("pretrain") / "straight"
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/tiny_cpu.yaml",
                      [f"data.train={pretrain_betons['train']}", f"data.val={pretrain_betons['val']}",
                       f"run.dir={run_dir}", "train.epochs=2"])
    flag = RandomDraws()
    assert run(cfg, preempt=flag) == "finished"
    (run_dir.parent / "draws.json").write_text(json.dumps(flag.draws))
    return run_dir


