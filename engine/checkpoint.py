"""Files a run writes that hold weights: atomic writes, checked contents, rotation, RNG state, safe resume.

Training checkpoints are named ``checkpoint_<step>.pt`` (global optimiser step, zero-padded) so that
the latest one is the highest number and a new one never replaces an older file. Every file is
written to a temporary name in the same directory, flushed to disk, then renamed over the final name
with ``os.replace`` (atomic on POSIX): a reader never sees half a file, a crash while writing leaves
the previous checkpoints intact, and a temporary file left by a killed process is removed at the next
start (:func:`remove_stale_temporaries`).

A checkpoint is only written when every floating-point tensor of its weights is finite
(:func:`nonfinite_tensors`): a diverged run keeps the checkpoints it had, and rotation (the newest
``keep`` are kept) can then never remove the last good one. Files get the mode the umask gives any
new file (``tempfile`` would leave them 0600).

No file runs code when read: everything is loaded with ``torch.load(weights_only=True)``, which refuses
a pickle of anything but tensors and plain values (run directories are shared and copied; a pickle that
calls ``os.system`` is an error naming the file, and nothing of it runs). What is written is sealed: a
dict written by :func:`save_atomic` carries ``content_sha256``, the SHA-256 of everything it holds
(:func:`content_digest`: every key, plain value and tensor's bytes, in order), and reading it back checks
that digest (:func:`verify_content`), so a checkpoint or weights file changed on disk after it was written
(a bad block, a partial copy, bytes overwritten) is named and refused instead of training on.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as distrib

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
_TEMPORARY_RE = re.compile(r"^\..+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written (other model, unreadable file, full disk...)."""


class NonFiniteWeightsError(CheckpointError):
    """Weights with NaN/inf were about to be saved; nothing was written."""


class DamagedCheckpointError(CheckpointError):
    """A file whose content is not what was written (digest mismatch), or that cannot be read at all."""


# The key of a sealed file's digest (see the module docstring).
CONTENT_KEY = "content_sha256"


def content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: dict keys and values in order, plain values by type and ``repr``,
    tensors by dtype, shape and bytes. Raises TypeError for anything else (a checkpoint holds tensors and
    plain values only, or ``torch.load(weights_only=True)`` could not read it back)."""
    h = hashlib.sha256()
    _digest_into(h, obj, "")
    return h.hexdigest()


def _digest_into(h: Any, obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, not copied
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _digest_into(h, k, where)
            _digest_into(h, v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list | tuple):  # torch.Size too (a tuple)
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for i, v in enumerate(obj):
            _digest_into(h, v, f"{where}[{i}]")
    elif obj is None or isinstance(obj, bool | int | float | str | bytes | torch.dtype | torch.device):
        text = repr(obj).encode()
        h.update(f"{type(obj).__name__}:{len(text)}:".encode())
        h.update(text)
    else:
        raise TypeError(f"cannot seal {type(obj).__name__} at '{where}': a checkpoint holds tensors and plain "
                        "values only (torch.load(weights_only=True) reads nothing else)")


def seal(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with its :func:`content_digest` under :data:`CONTENT_KEY` (replacing an older one)."""
    body = {k: v for k, v in state.items() if k != CONTENT_KEY}
    return {**body, CONTENT_KEY: content_digest(body)}


def verify_content(state: Mapping[str, Any], path: str | Path) -> bool:
    """Check a loaded file against the digest it carries: True when it matches, False for a file written
    without one (before files were sealed); raises :class:`DamagedCheckpointError` naming ``path`` when the
    content differs from what was written."""
    recorded = state.get(CONTENT_KEY)
    if recorded is None:
        return False
    body = {k: v for k, v in state.items() if k != CONTENT_KEY}
    try:
        actual = content_digest(body)
    except TypeError as e:
        raise DamagedCheckpointError(f"{path} is damaged: {e}") from None
    if actual != recorded:
        raise DamagedCheckpointError(
            f"{path} is damaged: its content is not what was written (SHA-256 {actual[:12]}, recorded "
            f"{recorded[:12]} when it was written): a bad disk, an incomplete copy or bytes overwritten")
    return True


def read_sealed(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, its digest checked (:func:`verify_content`).

    Raises :class:`DamagedCheckpointError` naming the file when it cannot be read (truncated, not a torch
    file, or a pickle of objects other than tensors and plain values: refused, not run) or its content
    is not what was written.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise DamagedCheckpointError(_unreadable(path, e)) from None
    if isinstance(state, Mapping):
        verify_content(state, path)
    return state


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file + ``os.replace``; mode from the umask. A dict is
    sealed first (:func:`seal`: its content digest goes in with it).

    A full disk raises :class:`CheckpointError` saying how much the file needed and how much was free;
    ``path`` is then untouched and no temporary file stays behind.
    """
    path = Path(path)
    if isinstance(obj, Mapping):
        obj = seal(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and _disk_full(e, path.parent, _state_bytes(obj)):
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"disk full while writing {path}: it needs about {_mib(_state_bytes(obj))} and {path.parent} has "
                f"{_mib(free)} free. Free some space (older runs, *.beton copies) and start the same command again: "
                "the previous checkpoint is intact and the run resumes from it.") from None
        raise
    return path


def _disk_full(e: BaseException, folder: Path, needed: int) -> bool:
    """Whether writing failed for want of space. torch's zip writer turns a disk that fills up mid-file into a
    RuntimeError ("unexpected pos"), with the ENOSPC chained to it or, after a short write, none at all: then
    less free space than the file needs says it."""
    chain: BaseException | None = e
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        chain = chain.__cause__ or chain.__context__
    return isinstance(e, RuntimeError) and shutil.disk_usage(folder).free < needed


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint: what writing it needs, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_state_bytes(v) for v in obj)
    return 0


def nonfinite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding NaN or inf."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(weights: Iterable[tuple[str, Mapping[str, Any]]], what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming ``what`` and the tensors when any weight is NaN/inf."""
    bad = [f"{name}.{k}" if name else k for name, sd in weights for k in nonfinite_tensors(sd)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteWeightsError(f"{what} not written: {len(bad)} weight tensor(s) hold NaN/inf ({shown})")


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


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete ``.<name>.<random>.tmp`` files that a killed writer left in ``run_dir``; return them."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.iterdir() if _TEMPORARY_RE.match(p.name)] if run_dir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted write in %s", len(stale), run_dir)
    return stale


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int = 2,
                    weights_keys: tuple[str, ...] = ("model", "model_ema")) -> Path:
    """Write ``state`` as the checkpoint of ``step``, then drop all but the newest ``keep``.

    The tensors under ``weights_keys`` must be finite (else :class:`NonFiniteWeightsError`, nothing
    written, nothing rotated). A checkpoint for this step that already exists is left as it is (same
    step, same state: e.g. a preemption signal right after the end-of-epoch checkpoint).
    """
    path = checkpoint_path(run_dir, step)
    if path.exists():
        return path
    check_finite(((k, state[k]) for k in weights_keys if isinstance(state.get(k), Mapping)), f"checkpoint {path}")
    save_atomic(state, path)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a training checkpoint on CPU (:func:`read_sealed`: no code runs, the content is checked) and
    check that it belongs to this run.

    ``expect`` maps keys (e.g. ``model_name``, ``num_classes``, ``format``) to the values this run
    has; any difference raises CheckpointError naming the file, the key and both values.
    """
    path = Path(path)
    state = read_sealed(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (holds a {type(state).__name__})")
    check_compatible(state, path, expect or {})
    return state


def _unreadable(path: Path, e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError):  # weights_only refused a global: the file holds objects we never write
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = found.group(1) if found else "objects other than tensors and plain values"
        return (f"cannot read checkpoint {path}: it holds Python objects ({what}) that this project never writes, "
                "and torch.load(weights_only=True) refused to run them. Do not use the file: delete it, or choose "
                "another run.dir.")
    return (f"cannot read checkpoint {path} ({type(e).__name__}: {e}). It is damaged (a kill or a full disk "
            "while writing?): delete it to resume from the checkpoint before it, or choose another run.dir.")


def check_compatible(state: dict[str, Any], path: str | Path, expect: dict[str, Any]) -> None:
    for key, want in expect.items():
        have = state.get(key, "<missing>")
        if have != want:
            raise CheckpointError(
                f"run directory holds checkpoint {path} with {key}={have!r}, but this run has "
                f"{key}={want!r}. Use another run directory (run.dir=...) to start a new run, or "
                "the same settings to resume that one; nothing was overwritten.")


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """The small metadata entries of a checkpoint (everything but tensors and optimiser state), its content
    checked (:func:`read_sealed`, memory-mapped)."""
    path = Path(path)
    state = read_sealed(path, mmap=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (holds a {type(state).__name__})")
    return {k: v for k, v in state.items()
            if (isinstance(v, str | int | float | bool | None) and k != CONTENT_KEY) or k == "config"}


def export_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU copies (what a weights file holds)."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
            for k, v in module.state_dict().items()}


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


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, in rank order (a collective: all ranks call it)."""
    if not distrib.is_initialized():
        return [capture_rng_state()]
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, capture_rng_state())
    return states


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


def restore_rank_rng(states: list[dict[str, Any]], rank: int, world_size: int) -> bool:
    """Restore this rank's RNG from a checkpoint's per-rank states; False (and a warning) when the
    checkpoint was written by another number of processes."""
    if len(states) != world_size:
        log.warning("checkpoint was written by %d processes, this run has %d: RNG states not restored",
                    len(states), world_size)
        return False
    restore_rng_state(states[rank])
    return True
