"""One writer per folder: an exclusive ``flock`` on ``<folder>/.lkm.lock`` for as long as a run (or a comparison)
writes there.

Two processes on one run directory would resume each other's checkpoints, mix their weights and write every
metric twice; so a training run holds its run directory's lock, and ``experiments.compare`` its output
folder's. A second process stops at once with :class:`FolderLocked`, naming the holder (host, pid, start time,
command), which the holder writes into the lock file once it has the lock.

``flock`` rather than a pid file: the kernel releases the lock when the holder exits, however it exits
(``kill -9``, a crash, a node reboot for a local disk), so a dead holder never blocks a restart; its file
descriptor is not inherited by programs it starts (close-on-exec). Where it does not protect:

* NFS mounted with ``nolock`` or ``local_lock=flock|all``, and Lustre mounted with ``localflock``: the lock
  holds between processes of one host only. :func:`lock_scope` reads the mount's options and the run logs a
  warning naming the mount; keep the run directories of jobs on several hosts elsewhere.
* Lustre without ``-o flock`` and some FUSE file systems refuse ``flock``: the run stops with an error that
  says so (``LKM_NO_LOCK=1`` runs without the lock, at your own risk, with a warning).
* NFS otherwise (v3 with lockd, v4) locks across hosts; when a *host* holding the lock dies, the server
  releases it after its lease (NFSv4: about 90 s), not at once.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "FolderLocked", "FolderLock", "lock_folder", "lock_scope", "holder_of"]

LOCK_NAME = ".lkm.lock"
NO_LOCK_ENV = "LKM_NO_LOCK"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderLocked(ConfigError):
    """Another process holds the folder's lock (a ConfigError: the fix is in the command, another run.dir or
    output, or waiting for the holder)."""


def holder_of(folder: str | Path) -> dict[str, object]:
    """What the holder of ``folder``'s lock wrote about itself ({} when nothing could be read)."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, object]) -> str:
    if not holder:
        return "a process that has not said who it is yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            f" ({holder.get('command', '?')})")


def _dead_here(holder: dict[str, object]) -> bool:
    """Whether the record names a process of this host that no longer runs (a predecessor's record)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _read_mountinfo() -> str:
    try:
        return Path("/proc/self/mountinfo").read_text()
    except OSError:  # not Linux
        return ""


def _mount_of(path: Path) -> tuple[str, str, set[str]] | None:
    """(mount point, file system type, options) of the mount holding ``path``, from /proc/self/mountinfo."""
    lines = _read_mountinfo().splitlines()
    best = None
    target = str(path.resolve())
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, tail[0], set(fields[5].split(",")) | set(tail[2].split(",")))
    return best


def lock_scope(folder: str | Path) -> str | None:
    """Why a lock in ``folder`` would hold on this host only (NFS ``nolock`` / ``local_lock``, Lustre
    ``localflock``), or None where it holds for every host that mounts it (or nothing says otherwise)."""
    mount = _mount_of(Path(folder))
    if mount is None:
        return None
    point, fstype, options = mount
    local = None
    if fstype.startswith("nfs"):
        if "nolock" in options:
            local = "nolock"
        local = local or next((o for o in options if o in ("local_lock=flock", "local_lock=all")), None)
    elif fstype == "lustre" and "localflock" in options:
        local = "localflock"
    if local is None:
        return None
    return (f"{point} is {fstype} mounted with {local}: its locks are local to this host, so a process on another "
            "host using the same folder would not be stopped")


class FolderLock:
    """The exclusive lock of one folder, held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, folder: str | Path, what: str = "run directory") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderLocked` naming the holder; creates the folder."""
        if self._fd is not None:
            return self
        if os.environ.get(NO_LOCK_ENV) == "1":
            log.warning("%s=1: %s %s is not locked; a second process on it would mix its files with this one's",
                        NO_LOCK_ENV, self.what, self.folder)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderLocked(self._held_message()) from None
            if e.errno in _UNSUPPORTED:
                raise ConfigError(
                    f"cannot lock {self.what} {self.folder}: its file system does not support flock "
                    f"({os.strerror(e.errno)}). Mount it with lock support (NFS without nolock, Lustre with -o "
                    f"flock) or use a folder elsewhere; {NO_LOCK_ENV}=1 runs without the lock, and then nothing "
                    "stops a second process on the same folder") from None
            raise
        self._fd = fd
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        if (scope := lock_scope(self.folder)) is not None:
            log.warning("the lock of %s %s protects against processes of this host only: %s", self.what,
                        self.folder, scope)
        return self

    def _held_message(self) -> str:
        holder = holder_of(self.folder)
        for _ in range(20):  # the holder writes who it is right after taking the lock (over its predecessor's)
            if holder and not _dead_here(holder):
                break
            time.sleep(0.05)
            holder = holder_of(self.folder)
        return (f"{self.what} {self.folder} is in use by another process: {_describe(holder)}. Two processes on one "
                f"{self.what} would mix their files; wait for that one to end (the lock goes with it), or use "
                "another folder")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_folder(folder: str | Path, what: str = "run directory") -> FolderLock:
    """:class:`FolderLock` of ``folder``, acquired."""
    return FolderLock(folder, what).acquire()
