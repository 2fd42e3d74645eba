"""Output files written whole or not at all: JSON, ``.npz``, PNG, text (``engine.checkpoint.save_atomic`` does
the same for torch files).

Each file is written to a temporary name beside its target (``.<name>.<random>.tmp``, which
``engine.checkpoint.remove_stale_temporaries`` also recognises), flushed to disk, given the mode the umask
gives a new file, then renamed over the target with ``os.replace``. A failure (a full disk, no permission)
leaves the target as it was, removes the temporary file, and raises :class:`WriteError`, whose message is one
line naming the file and the fix. :func:`write_files` writes several files that belong together (a score JSON
and its per-image counts) all to temporaries first and renames them only once every one is complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

Writer = Callable[[IO[bytes]], Any]  # writes the file's content to an open binary file


class WriteError(RuntimeError):
    """An output file could not be written (full disk, no permission...); the target is untouched."""


def write_files(outputs: Mapping[str | Path, Writer]) -> list[Path]:
    """Write each ``path: writer`` to a temporary file beside ``path``; once all are complete, rename them into
    place, in order. Returns the paths. Raises :class:`WriteError` (nothing renamed, no temporary left)."""
    done: list[tuple[str, Path]] = []
    current = Path()
    try:
        for path, write in outputs.items():
            current = Path(path)
            done.append((_write_temporary(current, write), current))
        for tmp, current in done:
            os.replace(tmp, current)
    except BaseException as e:
        for tmp, _ in done:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(_message(current, e)) from None
        raise
    return [path for _, path in done]


def write_file(path: str | Path, write: Writer) -> Path:
    """One file, written whole or not at all (see :func:`write_files`)."""
    return write_files({path: write})[0]


def write_json(path: str | Path, obj: Any) -> Path:
    return write_file(path, json_writer(obj))


def json_writer(obj: Any) -> Writer:
    """``obj`` as indented JSON with a final newline."""
    text = json.dumps(obj, indent=1) + "\n"  # serialised now: an unserialisable object fails before any file
    return lambda f: f.write(text.encode())


def npz_writer(arrays: Mapping[str, np.ndarray]) -> Writer:
    """``np.savez_compressed`` of ``arrays`` (to the open file: no ``.npz`` appended to the name)."""
    return lambda f: np.savez_compressed(f, **arrays)


def png_writer(image: Any) -> Writer:
    """A PIL image as PNG."""
    return lambda f: image.save(f, format="PNG")


def _write_temporary(path: Path, write: Writer) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _message(path: Path, e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "no space left"
        return (f"cannot write {path}: the disk is full ({free} in {path.parent}); free some space and run the "
                "same command again (nothing half-written was left)")
    return f"cannot write {path}: {e.strerror or e}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
