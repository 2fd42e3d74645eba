"""Where a number came from: content hashes, recipe hashes, the code version, and the run record.

Reuse is decided by content, never by modification times: a file is named by the SHA-256 of its
bytes, a recipe by the hash of its resolved config (minus the keys that cannot change a result, e.g.
log intervals and paths that move with an output folder), the code by its git commit. Every run
directory holds ``run.json`` (:func:`write_run_record`): what the latest attempt ran with -- world size,
global batch, seed, recipe hash, code version -- and, once known, the hashes of the files it read.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["file_sha256", "recipe_hash", "flatten", "code_version", "write_run_record", "read_run_record",
           "RUN_RECORD"]

RUN_RECORD = "run.json"
_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (cached per process by path, size and mtime: the cache only saves
    re-reading, the answer is always the content's)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (tuples become lists, as YAML and JSON read them back)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def recipe_hash(config: Mapping[str, Any], exclude: Iterable[str] = ()) -> str:
    """A short hash of a resolved config without the ``exclude`` keys (dotted): equal recipes, equal hash."""
    skip = set(exclude)
    flat = {k: v for k, v in flatten(config).items() if k not in skip}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with uncommitted changes to tracked files), else the
    installed package version."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"package {version('large-kernel-matters')}"
    except PackageNotFoundError:
        return "unknown"


def write_run_record(run_dir: str | Path, **fields: Any) -> Path:
    """Merge ``fields`` into ``run_dir/run.json`` (written atomically) and return its path."""
    path = Path(run_dir) / RUN_RECORD
    record = read_run_record(run_dir)
    record.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir/run.json`` as a dict ({} when there is none)."""
    path = Path(run_dir) / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}
