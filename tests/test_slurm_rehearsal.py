"""The rehearsal on the local SLURM cluster (CPU binding as production): every stage a real sbatch job with the
comparison's resources, preempted at a step, requeued by SLURM, resumed; the collect job; the table."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from compare_fixtures import tiny_overrides, write_shapes_data
from hangs import ROOT, files_progress, run_watched


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_rehearsal_requeues_every_stage_and_reports_the_plan(slurm_cluster: dict, tmp_path: Path) -> None:
    shapes = write_shapes_data(tmp_path / "shapes")
    out = tmp_path / "t6"
    resources = "{nodes: 1, tasks_per_node: 1, gpus_per_node: 0, cpus_per_task: 2, time: '00:20:00'}"
    overrides = tiny_overrides(shapes, out, backbones=["resnet10t"], heads=["baseline"], seeds=[0, 1, 2],
                               pretrain_seeds=[0, 1, 2]) + [
        "rehearse.steps=4", "rehearse.preempt_at=2", "rehearse.images=3",
        *[f"launch.{s}={resources}" for s in ("pretrain", "finetune", "collect")]]
    rehearsal = tmp_path / "t6-rehearsal"
    done = run_watched([sys.executable, "-m", "experiments.compare", "--rehearse", "--launcher", "sbatch",
                        *overrides], cwd=ROOT, env={**os.environ, **slurm_cluster},
                       progress=files_progress(rehearsal))  # the jobs' logs and run directories grow
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not out.exists()
    rep = json.loads((rehearsal / "rehearsal.json").read_text())
    assert rep["launcher"] == "sbatch" and len(rep["stages"]) == 2
    for stage in rep["stages"]:
        assert stage["events"] == "finished; preempted, resumed", stage
        assert stage["img_per_s_per_process"] > 0 and stage["planned_runs"] == 3 and stage["planned_hours"] > 0
    assert "| pretrain resnet10t | 1 | finished; preempted, resumed |" in done.stdout
    # SLURM itself requeued each stage's job: its log holds two starts, the second a restart
    logs = {p.name: p.read_text() for p in (rehearsal / "logs").glob("lkm-*.out")}
    for kind in ("pretrain", "finetune"):
        text = next(t for name, t in logs.items() if name.startswith(f"lkm-{kind}-"))
        assert re.search(r"job \d+ \(restart 0\)", text) and re.search(r"job \d+ \(restart 1\)", text), text[-3000:]
        assert "2 CPUs each" in text  # the comparison's cpus_per_task reached the task (CPU binding)
    jobs = json.loads((rehearsal / "jobs.json").read_text())
    assert json.loads((rehearsal / "table6.json").read_text())["slurm_job_id"] == jobs["collect"]
