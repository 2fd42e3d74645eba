"""Fault injection: SIGKILL at seeded random points of writing a .beton, of checkpointing and of training, a
full disk (a small tmpfs) while writing and while checkpointing, dead writer processes, signals, divergence.

After every fault: nothing that looks finished is wrong (a ``.beton`` has its JSON and holds what the JSON
says; a checkpoint or ``final.pth`` is whole and finite), every checkpoint left loads, and a resumed run
ends with the weights of an uninterrupted one (deterministic mode, one thread).

Cost: each fault needs a process that dies, and a fresh Python with torch costs seconds. So one child
process per stage (the writer "lab", the fine-tuning "lab") imports everything once and forks a process
for every injected fault; the test process only reads what they report. ``LKM_FAULT_SEED`` changes the
seed of the random points (default 14); a failure message names the points chosen.

Every child is watched for progress (hangs.run_watched / Watched): a hang fails with the stacks of the
processes involved, never because a busy machine was slow.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from clusters import cluster_unavailable
from hangs import PYTHON, ROOT, Hung, Watched, run_watched
from imagenet_fixture import make_imagefolder
from parallel import xdist_unit
from PIL import Image

SEED = int(os.environ.get("LKM_FAULT_SEED", "14"))
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def small_tmpfs(tmp_path_factory: pytest.TempPathFactory):
    """A 12 MiB tmpfs: a disk that fills up. Needs root (skips otherwise); unmounted at the end."""
    path = tmp_path_factory.mktemp("tmpfs")
    yield from _tmpfs(path, "12m")


def _tmpfs(path: Path, size: str):
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _children_env(**extra: str) -> dict[str, str]:
    """One thread (sums then do not depend on the machine), no SLURM job (signals are the user's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


# =============================================================================================================
# The watchers themselves: a hang is found by lack of progress, with stacks; slow or busy children are not hangs
# =============================================================================================================
def test_run_watched_reports_a_hung_child_with_its_stacks() -> None:
    child = textwrap.dedent("""
        import os, threading, time
        threading.Thread(target=lambda: [time.sleep(0.2) for _ in iter(int, 1)], daemon=True).start()  # polls
        print("waiting for a pipe nobody writes", flush=True)
        os.read(os.pipe()[0], 1)
    """)
    with pytest.raises(Hung) as hung:
        run_watched([PYTHON, "-c", child], idle_s=3)
    message = str(hung.value)
    assert "no output and" in message and "waiting for a pipe nobody writes" in message
    assert "pipe" in message  # where the kernel has it waiting (wchan, kernel stack)
    assert 'File "<string>", line 5 in <module>' in message  # faulthandler: the main thread's Python stack


def test_run_watched_lets_slow_and_busy_children_finish() -> None:
    # silent for twice the idle limit while a grandchild computes: the tree made progress
    busy = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time\\nt = time.time()\\n" \
           "while time.time() - t < 3: pass']); print('done')"
    assert run_watched([PYTHON, "-c", busy], idle_s=1.5, check=True).stdout == "done\n"
    # idle but talking: output is progress
    talker = "import time\nfor i in range(3): time.sleep(1); print(i, flush=True)"
    assert run_watched([PYTHON, "-c", talker], idle_s=1.5, check=True).stdout.split() == ["0", "1", "2"]
    # busy forever: caught by its CPU budget, not by a wall clock
    with pytest.raises(Hung, match="over its budget of 2 s"):
        run_watched([PYTHON, "-c", "while True: pass"], cpu_budget_s=2)


_WATCHDOG_DEMO = textwrap.dedent("""
    import os, signal

    def test_blocked_in_c():
        if os.environ["DEMO"] == "deaf":
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # C code that does not return on a signal
        else:  # whatever this pytest inherited: a background job (`make test &`) starts with SIGINT ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)
        r, w = os.pipe()
        os.read(r, 1)
""")


@pytest.mark.parametrize("mode", ["interruptible", "deaf"])
def test_session_watchdog_dumps_stacks_and_ends_a_hung_test(mode: str, tmp_path: Path) -> None:
    (tmp_path / "test_demo.py").write_text(_WATCHDOG_DEMO)
    done = run_watched([PYTHON, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "test_demo.py"],
                       cwd=tmp_path, env={"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}", "LKM_TEST_WATCHDOG_S": "2",
                                          "DEMO": mode}, idle_s=30)
    out = done.stdout + done.stderr
    assert "WATCHDOG" in out and "test_demo.py::test_blocked_in_c: no progress for" in out, out
    assert 'test_demo.py", line 10 in test_blocked_in_c' in out, out  # every thread's stack, this one blocked
    if mode == "interruptible":  # SIGINT wakes it: pytest reports the interruption and where, and stops
        assert done.returncode == 2 and "KeyboardInterrupt" in out, out
    else:  # nothing wakes it: the session ends, loudly
        assert done.returncode == 70 and "still blocked after SIGINT" in out, out


def test_parallel_units_keep_a_files_fixtures_together_and_every_slurm_test_on_one_worker(tmp_path: Path) -> None:
    assert xdist_unit("tests/test_beton.py::test_train_batches") == "tests/test_beton.py"
    assert xdist_unit("tests/test_compare.py::test_dry_run_shows_commands_and_sbatch_dependencies") == \
        "tests/test_compare.py"
    for nodeid in ("tests/test_slurm.py::test_x", "tests/test_slurm_2node.py::test_y[a]",
                   "tests/test_compare.py::test_slurm_sbatch_launcher_runs_the_matrix_with_seeds_and_dependencies"):
        assert xdist_unit(nodeid) == "slurm"
    # a test asking for a cluster under another name would run beside the others: collection refuses it
    (tmp_path / "test_misnamed.py").write_text("def test_sbatch_job(slurm_cluster):\n    pass\n")
    done = run_watched([PYTHON, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "--collect-only",
                        "test_misnamed.py"], cwd=tmp_path, env={"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"})
    assert done.returncode != 0 and "must be named test_slurm_*" in done.stdout + done.stderr, done.stdout


def test_a_cluster_that_cannot_start_skips_only_where_ci_does_not_require_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LKM_REQUIRE_SLURM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="could not start"):
        cluster_unavailable("the cluster could not start")
    monkeypatch.setenv("LKM_REQUIRE_SLURM", "1")  # as .ci/run sets it
    with pytest.raises(pytest.fail.Exception, match="LKM_REQUIRE_SLURM=1 and the cluster could not start"):
        cluster_unavailable("the cluster could not start")


# =============================================================================================================
# Writing a .beton
# =============================================================================================================
# One child imports the writer (and ffcv's) once, makes itself the reaper of orphaned descendants (so a writer
# left behind by a kill is seen, and how it ended), logs every shared-memory segment created, then runs each
# scenario in a forked process: reference writes, SIGKILLs at random points, dying writer processes, full disks.


def _lab_results(stdout: str) -> dict[str, dict]:
    return {r["name"]: r for r in (json.loads(line[len("RESULT "):]) for line in stdout.splitlines()
                                   if line.startswith("RESULT "))}


def _lab_line(stdout: str, tag: str):
    return next(json.loads(line[len(tag) + 1:]) for line in stdout.splitlines() if line.startswith(tag + " "))


@pytest.fixture(scope="module")
def writer_lab(tmp_path_factory: pytest.TempPathFactory, small_tmpfs: Path) -> dict:
    base = tmp_path_factory.mktemp("writer_lab")
    make_imagefolder(base / "F", classes=3, per_class=6, size_range=(40, 80), seed=0, oddities=False)
    make_imagefolder(base / "G", classes=3, per_class=6, size_range=(40, 80), seed=1, oddities=False)
    make_imagefolder(base / "big", classes=2, per_class=20, size_range=(150, 170), seed=2, oddities=False)
    shutil.copytree(base / "F", base / "tiny")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(base / "tiny/n00000001/n00000001_zdot.JPEG")
    Image.new("RGB", (10000, 10), (30, 200, 30)).save(base / "tiny/n00000002/n00000002_zsliver.JPEG")
    (base / "work").mkdir()
    config = {"F": base / "F", "G": base / "G", "tiny": base / "tiny", "big": base / "big", "work": base / "work",
              "disk": small_tmpfs, "seed": SEED}
    done = run_watched([PYTHON, "-m", "children.writer_lab", json.dumps({k: str(v) for k, v in config.items()})])
    results = _lab_results(done.stdout)
    assert done.returncode == 0 and "tiny_images_skipped" in results, \
        f"the writer lab failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return {"results": results, "points": _lab_line(done.stdout, "POINTS"),
            "upfront": _lab_line(done.stdout, "UPFRONT"),
            "tiny_meta": _lab_line(done.stdout, "TINY"), "base": base, "disk": small_tmpfs}


def _show(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if k != "log"}, indent=1) + "\n--- log:\n" + r["log"]


def _clean(r: dict) -> None:
    """Nothing finished-looking is wrong, no process of it is left, no shared memory of it stays."""
    assert r["problems"] == [], _show(r)
    assert r["shm_left"] == [], _show(r)


@pytest.mark.slow
def test_beton_write_killed_at_random_points_leaves_nothing_finished_looking(writer_lab: dict) -> None:
    res, points = writer_lab["results"], writer_lab["points"]
    order = ["kill_while_checking", "kill_while_writing", "kill_command_only", "rerun"]
    for name, following in zip(order, order[1:], strict=False):
        r = res[name]
        assert r["rc"] == -signal.SIGKILL, f"{name} at {points}: {_show(r)}"
        assert "train.beton" not in r["files"] and "train.json" not in r["files"], _show(r)
        assert r["problems"] == [], _show(r)
        # its partial file stays until the next start, which removes it
        (partial,) = (f for f in r["files"] if f.startswith(".train.beton.partial-"))
        assert f"{partial}, left by an interrupted writer" in res[following]["log"], _show(res[following])
        assert partial not in res[following]["files"], _show(res[following])
    # killed alone, the command's writer process and its workers must not write on for nobody (and take their
    # shared memory with them)
    orphans = res["kill_command_only"]
    assert len(orphans["left_behind"]) == 3, _show(orphans)  # the writer and its 2 workers
    assert all(code == -signal.SIGKILL for _, code in orphans["left_behind"]), _show(orphans)
    assert orphans["shm_left"] == [], _show(orphans)
    # the next start writes what a clean write writes (compared by the lab with its reference write)
    rerun = res["rerun"]
    assert rerun["rc"] == 0 and rerun["files"] == ["train.beton", "train.json"], _show(rerun)
    _clean(rerun)


@pytest.mark.slow
def test_overwrite_killed_between_the_renames_never_pairs_an_old_beton_with_a_new_json(writer_lab: dict) -> None:
    r = writer_lab["results"]["overwrite_killed_between_renames"]
    assert r["rc"] == -signal.SIGKILL, _show(r)
    assert r["problems"] == [], _show(r)  # the old .beton (of F) must not stay beside the new JSON (of G)
    again = writer_lab["results"]["rerun_overwrite"]
    assert again["rc"] == 0 and again["files"] == ["train.beton", "train.json"], _show(again)
    _clean(again)


@pytest.mark.slow
def test_dead_writer_worker_or_writer_process_ends_the_write_with_the_cause(writer_lab: dict) -> None:
    res = writer_lab["results"]
    worker = res["worker_dies"]
    assert worker["rc"] == 2 and "a writer worker failed" in worker["log"], _show(worker)
    assert "exited with code -9" in worker["log"] and "Nothing was written to --out" in worker["log"], _show(worker)
    writer = res["writer_dies"]
    assert writer["rc"] == 2 and "the writer failed (exit code -9)" in writer["log"], _show(writer)
    for r in (worker, writer):
        assert r["files"] == [], _show(r)  # no partial file
        # and no process left: what outlived the command (a dead writer's workers) was killed by it, not left
        assert all(code == -signal.SIGKILL for _, code in r["left_behind"]), _show(r)
        _clean(r)


@pytest.mark.slow
def test_full_disk_while_writing_ends_the_writer_with_the_space_it_needed(writer_lab: dict) -> None:
    res = writer_lab["results"]
    full = res["disk_full"]
    assert full["rc"] == 2, _show(full)
    # the command's message alone: neither the writer process nor its workers print a traceback before it
    assert "Traceback" not in full["log"] and full["log"].count("error:") == 1, _show(full)
    assert f"the disk holding {writer_lab['disk']} is full" in full["log"], _show(full)
    assert "it needs between 8.0 MiB and" in full["log"] and "nothing was written to --out" in full["log"], _show(full)
    assert full["files"] == [] and all(code == -signal.SIGKILL for _, code in full["left_behind"]), _show(full)
    _clean(full)
    # the lower bound is checked before anything starts: no writer process, no shared memory
    upfront = res["no_room_up_front"]
    assert upfront["rc"] == 2 and "free, and the .beton needs at least 8.0 MiB" in upfront["log"], _show(upfront)
    assert upfront["files"] == ["filler"] and not writer_lab["upfront"]["new_shm"], _show(upfront)


@pytest.mark.slow
def test_partials_of_killed_writers_are_removed_and_a_live_writers_named(writer_lab: dict) -> None:
    res = writer_lab["results"]
    stale = res["stale_partials"]
    assert stale["rc"] == 0 and stale["files"] == ["train.beton", "train.json"], _show(stale)
    assert stale["log"].count("left by an interrupted writer") == 2, _show(stale)
    live = res["partial_of_a_live_writer"]
    assert live["rc"] == 2 and "belongs to a writer that is still running" in live["log"], _show(live)
    assert len(live["files"]) == 1 and live["files"][0].startswith(".train.beton.partial-"), _show(live)


@pytest.mark.slow
def test_images_too_small_for_the_crops_are_refused_or_skipped(writer_lab: dict) -> None:
    res = writer_lab["results"]
    refused = res["tiny_images_refused"]
    assert refused["rc"] == 2 and refused["files"] == [], _show(refused)
    assert "n00000001_zdot.JPEG: a 1x1 image is too small for the loaders' crops" in refused["log"], _show(refused)
    skipped = res["tiny_images_skipped"]
    assert skipped["rc"] == 0, _show(skipped)
    meta = writer_lab["tiny_meta"]
    assert meta["num_images"] == 18 and {s["path"] for s in meta["skipped"]} == {
        "n00000001/n00000001_zdot.JPEG", "n00000002/n00000002_zsliver.JPEG"}
    sliver = next(s for s in meta["skipped"] if "sliver" in s["path"])
    assert "a 10000x10 image (stored as 500x0 at --max-resolution 500)" in sliver["error"], meta["skipped"]


# =============================================================================================================
# Checkpointing and training: one fine-tuning run killed, signalled and resumed, stage after stage
# =============================================================================================================
# One child imports the trainer once (torch, timm: seconds) and forks a process per stage, each the whole
# command line (segmentation.finetune.main) with one fault injected; it reports the exit and what the run
# directory holds after it. 10 iterations, a checkpoint every 2 (and at a signal), 2 kept. The stages follow
# each other in one run directory; every stage resumes where the previous one left it.


@pytest.fixture(scope="module")
def seg_disk(tmp_path_factory: pytest.TempPathFactory):
    """A 110 MiB tmpfs for a fine-tuning run directory (None without root)."""
    if not IS_ROOT:
        yield None
        return
    yield from _tmpfs(tmp_path_factory.mktemp("seg_disk"), "110m")


@pytest.fixture(scope="module")
def finetune_lab(tmp_path_factory: pytest.TempPathFactory, seg_disk: Path | None) -> dict:
    from seg_fixtures import make_voc

    base = tmp_path_factory.mktemp("finetune_lab")
    config = {"config": str(ROOT / "configs/segmentation/tiny_cpu.yaml"), "work": str(base), "seed": SEED,
              "devkit": str(make_voc(base / "voc", n_train=6, n_val=3)), "disk": str(seg_disk or "")}
    done = run_watched([PYTHON, "-m", "children.finetune_lab", json.dumps(config)], env=_children_env())
    results = _lab_results(done.stdout)
    assert done.returncode == 0 and "finish" in results, \
        f"the fine-tuning lab failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return {"results": results, "points": _lab_line(done.stdout, "POINTS"), "base": base, "disk": seg_disk}


def _steps(r: dict) -> list[int]:
    return sorted(c["step"] for c in r["checkpoints"].values())


def _whole_and_finite(r: dict) -> None:
    """Every checkpoint left loads and is finite; a final.pth is whole and finite."""
    for name, c in r["checkpoints"].items():
        assert "error" not in c and c["nonfinite"] == [], f"{name}: {_show(r)}"
    assert "error" not in r.get("final", {}) and r.get("final", {}).get("nonfinite", []) == [], _show(r)


@pytest.mark.slow
def test_kills_while_checkpointing_leave_whole_finite_checkpoints_and_no_temporaries(finetune_lab: dict) -> None:
    res, points = finetune_lab["results"], finetune_lab["points"]
    s1 = points["checkpoint_killed_in_torch_save"]
    earlier = list(range(2, s1, 2))  # the checkpoints before the one the kill hit
    for name in ("kill_in_torch_save", "kill_before_replace"):
        r = res[name]
        assert r["rc"] == -signal.SIGKILL, f"{name} at {points}: {_show(r)}"
        _whole_and_finite(r)
        assert _steps(r) == earlier and "final.pth" not in r["files"], _show(r)
        (tmp,) = [f for f in r["files"] if f.startswith(f".checkpoint_{s1:09d}.pt.") and f.endswith(".tmp")]
        following = res["kill_before_replace" if name == "kill_in_torch_save" else "sigterm"]
        assert tmp not in following["files"], _show(following)  # removed at the next start
        assert "removed 1 temporary file(s) left by an interrupted write" in following["log"], _show(following)
    # killed after the new checkpoint is in place, before the oldest is removed: one more than kept, all whole
    rotation = res["kill_in_rotation"]
    assert rotation["rc"] == -signal.SIGKILL, _show(rotation)
    _whole_and_finite(rotation)
    assert _steps(rotation) == [s1, s1 + 1, s1 + 2], _show(rotation)


@pytest.mark.slow
def test_signals_outside_slurm_checkpoint_and_say_how_to_resume(finetune_lab: dict) -> None:
    res, points = finetune_lab["results"], finetune_lab["points"]
    run_dir = finetune_lab["base"] / "run"
    resume = f"a checkpoint is in {run_dir}; start the same command again to resume"
    term = res["sigterm"]  # SIGTERM at a terminal or from `kill`: checkpoint, exit 128 + 15, and say so
    assert term["rc"] == 143 and f"stopped by SIGTERM: {resume}" in term["log"], _show(term)
    assert points["sigterm_in_step"] in _steps(term) and "final.pth" not in term["files"], _show(term)
    once = res["sigint"]  # Ctrl-C: checkpoint at the next step, exit 130
    assert once["rc"] == 130 and f"stopped by SIGINT: {resume}" in once["log"], _show(once)
    assert "press Ctrl-C again to stop at once" in once["log"], _show(once)
    assert max(_steps(once)) == points["sigint_in_step"], _show(once)
    twice = res["sigint_twice"]  # Ctrl-C twice: stop at once, no new checkpoint
    assert twice["rc"] == 130 and "interrupted at once: no new checkpoint" in twice["log"], _show(twice)
    assert "Traceback" not in twice["log"] and max(_steps(twice)) < points["sigint_in_step"], _show(twice)
    # inside a SLURM job the job is requeued: exit 0, SLURM starts it again
    slurm = res["sigusr1_in_slurm"]
    assert slurm["rc"] == 0 and "requeue 4242" in (finetune_lab["base"] / "scontrol.log").read_text(), _show(slurm)
    assert "start the same command again" not in slurm["log"], _show(slurm)
    assert max(_steps(slurm)) == points["sigusr1_in_step"] and "final.pth" not in slurm["files"], _show(slurm)
    for r in (term, once, twice, slurm):
        _whole_and_finite(r)


@pytest.mark.slow
def test_run_killed_and_signalled_throughout_ends_with_the_uninterrupted_weights(finetune_lab: dict) -> None:
    res, points = finetune_lab["results"], finetune_lab["points"]
    killed = res["kill_in_training"]
    assert killed["rc"] == -signal.SIGKILL and points["killed_in_step"] not in _steps(killed), _show(killed)
    final_killed = res["kill_in_final_save"]  # killed while writing final.pth: no final.pth, the last checkpoint
    assert final_killed["rc"] == -signal.SIGKILL and "final.pth" not in final_killed["files"], _show(final_killed)
    assert max(_steps(final_killed)) == 10 and any(f.startswith(".final.pth.") for f in final_killed["files"])
    finish = res["finish"]
    assert finish["rc"] == 0 and "final.pth" in finish["files"], _show(finish)
    assert not any(f.endswith(".tmp") for f in finish["files"]), _show(finish)
    for r in res.values():
        _whole_and_finite(r)
    straight = torch.load(finetune_lab["base"] / "straight/final.pth", weights_only=True)
    resumed = torch.load(finetune_lab["base"] / "run/final.pth", weights_only=True)
    different = [k for k in straight["state_dict"] if not torch.equal(straight["state_dict"][k],
                                                                       resumed["state_dict"][k])]
    assert different == [], f"the resumed run differs in {different[:5]} (fault points {points})"
    assert straight["val"]["miou"] == resumed["val"]["miou"] and resumed["iterations"] == 10


def _same_weights(a: Path, b: Path) -> list[str]:
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.slow
def test_full_disk_while_checkpointing_stops_with_the_sizes_and_resumes(finetune_lab: dict) -> None:
    if finetune_lab["disk"] is None:
        pytest.skip("mounting a tmpfs needs root")
    res, disk = finetune_lab["results"], finetune_lab["disk"]
    full = res["disk_full"]
    assert full["rc"] == 2, _show(full)
    # the command's message alone: neither the writer process nor its workers print a traceback before it
    assert "Traceback" not in full["log"] and full["log"].count("error:") == 1, _show(full)
    assert f"error: disk full while writing {disk}/run/checkpoint_000000006.pt: it needs about 41 MiB and " \
           f"{disk}/run has" in full["log"], _show(full)
    assert "the previous checkpoint is intact" in full["log"] and "Traceback" not in full["log"], _show(full)
    assert _steps(full) == [2, 4] and not any(f.endswith(".tmp") for f in full["files"]), _show(full)
    _whole_and_finite(full)
    resumed = res["disk_full_resumed"]
    assert resumed["rc"] == 0 and "resumed from checkpoint" in resumed["log"], _show(resumed)
    assert _same_weights(finetune_lab["base"] / "straight/final.pth", disk / "run/final.pth") == []


# =============================================================================================================
# Two ranks: a diverged rank or a full disk stops them all (none waits forever in a collective)
# =============================================================================================================


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_diverged_rank_or_full_disk_stops_every_rank(small_tmpfs: Path, tmp_path: Path) -> None:
    disk = small_tmpfs / "two_ranks"
    disk.mkdir()
    env = _children_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    ranks = [Watched([PYTHON, "-m", "children.two_ranks_full_disk", str(tmp_path), str(disk)],
                     env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        done = [ranks[0].wait(others=ranks[1:]), ranks[1].wait(others=ranks[:1])]
    finally:
        for r in ranks:
            r.kill()
        shutil.rmtree(disk, ignore_errors=True)
    for rank, d in enumerate(done):
        assert d.returncode == 0, f"rank {rank}:\n{d.stdout[-3000:]}\n{d.stderr[-5000:]}"
    results = [json.loads(d.stdout.split("RESULT ")[-1]) for d in done]
    assert results[0]["good"]["saved"].endswith("checkpoint_000000001.pt"), results
    for case in ("nan_on_rank1", "nan_on_rank0"):  # both ranks stop, naming the checked checkpoint
        for rank, r in enumerate(results):
            assert r[case]["error"] == "NonFiniteLossError", (case, rank, r[case])
            assert "the weights hold NaN/inf" in r[case]["message"], (case, rank, r[case])
            assert "Last good checkpoint: " + str(tmp_path / "checkpoint_000000001.pt") in r[case]["message"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_000000001.pt"]
    assert results[0]["disk_full"]["error"] == results[1]["disk_full"]["error"] == "CheckpointError", results
    assert f"disk full while writing {disk}/checkpoint_000000002.pt: it needs about 4 MiB" in \
        results[0]["disk_full"]["message"], results[0]
    assert "rank 0 could not write the checkpoint" in results[1]["disk_full"]["message"], results[1]


def test_checkpoints_and_weights_follow_the_umask(tmp_path: Path) -> None:
    from engine import checkpoint as ckpt

    old = os.umask(0o027)
    try:
        path = ckpt.save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path, 1)
        weights = ckpt.save_atomic({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "final.pth")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(weights.stat().st_mode & 0o777) == oct(0o640)


def test_non_finite_weights_are_never_written_nor_rotate_a_finite_checkpoint_away(tmp_path: Path) -> None:
    from engine import checkpoint as ckpt

    for step in (1, 2):
        ckpt.save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path, step, keep=2)
    with pytest.raises(ckpt.NonFiniteWeightsError, match=r"checkpoint_000000003\.pt not written: 1 weight tensor"):
        ckpt.save_checkpoint({"model": {"w": torch.tensor([1.0, float("inf")])}}, tmp_path, 3, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_000000001.pt", "checkpoint_000000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000000001.pt", "checkpoint_000000002.pt"]


def test_corrupt_latest_checkpoint_is_an_error_naming_it(tmp_path: Path) -> None:
    from engine import checkpoint as ckpt

    path = ckpt.save_checkpoint({"model": {"w": torch.ones(2)}, "step": 1}, tmp_path, 1)
    path.write_bytes(path.read_bytes()[:100])  # cut short, as by a full disk before save_atomic existed
    with pytest.raises(ckpt.CheckpointError, match=r"cannot read checkpoint .*checkpoint_000000001\.pt .*delete it"):
        ckpt.peek_checkpoint(path)


# =============================================================================================================
# Pretraining (ffcv loaders): killed in the middle of an epoch, resumed
# =============================================================================================================


@pytest.mark.slow
def test_pretraining_killed_mid_epoch_resumes_to_the_uninterrupted_weights(
        pretrain_betons: dict[str, Path], pretrain_straight: Path, tmp_path: Path) -> None:
    from backbone.train import PretrainConfig, run
    from engine import checkpoint as ckpt
    from engine.config import load_config

    at_step = random.Random(SEED).randint(10, 16)  # in the second epoch (8 steps each)
    overrides = [f"data.train={pretrain_betons['train']}", f"data.val={pretrain_betons['val']}",
                 f"run.dir={tmp_path / 'run'}", "train.epochs=2"]
    killed = run_watched([PYTHON, "-m", "children.killed_pretraining", str(at_step), "--config",
                          str(ROOT / "configs/pretrain/tiny_cpu.yaml"), *overrides], env=_children_env())
    assert killed.returncode == -signal.SIGKILL, f"step {at_step}: {killed.stderr[-5000:]}"
    (saved,) = ckpt.list_checkpoints(tmp_path / "run")  # the end of the first epoch, whole and finite
    state = torch.load(saved, weights_only=False)
    assert state["step"] == 8 and ckpt.nonfinite_tensors(state["model"]) == []
    assert not (tmp_path / "run/final.pth").exists()
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/tiny_cpu.yaml", overrides)
    assert run(cfg) == "finished"
    a = torch.load(pretrain_straight / "final.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run/final.pth", weights_only=True)["state_dict"]
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"killed at step {at_step}, the resumed run differs in {different[:5]}"
