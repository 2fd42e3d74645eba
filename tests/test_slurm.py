"""Pretraining on a real local SLURM cluster: submitit launcher, sbatch script, preemption + requeue, CPU binding.

Two 2-task CPU jobs with the same tiny config (global batch 32): one through submitit that runs
straight through, one through ``sbatch slurm/imagenet_pretrain.sh`` that is signalled mid-run
(SIGUSR1, as SLURM's time-limit warning), checkpoints, requeues itself and resumes. Deterministic
mode on CPU: both must end with the same weights.

The cluster binds tasks to CPUs as production clusters do (task/affinity + task/cgroup, slurm/local/start.sh), so
a task runs on the CPUs its job step was given, not on the machine's: the binding tests check that every task of
both launch paths (slurm/launch.sh's srun and submitit's) gets its job's ``--cpus-per-task`` (since SLURM 22.05
srun no longer inherits it), and that a 1-task 2-CPU pretraining with 2 loader workers runs through each path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch
from hangs import files_progress, run_watched, wait_until

from backbone.antialias import anti_aliasing_of
from backbone.artifacts import load_backbone
from engine.logs import read_metrics
from engine.slurm import SlurmResources, submitit_executor

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/pretrain/tiny_cpu.yaml"


def overrides(betons: dict[str, Path], run_dir: Path) -> list[str]:
    return [f"data.train={betons['train']}", f"data.val={betons['val']}", f"run.dir={run_dir}", "train.epochs=2"]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def wait_for(pred, what: str, job: str, log: Path, run_dir: Path) -> None:
    """Until ``pred()``; fails (hangs.Hung) only when the job's state, its log and its run directory stay
    unchanged for hangs.IDLE_S seconds: a slow job on a busy machine is waited for."""
    files = files_progress(run_dir)
    wait_until(pred, what, lambda: (job_state(job), log.stat().st_size if log.exists() else -1, files()),
               report=lambda: f"job {job}: {job_state(job)}\n" + (log.read_text()[-3000:] if log.exists() else ""))


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def sbatch_until_done(args: list[str], env: dict[str, str], log_name: str, folder: Path,
                      watch: Path) -> tuple[str, str]:
    """``sbatch --parsable ARGS`` (its log ``folder/<log_name>-<job id>.out``), waited for while the job, its log or
    ``watch`` move; the job is cancelled if the wait fails. Returns (final state, the log's text)."""
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    job = out.strip().split(";")[0]
    log = folder / f"{log_name}-{job}.out"
    try:
        wait_for(lambda: job_state(job) in ENDED, f"job {job} to finish", job, log, watch)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    return job_state(job), log.read_text()


@pytest.fixture(scope="module")
def submitit_run(slurm_cluster: dict, pretrain_betons: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("submitit")
    env = {**os.environ, **slurm_cluster}
    proc = run_watched(  # the job runs in SLURM's daemons: its log and run directory show its progress
        [sys.executable, "-m", "backbone.submit", "--config", TINY, "--gpus-per-node", "0", "--tasks-per-node", "2",
         "--cpus-per-task", "1", "--partition", "debug", "--timeout-min", "30", "--folder", str(base / "submitit"),
         "--wait", *overrides(pretrain_betons, base / "run")], env=env, progress=files_progress(base))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"submitted job \d+ \(slurm\)", proc.stdout) and "log:" in proc.stdout
    assert "finished: ['finished', 'finished']" in proc.stdout, proc.stdout
    log = Path(re.search(r"log:\s+(\S+)", proc.stdout).group(1))
    text = log.read_text() + log.with_suffix(".err").read_text()  # python logging goes to stderr
    assert "[rank 0]" in text and "val top-1" in text and "via submitit (slurm)" in text
    assert "[rank 1]" in log.with_name(log.name.replace("_0_", "_1_")).with_suffix(".err").read_text()
    return base / "run"


def test_submitit_job_finishes_and_final_loads_as_trained(submitit_run: Path) -> None:
    final = torch.load(submitit_run / "final.pth", weights_only=True)
    model, _ = load_backbone(submitit_run / "final.pth")  # resnet18 with the blur it was trained with
    assert anti_aliasing_of(model) == "blurpool" and final["provenance"]["world_size"] == 2
    assert all(torch.equal(v, final["state_dict"][k]) for k, v in model.state_dict().items())


def test_sbatch_job_signalled_mid_run_requeues_resumes_and_matches(
        submitit_run: Path, slurm_cluster: dict, pretrain_betons: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, **slurm_cluster}
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=30", f"--output={tmp_path}/%x-%j.out", "slurm/imagenet_pretrain.sh", TINY,
         *overrides(pretrain_betons, run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    job = out.strip().split(";")[0]
    log = tmp_path / f"lkm-pretrain-{job}.out"
    try:
        metrics = run_dir / "metrics.jsonl"

        def training_started() -> bool:
            return metrics.exists() and any(r["kind"] == "train" for r in read_metrics(metrics))

        wait_for(training_started, "the first training step", job, log, run_dir)
        # SIGUSR1 to the job's tasks: what --signal=USR1@300 sends before the time limit
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                 f"job {job} to finish", job, log, run_dir)
        text = log.read_text()
        assert job_state(job) == "COMPLETED", text[-3000:]
        assert "received SIGUSR1" in text and "requeued SLURM job" in text, text[-3000:]
        assert "(restart 1)" in text and "resumed from checkpoint" in text, text[-3000:]
        assert "[rank 0]" in text and "[rank 1]" in text and "val top-1" in text
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    a = torch.load(submitit_run / "final.pth", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "final.pth", weights_only=True)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# --- CPU binding: each task gets its job's --cpus-per-task ------------------------------------------------------
# The node has 2 CPUs: one task with 2 CPUs (what fails when srun does not pass --cpus-per-task on: 1 CPU), and two
# tasks with 1 CPU each (disjoint: the binding is real, not the whole machine for everyone).
SHAPES = [pytest.param(1, 2, id="1task-2cpus"), pytest.param(2, 1, id="2tasks-1cpu")]
PROBE = ROOT / "tests/cpu_probe.py"
# a job script like slurm/*.sh: slurm/launch.sh's lkm_launch runs the probe on every task (it checks the config)
PROBE_JOB = f"""#!/usr/bin/env bash
set -euo pipefail
source "$SLURM_SUBMIT_DIR/slurm/launch.sh"
lkm_launch {TINY} "python tests/cpu_probe.py" -- "$PYTHON" tests/cpu_probe.py --
"""


def probes(text: str) -> list[dict]:
    """The CPU-PROBE lines of a job's output (tests/cpu_probe.py), by rank."""
    found = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("CPU-PROBE ")]
    return sorted(found, key=lambda p: p["rank"])


def assert_bound(found: list[dict], tasks: int, cpus: int, text: str) -> None:
    """Every task runs on exactly its ``cpus`` CPUs, the tasks' CPUs do not overlap, numba sees as many, and
    ``OMP_NUM_THREADS`` says as many (both launchers set it)."""
    assert [p["rank"] for p in found] == list(range(tasks)), text
    assert [len(p["cpus"]) for p in found] == [cpus] * tasks, text
    assert [p["numba_threads"] for p in found] == [cpus] * tasks, text
    assert len({c for p in found for c in p["cpus"]}) == tasks * cpus, text
    assert [p["omp_num_threads"] for p in found] == [str(cpus)] * tasks, text


@pytest.mark.parametrize("tasks, cpus", SHAPES)
def test_slurm_lkm_launch_gives_every_task_its_cpus_per_task(slurm_cluster: dict, tmp_path: Path, tasks: int,
                                                              cpus: int) -> None:
    script = tmp_path / "probe.sh"
    script.write_text(PROBE_JOB)
    env = {**os.environ, **slurm_cluster, "PYTHON": sys.executable}
    state, text = sbatch_until_done(["--nodes=1", f"--ntasks-per-node={tasks}", f"--cpus-per-task={cpus}", "--time=10",
                                     f"--output={tmp_path}/%x-%j.out", "--job-name=lkm-cpu-probe", str(script)],
                                    env, "lkm-cpu-probe", tmp_path, tmp_path)
    assert state == "COMPLETED", text
    assert_bound(probes(text), tasks, cpus, text)


@pytest.mark.parametrize("tasks, cpus", SHAPES)
def test_slurm_submitit_gives_every_task_its_cpus_per_task(slurm_cluster: dict, tmp_path: Path, tasks: int,
                                                            cpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in slurm_cluster.items():  # submitit runs sbatch, squeue and sacct with this environment
        monkeypatch.setenv(key, value)
    res = SlurmResources(tasks_per_node=tasks, cpus_per_task=cpus, time=10, partition="debug")
    executor = submitit_executor(res, "slurm", tmp_path / "%j", name="lkm-cpu-probe")
    job = executor.submit(submitit.helpers.CommandFunction([sys.executable, str(PROBE)], cwd=str(ROOT)))
    log = Path(str(job.paths.stdout).replace("%t", "0"))
    try:
        wait_until(job.done, f"submitit job {job.job_id}", files_progress(tmp_path),
                   report=lambda: f"job {job.job_id}: {job_state(job.job_id)}\n" + "\n".join(
                       p.read_text()[-2000:] for p in sorted(tmp_path.rglob("*.*")) if p.suffix in (".out", ".err")))
    finally:
        job.cancel(check=False)
    outputs = "\n".join(job.results())  # one CommandFunction stdout per task; raises (with its stderr) if one failed
    assert_bound(probes(outputs), tasks, cpus, outputs + log.read_text())


@pytest.mark.parametrize("launcher", ["sbatch", "submitit"])
def test_slurm_one_task_two_cpus_pretrains_with_two_loader_workers(
        launcher: str, slurm_cluster: dict, pretrain_betons: dict[str, Path], tmp_path: Path) -> None:
    # data.num_workers follows --cpus-per-task (2) on both paths; backbone.train refuses more workers than numba has
    # threads, and numba has as many as the task's CPUs: with one CPU per task this stops with a ConfigError
    run_dir = tmp_path / "run"
    args = [f"data.train={pretrain_betons['train']}", f"data.val={pretrain_betons['val']}", f"run.dir={run_dir}",
            "train.epochs=1"]
    env = {**os.environ, **slurm_cluster, "PYTHON": sys.executable}
    if launcher == "submitit":
        proc = run_watched([sys.executable, "-m", "backbone.submit", "--config", TINY, "--gpus-per-node", "0",
                            "--tasks-per-node", "1", "--cpus-per-task", "2", "--partition", "debug", "--timeout-min",
                            "30", "--folder", str(tmp_path / "submitit"), "--wait", *args],
                           env=env, progress=files_progress(tmp_path))
        log = Path(re.search(r"log:\s+(\S+)", proc.stdout).group(1)) if "log:" in proc.stdout else None
        text = proc.stdout + proc.stderr + (log.with_suffix(".err").read_text() if log and log.exists() else "")
        assert proc.returncode == 0 and "finished: ['finished']" in proc.stdout, text[-5000:]
    else:
        state, text = sbatch_until_done(["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2",
                                         "--time=30", f"--output={tmp_path}/%x-%j.out", "slurm/imagenet_pretrain.sh",
                                         TINY, *args], env, "lkm-pretrain", tmp_path, run_dir)
        assert state == "COMPLETED", text[-5000:]
        assert "1 tasks, 2 CPUs each" in text and "data.num_workers=2" in text, text[-5000:]
    final = torch.load(run_dir / "final.pth", weights_only=True)
    assert final["provenance"]["world_size"] == 1, text[-5000:]
