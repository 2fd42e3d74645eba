"""Hangs are found by lack of progress, never by wall-clock limits (which a busy machine exceeds).

A child (or the test process) counts as hung when, for ``IDLE_S`` seconds, it wrote no output and its process tree
used less than ``IDLE_CPU_SHARE`` of one core; a spinning one is caught by a CPU budget (CPU seconds, which load
does not inflate). :func:`run_watched` / :class:`Watched` watch child processes and, when one hangs, kill it and
fail with its output, the kernel's and every Python thread's stacks; :func:`wait_until` waits on work outside the
process tree (SLURM jobs) by a progress value; :class:`Watchdog` watches the test process itself, session-wide.

Why these numbers: a process blocked in C (a queue, a pipe, a collective) uses no CPU; a watching thread that polls
(write_beton's, tqdm's) uses a few milliseconds a second, well under the share; a process that computes, however
slowly on a loaded machine, uses far more: on 2 cores loaded 10 deep it still gets about 20 % of one.
"""
from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TESTS = ROOT / "tests"

IDLE_S = float(os.environ.get("LKM_TEST_IDLE_S", "120"))
IDLE_CPU_SHARE = 0.02
WATCHDOG_S = float(os.environ.get("LKM_TEST_WATCHDOG_S", "300"))  # in-process hangs; 0 turns it off


class Hung(AssertionError):
    """A watched child made no progress (or spun past its CPU budget); the message has its output and stacks."""


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class TreeMeter:
    """CPU seconds used by process trees, counted so that the total only grows (an exited process keeps
    what it used). ``exclude_thread``: a thread of this process whose CPU is not the test's (the watchdog's)."""

    def __init__(self, exclude_thread: int | None = None) -> None:
        self.exclude_thread = exclude_thread
        self.used = 0.0
        self._last: dict[int, float] = {}

    def _cpu(self, p: psutil.Process) -> float:
        t = p.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        if self.exclude_thread is not None and p.pid == os.getpid():
            total -= sum(th.user_time + th.system_time for th in p.threads() if th.id == self.exclude_thread)
        return total

    def sample(self, roots: list[int]) -> float:
        now: dict[int, float] = {}
        for pid in roots:
            for p in _tree(pid):
                with contextlib.suppress(psutil.Error):
                    now[p.pid] = self._cpu(p)
        self.used += sum(max(0.0, v - self._last.get(pid, 0.0)) for pid, v in now.items())
        self._last = now
        return self.used


def describe_tree(roots: list[int]) -> str:
    """One line per process of the trees (pid, state, CPU, where the kernel has it waiting, command) and the
    kernel stack of each (root can read it): where a process blocked in C waits."""
    lines = []
    for pid in roots:
        for p in _tree(pid):
            try:
                with p.oneshot():
                    cpu = p.cpu_times()
                    cmd = " ".join(p.cmdline())[:200]
                    lines.append(f"  pid {p.pid} (parent {p.ppid()}) {p.status()}, cpu {cpu.user + cpu.system:.1f} s, "
                                 f"wchan {_proc_text(p.pid, 'wchan') or '?'}: {cmd}")
                stack = _proc_text(p.pid, "stack")
                if stack:
                    lines.extend(f"      {frame}" for frame in stack.splitlines()[:8])
            except psutil.Error:
                continue
    return "\n".join(lines) or "  (no process left)"


def _proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_text().strip()
    except OSError:
        return ""


def _kill_trees(roots: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in roots:
        for p in reversed(_tree(pid)):  # children first: a parent cannot respawn them
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)


class Watched:
    """A child process, its output collected as it comes and its process tree watched for progress.

    Python children run with faulthandler on (``PYTHONFAULTHANDLER``) and unbuffered, so a hung one
    prints every thread's stack when it gets SIGABRT, and its output counts as progress when written.
    """

    def __init__(self, cmd: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> None:
        self.cmd = [str(c) for c in cmd]
        env = {**os.environ, **(env or {}), "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
        # the suite's own child programs (``python -m children.<name>``) import from tests/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=stderr, start_new_session=True)
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.output_bytes = 0
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")) if stream]
        for t in self._readers:
            t.start()

    def _read(self, stream, name: str) -> None:
        while chunk := os.read(stream.fileno(), 65536):
            self._chunks[name].append(chunk)
            self.output_bytes += len(chunk)
        stream.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self, name: str) -> str:
        return b"".join(self._chunks[name]).decode(errors="replace")

    @property
    def output(self) -> str:
        """stdout and stderr so far (each in order; stdout first)."""
        return self.text("stdout") + self.text("stderr")

    def wait_for(self, ready: Callable[[], bool], what: str, *, others: Sequence[Watched] = (),
                 idle_s: float = IDLE_S, cpu_budget_s: float | None = None,
                 progress: Callable[[], object] | None = None) -> None:
        """Until ``ready()``; Hung when this child (with ``others``, whose progress counts too: processes that
        wait on each other) made no progress for ``idle_s`` or used more than ``cpu_budget_s`` of CPU, or
        AssertionError when it exited first. ``progress``: a value whose change counts as progress too, for
        work done outside the process tree (SLURM jobs: see :func:`files_progress`)."""
        group = [self, *others]
        meter = TreeMeter()
        samples: collections.deque[tuple[float, float, int]] = collections.deque()
        last_seen, changes = None, 0
        while not ready():
            if self.proc.poll() is not None and not ready():
                for t in self._readers:
                    t.join()
                if ready():
                    return
                raise AssertionError(f"{what}: the child exited first (code {self.proc.returncode}): {self.cmd}\n"
                                     f"{_tail(self.text('stdout'), 3000)}{_tail(self.text('stderr'), 6000)}")
            now = time.monotonic()
            used = meter.sample([w.pid for w in group])
            if progress is not None and (seen := progress()) != last_seen:
                last_seen, changes = seen, changes + 1
            out = sum(w.output_bytes for w in group) + changes
            samples.append((now, used, out))
            while len(samples) > 1 and samples[1][0] <= now - idle_s:
                samples.popleft()
            t0, used0, out0 = samples[0]
            if now - t0 >= idle_s and out == out0 and used - used0 < IDLE_CPU_SHARE * idle_s:
                _hang(group, f"{what}: no output and {used - used0:.2f} s of CPU in the last {now - t0:.0f} s "
                             f"(a process tree that works uses more than {IDLE_CPU_SHARE:.0%} of a core)")
            if cpu_budget_s is not None and used > cpu_budget_s:
                _hang(group, f"{what}: used {used:.0f} s of CPU, over its budget of {cpu_budget_s:.0f} s "
                             "(spinning without getting anywhere?)")
            time.sleep(0.25)

    def wait(self, *, others: Sequence[Watched] = (), idle_s: float = IDLE_S, cpu_budget_s: float | None = None,
             progress: Callable[[], object] | None = None) -> subprocess.CompletedProcess:
        """Wait for the exit of this child (and its readers), watched as in :meth:`wait_for`."""
        self.wait_for(lambda: self.proc.poll() is not None, f"waiting for {' '.join(self.cmd)[:300]}",
                      others=others, idle_s=idle_s, cpu_budget_s=cpu_budget_s, progress=progress)
        for t in self._readers:
            t.join()
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, self.text("stdout"), self.text("stderr"))

    def kill(self) -> None:
        """SIGKILL the child and everything it started (its session too: write_beton's own group leaves the tree
        when its parent is killed first)."""
        _kill_trees([self.pid])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()
        for t in self._readers:
            t.join(timeout=10)

    def __enter__(self) -> Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()


def _tail(text: str, n: int) -> str:
    return ("..." + text[-n:]) if len(text) > n else text


def _hang(group: Sequence[Watched], reason: str) -> None:
    """Describe the hung group (process tree, kernel stacks, then every Python thread's stack via SIGABRT and
    faulthandler), kill it and raise Hung with all of that and the output."""
    roots = [w.pid for w in group]
    tree = describe_tree(roots)
    _kill_trees(roots, signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER) prints every thread's stack
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(w.proc.poll() is None for w in group):
        time.sleep(0.1)
    for w in group:
        w.kill()
    outputs = "\n".join(f"--- {' '.join(w.cmd)[:200]} (exit {w.proc.returncode})\n--- stdout:\n"
                        f"{_tail(w.text('stdout'), 4000)}\n--- stderr (Python stacks at the end):\n"
                        f"{_tail(w.text('stderr'), 12000)}" for w in group)
    raise Hung(f"{reason}\nprocess tree when it was found:\n{tree}\n{outputs}")


def run_watched(cmd: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None, idle_s: float = IDLE_S,
                cpu_budget_s: float | None = None, check: bool = False,
                progress: Callable[[], object] | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that fails (Hung, with the output and every
    process's stacks) only when the child makes no progress for ``idle_s`` seconds (or spins past
    ``cpu_budget_s`` CPU seconds): no wall-clock limit. ``check``: a non-zero exit fails, with the output.
    ``progress``: as in :meth:`Watched.wait_for` (a child that waits for SLURM jobs)."""
    with Watched(cmd, cwd=cwd, env=env) as child:
        done = child.wait(idle_s=idle_s, cpu_budget_s=cpu_budget_s, progress=progress)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(done.args)} exited with {done.returncode}:\n{_tail(done.stdout, 3000)}"
                             f"{_tail(done.stderr, 6000)}")
    return done


def files_progress(*folders: Path) -> Callable[[], object]:
    """A ``progress`` for work outside the process tree (SLURM jobs): the names and sizes of the files under
    ``folders`` (logs, run directories), which grow while the work gets anywhere."""
    def sizes() -> tuple:
        found = []
        for folder in folders:
            for p in sorted(Path(folder).rglob("*")) if Path(folder).is_dir() else ():
                with contextlib.suppress(OSError):
                    if p.is_file():
                        found.append((str(p), p.stat().st_size))
        return tuple(found)
    return sizes


def wait_until(until: Callable[[], bool], what: str, progress: Callable[[], object], *, idle_s: float = IDLE_S,
               report: Callable[[], str] = lambda: "", poll_s: float = 1.0) -> None:
    """Poll until ``until()``; Hung (with ``report()``: job states, logs) when ``progress()`` did not change for
    ``idle_s`` seconds. For waits on work this process cannot watch as a process tree (SLURM jobs): a slow job
    that keeps writing its log is waited for, however long; one that stopped moving fails fast."""
    seen, moved = progress(), time.monotonic()
    while not until():
        now = progress()
        if now != seen:
            seen, moved = now, time.monotonic()
        elif time.monotonic() - moved > idle_s:
            raise Hung(f"no progress for {idle_s:.0f} s while waiting for {what}\n{report()}")
        time.sleep(poll_s)


class Watchdog(threading.Thread):
    """Session-wide: when the process tree of the test that is running (this process, minus this thread, and
    its children) used less than IDLE_CPU_SHARE of a core for WATCHDOG_S seconds, print every thread's stack
    (faulthandler) and the children's, interrupt the test session (SIGINT: pytest reports where it was and
    stops) and, when even that cannot wake the main thread (blocked in C), end the process.

    Tests marked ``slurm`` are not watched: their work runs in SLURM's daemons, outside this tree.
    """

    def __init__(self, config: pytest.Config, window_s: float) -> None:
        super().__init__(name="lkm-test-watchdog", daemon=True)
        self.config, self.window_s = config, window_s
        self.item: pytest.Item | None = None
        self.period = min(5.0, window_s / 4)

    def run(self) -> None:
        meter = TreeMeter(exclude_thread=threading.get_native_id())
        watched, samples = None, collections.deque()
        while True:
            time.sleep(self.period)
            item = self.item
            if item is None or item.get_closest_marker("slurm") is not None:
                watched = None
                continue
            now, used = time.monotonic(), meter.sample([os.getpid()])
            if item is not watched:
                watched = item
                samples.clear()
            samples.append((now, used))
            while len(samples) > 1 and samples[1][0] <= now - self.window_s:
                samples.popleft()
            t0, used0 = samples[0]
            if now - t0 >= self.window_s and used - used0 < IDLE_CPU_SHARE * self.window_s:
                self.fire(item, now - t0, used - used0)
                samples.clear()

    def fire(self, item: pytest.Item, idle: float, used: float) -> None:
        capman = self.config.pluginmanager.getplugin("capturemanager")
        captured = None
        if capman is not None:
            with contextlib.suppress(Exception):
                capman.suspend_global_capture(in_=True)
                captured = capman.read_global_capture()
        err = sys.stderr
        err.write(f"\n{'+' * 30} WATCHDOG {'+' * 30}\n{item.nodeid}: no progress for {idle:.0f} s (its process "
                  f"tree used {used:.2f} s of CPU, under {IDLE_CPU_SHARE:.0%} of a core).\n")
        if captured is not None:
            err.write(f"captured stdout:\n{_tail(captured.out, 3000)}\ncaptured stderr:\n{_tail(captured.err, 6000)}\n")
        children = [p.pid for p in psutil.Process().children()]
        err.write(f"child processes:\n{describe_tree(children)}\nstacks of this process's threads:\n")
        err.flush()
        faulthandler.dump_traceback(file=err, all_threads=True)
        err.write("interrupting the session (SIGINT)\n")
        err.flush()
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + min(60.0, self.window_s)
        while time.monotonic() < deadline:
            if self.item is not item:
                return
            time.sleep(0.5)
        err.write(f"{item.nodeid} is still blocked after SIGINT (in C code that does not return): ending the "
                  "test session\n")
        err.flush()
        _kill_trees(children)
        os._exit(70)




def install_watchdog(config: pytest.Config) -> None:
    """Start the session's watchdog (``LKM_TEST_WATCHDOG_S`` seconds without progress; 0 turns it off)."""
    if WATCHDOG_S > 0:
        config._lkm_watchdog = Watchdog(config, WATCHDOG_S)
        config._lkm_watchdog.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Tell the watchdog which test runs (conftest imports this hook)."""
    dog = getattr(item.config, "_lkm_watchdog", None)
    if dog is not None:
        dog.item = item
    try:
        return (yield)
    finally:
        if dog is not None:
            dog.item = None
