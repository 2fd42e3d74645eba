"""Pretraining on a real local SLURM cluster: submitit launcher, sbatch script, preemption + requeue.

Two 2-task CPU jobs with the same tiny config (global batch 32): one through submitit that runs
straight through, one through ``sbatch slurm/imagenet_pretrain.sh`` that is signalled mid-run
(SIGUSR1, as SLURM's time-limit warning), checkpoints, requeues itself and resumes. Deterministic
mode on CPU: both must end with the same weights.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backbone.antialias import anti_aliasing_of
from backbone.artifacts import load_backbone
from engine.logs import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/pretrain/tiny_cpu.yaml"
JOB_LIMIT_S = 420


def overrides(betons: dict[str, Path], run_dir: Path) -> list[str]:
    return [f"data.train={betons['train']}", f"data.val={betons['val']}", f"run.dir={run_dir}", "train.epochs=2"]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def wait_for(pred, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tail}")
        time.sleep(1)


@pytest.fixture(scope="module")
def submitit_run(slurm_cluster: dict, pretrain_betons: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("submitit")
    env = {**os.environ, **slurm_cluster}
    proc = subprocess.run(
        [sys.executable, "-m", "backbone.submit", "--config", TINY, "--gpus-per-node", "0", "--tasks-per-node", "2",
         "--cpus-per-task", "1", "--partition", "debug", "--timeout-min", "30", "--folder", str(base / "submitit"),
         "--wait", *overrides(pretrain_betons, base / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_LIMIT_S)
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

        wait_for(training_started, JOB_LIMIT_S, "the first training step", log)
        # SIGUSR1 to the job's tasks: what --signal=USR1@300 sends before the time limit
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                 JOB_LIMIT_S, f"job {job} to finish", log)
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
