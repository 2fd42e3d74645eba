"""Where a number came from: content hashes, recipe hashes, the code version, and the run record.

Reuse is decided by content, never by modification times: a file is named by the SHA-256 of its
bytes, a recipe by the hash of its resolved config (minus the keys that cannot change a result, e.g.
log intervals and paths that move with an output folder), the code by its git commit. Every run
directory holds ``run.json`` (:func:`write_run_record`): what the latest attempt ran with -- world size,
global batch, seed, recipe hash, code version -- and, once known, the hashes of the files it read.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["file_sha256", "recipe_hash", "config_recipe_hash", "flatten", "code_version", "write_run_record",
           "read_run_record", "RUN_RECORD"]

RUN_RECORD = "run.json"
_ROOT = Path(__file__).resolve().parents[1]


_HASHES: collections.OrderedDict[tuple, str] = collections.OrderedDict()  # file identity -> SHA-256
_HASHES_KEPT = 256
# A file changed this recently may change again within its timestamps' granularity (a coarse clock tick,
# seconds on some network file systems) with the same size: its hash is not kept (git's "racily clean").
_SETTLED_NS = 3_000_000_000


def _identity(st: os.stat_result, path: str) -> tuple:
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes. Kept per process for files that have not changed for a few seconds, by
    path, inode, size and both timestamps (the ctime moves with any write or ``touch``, which the mtime
    does not have to), so the cache only saves re-reading: the answer is always the content's."""
    resolved = str(Path(path).resolve())
    before = os.stat(resolved)
    key = _identity(before, resolved)
    if (known := _HASHES.get(key)) is not None:
        _HASHES.move_to_end(key)
        return known
    h = hashlib.sha256()
    with open(resolved, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > _SETTLED_NS
    if settled and _identity(os.stat(resolved), resolved) == key:  # unchanged while it was read
        _HASHES[key] = digest
        while len(_HASHES) > _HASHES_KEPT:
            _HASHES.popitem(last=False)
    return digest


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


def config_recipe_hash(cfg: Any) -> str:
    """The recipe hash of a stage's config (a dataclass): every resolved value except the keys its class
    names in ``NOT_RECIPE`` (paths, logging, machine settings). What ``run.json`` records."""
    return recipe_hash(dataclasses.asdict(cfg), getattr(type(cfg), "NOT_RECIPE", ()))


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
