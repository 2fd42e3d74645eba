"""One writer per run directory and per comparison output (issue 23, item 2): a second process stops at once and
names the holder; the lock goes when the holder dies; where locks cannot protect, the run says so."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import socket
from pathlib import Path

import pytest
from hangs import PYTHON, ROOT, Watched, run_watched
from seg_fixtures import make_voc

from engine.config import ConfigError
from engine.lock import LOCK_NAME, FolderLock, FolderLocked, holder_of, lock_scope

SEG_TINY = ROOT / "configs/segmentation/tiny_cpu.yaml"

# A real fine-tune (segmentation/finetune.py's main) that stops once it holds its run directory, with config.yaml
# and run.json written, and waits there until the test kills it.

# A real comparison (experiments.compare's main) that stops once it holds its output folder.


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}


@pytest.mark.slow
def test_second_finetune_on_a_run_directory_stops_at_once_naming_the_holder_and_the_lock_dies_with_it(
        tmp_path: Path) -> None:
    devkit = make_voc(tmp_path / "voc", n_train=6, n_val=3)
    run_dir = tmp_path / "run"
    args = ["--config", str(SEG_TINY), f"data.root={devkit}", f"run.dir={run_dir}", "train.iterations=4",
            "eval.every=0", "run.checkpoint_every=2", "data.global_batch=2", "data.crop_size=32"]
    with Watched([PYTHON, "-m", "children.holding_finetune", *args], env=_env()) as first:
        first.wait_for(lambda: "HOLDING" in first.text("stdout"), "the first fine-tune holding its run directory")
        before = _snapshot(run_dir)
        assert "config.yaml" in before and "run.json" in before
        # the same directory, another learning rate: refused before it reads or writes anything
        second = run_watched([PYTHON, str(ROOT / "segmentation/finetune.py"), *args, "optim.lr=0.02"], env=_env())
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"run directory {run_dir} is in use by another process: pid {first.pid} on host " \
               f"{socket.gethostname()}, started 20" in errors[0], errors[0]
        assert _snapshot(run_dir) == before  # config.yaml still the first one's recipe
        first.kill()  # kill -9: no clean-up runs; the kernel releases the flock with the process
    third = run_watched([PYTHON, str(ROOT / "segmentation/finetune.py"), *args, "optim.lr=0.02"], env=_env())
    assert third.returncode == 0, third.stderr[-3000:]
    assert (run_dir / "final.pth").exists() and "lr: 0.02" in (run_dir / "config.yaml").read_text()
    assert holder_of(run_dir)["pid"] != first.pid  # the third process took the lock and wrote who it is


@pytest.mark.slow
def test_second_comparison_on_an_output_stops_naming_the_holder_and_a_dry_run_still_plans(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments.compare import main as compare_main

    monkeypatch.chdir(ROOT)
    output = tmp_path / "table6"
    args = [f"output={output}", "backbones=[resnet18]", "heads=[baseline]", "seeds=[0]", "pretrain.seeds=[0]",
            "pretrain.config=configs/pretrain/tiny_cpu.yaml", "finetune.config=configs/segmentation/tiny_cpu.yaml"]
    with Watched([PYTHON, "-m", "children.holding_compare", *args, "--collect"], env=_env()) as first:
        first.wait_for(lambda: "HOLDING" in first.text("stdout"), "the first comparison holding its output")
        capsys.readouterr()
        assert compare_main([*args, "--collect"]) == 2
        err = capsys.readouterr().err
        assert f"error: comparison output {output} is in use by another process: pid {first.pid} on host " \
               f"{socket.gethostname()}" in err, err
        assert compare_main(["--dry-run", *args, "--no-check"]) == 0  # a dry run writes nothing: not locked out
        first.kill()
    with FolderLock(output, "comparison output"):  # released with its holder
        assert holder_of(output)["pid"] == os.getpid()


def test_a_second_lock_in_this_process_is_refused_and_released_locks_can_be_taken(tmp_path: Path) -> None:
    with FolderLock(tmp_path / "run") as held:
        assert held.held and (tmp_path / "run" / LOCK_NAME).exists()
        with pytest.raises(FolderLocked, match=rf"run directory {tmp_path / 'run'} is in use by another process: "
                                               rf"pid {os.getpid()} on host {socket.gethostname()}"):
            FolderLock(tmp_path / "run").acquire()
    with FolderLock(tmp_path / "run") as again:
        assert again.held


def test_a_file_system_without_flock_is_an_error_unless_asked_to_run_unlocked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match=r"file system does not support flock .*LKM_NO_LOCK=1"):
        FolderLock(tmp_path / "run").acquire()
    monkeypatch.setenv("LKM_NO_LOCK", "1")
    with caplog.at_level(logging.WARNING):
        FolderLock(tmp_path / "run").acquire()
    assert "LKM_NO_LOCK=1" in caplog.text and "is not locked" in caplog.text


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /nfs/shared rw,relatime shared:2 - nfs4 srv:/export rw,vers=4.2,local_lock=none,addr=10.0.0.2
41 22 0:51 / /nfs/old rw,relatime shared:3 - nfs srv:/old rw,vers=3,nolock,addr=10.0.0.2
42 22 0:52 / /nfs/old/inner rw,relatime shared:4 - nfs srv:/inner rw,vers=3,local_lock=none
43 22 0:53 / /lustre rw shared:5 - lustre 10.0.0.1@o2ib:/fs rw,localflock
"""


def test_lock_scope_names_mounts_whose_locks_stay_on_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.lock

    monkeypatch.setattr(engine.lock, "_read_mountinfo", lambda: MOUNTINFO)
    assert lock_scope("/home/me/runs") is None and lock_scope("/nfs/shared/runs/a") is None
    assert "/nfs/old is nfs mounted with nolock: its locks are local to this host" in lock_scope("/nfs/old/runs/a")
    assert lock_scope("/nfs/old/inner/runs") is None  # the longest mount point is the one that holds it
    assert "/lustre is lustre mounted with localflock" in lock_scope("/lustre/project/runs")
    monkeypatch.setattr(engine.lock, "_read_mountinfo", lambda: MOUNTINFO.replace("local_lock=none,addr",
                                                                                  "local_lock=flock,addr"))
    assert "/nfs/shared is nfs4 mounted with local_lock=flock" in lock_scope("/nfs/shared/runs/a")
