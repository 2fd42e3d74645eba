"""Session fixtures shared by the pretraining tests (tiny .beton files, a local SLURM cluster), and hang
detection by lack of progress: :func:`run_watched` / :class:`Watched` for child processes, a session-wide
watchdog for the test process itself."""

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

import numpy as np
import psutil
import pytest
from PIL import Image

from segmentation.crf import default_workers  # numpy only: torch is not imported before OMP_NUM_THREADS is set

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

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


# ---------------------------------------------------------------------------------------------
# Hangs are found by lack of progress, not by wall-clock limits that a busy machine exceeds
# ---------------------------------------------------------------------------------------------
# A child (or this test process) counts as hung when, for IDLE_S seconds, it wrote no output and its
# process tree used less than IDLE_CPU_SHARE of one core. A process blocked in C (a queue, a pipe, a
# collective) uses none; a watching thread that polls (write_beton's, tqdm's) uses a few milliseconds
# a second, well under the share; a process that computes, however slowly on a loaded machine, uses
# far more: on 2 cores loaded 10 deep it still gets about 20 % of one. A spinning child (busy, yet
# going nowhere) is caught by a CPU budget instead: CPU seconds, which a busy machine does not inflate
# as it inflates wall time.
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


class _Watchdog(threading.Thread):
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


# ---------------------------------------------------------------------------------------------
# In parallel (pytest-xdist: ``make test`` runs ``-n auto --dist loadfile --no-loadscope-reorder``)
# ---------------------------------------------------------------------------------------------
# A serial run leaves a 2-core machine idle ~40 % of the time (process start-up, imports, numba compiles,
# one-task SLURM jobs), so two workers share it. A unit of work is a test file (its module fixtures are
# computed once), except that every test needing a SLURM cluster is in one unit, "slurm": the clusters are
# daemons of this machine, started once and stopped by the session that started them, and jobs of two
# workers would queue behind each other on the same 2 CPUs. The scheduler sees node ids only, so those
# tests are found by name (``tests/test_slurm*.py``, or a test named ``test_slurm_*``); collection checks
# that every test asking for a cluster fixture is named so. The units known to take longest go first
# (measured serially: 6 min for the SLURM tests, 7 for test_compare, 2.5 for test_faults), so that no long
# unit starts last.
SLURM_FIXTURES = ("slurm_cluster", "slurm_2node_cluster")
LONGEST_FIRST = ("slurm", "tests/test_compare.py", "tests/test_faults.py")
MAX_WORKERS = 8  # more gains little (about 20 units); each worker holds its own session fixtures


def xdist_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: ``slurm`` or its file."""
    path, _, name = nodeid.partition("::")
    if Path(path).name.startswith("test_slurm") or name.startswith("test_slurm"):
        return "slurm"
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return min(default_workers(), MAX_WORKERS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile``: xdist's file-by-file scheduling, with the SLURM tests as one unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit(nodeid)

    return UnitScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misnamed = [item.nodeid for item in items
                if any(f in item.fixturenames for f in SLURM_FIXTURES) and xdist_unit(item.nodeid) != "slurm"]
    if misnamed:
        raise pytest.UsageError(f"tests that need a SLURM cluster must be named test_slurm_* (or live in "
                                f"tests/test_slurm*.py) so that one worker runs them all: {misnamed}")
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return  # a plain run keeps pytest's order
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_unit(item.nodeid), len(rank)))  # stable: file order otherwise


def _share_cores_between_workers() -> None:
    """One worker's torch (and its children's) gets cores / workers threads: oversubscribed OpenMP threads
    spin-wait on each other. An explicit OMP_NUM_THREADS is left as it is."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(default_workers(workers))


def pytest_configure(config: pytest.Config) -> None:
    _share_cores_between_workers()
    if WATCHDOG_S > 0:
        config._lkm_watchdog = _Watchdog(config, WATCHDOG_S)
        config._lkm_watchdog.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    dog = getattr(item.config, "_lkm_watchdog", None)
    if dog is not None:
        dog.item = item
    try:
        return (yield)
    finally:
        if dog is not None:
            dog.item = None
