"""Training checkpoints in a run directory: atomic writes, discovery, RNG state, safe resume.

Files are named ``checkpoint_<step>.pt`` (global optimiser step, zero-padded) so that the
latest one is the highest number and a new one never replaces an older file: a crash while
writing leaves the previous checkpoints intact. Writing goes to a temporary file in the same
directory, is flushed to disk, then renamed over the final name with ``os.replace`` (atomic on
POSIX), so a reader never sees half a checkpoint. Only the newest ``keep`` are kept.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (other model, unreadable file...)."""


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:09d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step``; then drop all but the newest ``keep``.

    A checkpoint for this step that already exists is left as it is (same step, same state:
    e.g. a preemption signal right after the end-of-epoch checkpoint).
    """
    path = checkpoint_path(run_dir, step)
    if path.exists():
        return path
    save_atomic(state, path)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a training checkpoint on CPU and check that it belongs to this run.

    ``expect`` maps keys (e.g. ``model_name``, ``num_classes``, ``format``) to the values this run
    has; any difference raises CheckpointError naming the file, the key and both values.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"cannot read checkpoint {path}: {e}. Delete it to restart from the "
                              "previous checkpoint, or choose another run directory.") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (holds a {type(state).__name__})")
    check_compatible(state, path, expect or {})
    return state


def check_compatible(state: dict[str, Any], path: str | Path, expect: dict[str, Any]) -> None:
    for key, want in expect.items():
        have = state.get(key, "<missing>")
        if have != want:
            raise CheckpointError(
                f"run directory holds checkpoint {path} with {key}={have!r}, but this run has "
                f"{key}={want!r}. Use another run directory (run.dir=...) to start a new run, or "
                "the same settings to resume that one; nothing was overwritten.")


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """The small metadata entries of a checkpoint (everything but tensors and optimiser state)."""
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return {k: v for k, v in state.items() if isinstance(v, str | int | float | bool) or k == "config"}


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states (all of this process).

    Plain ints, tuples and tensors only, so a checkpoint still loads with
    ``torch.load(weights_only=True)`` (timm's loader) although it carries RNG state.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG state for %d devices, this process sees %d: not restored",
                        len(cuda), torch.cuda.device_count())
