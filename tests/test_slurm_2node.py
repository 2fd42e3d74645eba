"""Preemption across two nodes, on a real 2-node SLURM cluster (n1, n2) on this machine.

The pretraining job runs as 2 nodes x 1 task through ``sbatch slurm/imagenet_pretrain.sh``, is
signalled mid-run with SIGUSR1 (what ``--signal=USR1@300`` sends before the time limit: ``scancel
--signal=USR1`` without ``--batch``/``--full`` signals the job's steps, i.e. the srun tasks on both
nodes; ``--batch`` and ``--full`` also signal the batch shell, which dies of it and fails the job),
checkpoints, requeues itself and resumes on both nodes. Beside it, on the single-node cluster, the
same recipe runs uninterrupted as 1 node x 2 tasks: world size 2 both times, deterministic mode on
CPU, so both must end with the same weights. Then a 2-node fine-tune runs to its final weights.

Waiting is about progress, not wall time: a job fails the test when neither its state nor its log
nor its run directory changed for ``STALL_S`` seconds (a busy machine is slow, a hung job is still).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from seg_fixtures import make_voc

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = "configs/pretrain/tiny_cpu.yaml"
FINETUNE = "configs/segmentation/tiny_cpu.yaml"
STALL_S = 180  # no state change, no log or run-directory growth for this long: the job is stuck
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# engine.distributed's join line: "[rank R] ... rank R/W (local L) on HOST joining gloo process group at MASTER:PORT"
JOIN = re.compile(r"\[rank (\d+)\] INFO engine\.distributed: rank \1/(\d+) \(local \d+\) on (\S+) joining gloo "
                  r"process group at ([^:\s]+):\d+")


@dataclass
class Job:
    id: str
    env: dict[str, str]  # SLURM_CONF names the cluster
    log: Path
    run_dir: Path

    def show(self) -> str:
        proc = subprocess.run(["scontrol", "show", "job", self.id], env=self.env, capture_output=True, text=True)
        return proc.stdout + proc.stderr

    def field(self, name: str, text: str | None = None) -> str:
        m = re.search(rf"\b{name}=(\S+)", self.show() if text is None else text)
        return m.group(1) if m else "UNKNOWN"

    def state(self) -> str:
        return self.field("JobState")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def progress(self) -> tuple:
        """What changes while the job gets anywhere: state, restarts, log size, run-directory files."""
        show = self.show()
        files = tuple(sorted((p.name, p.stat().st_size) for p in self.run_dir.glob("*") if p.is_file())) \
            if self.run_dir.is_dir() else ()
        return self.field("JobState", show), self.field("Restarts", show), \
            self.log.stat().st_size if self.log.exists() else -1, files

    def report(self) -> str:
        return f"--- scontrol show job {self.id}\n{self.show()}\n--- {self.log} (tail)\n{self.text()[-5000:]}"

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True)


def submit(script: str, cluster: dict[str, str], out_dir: Path, run_dir: Path, sbatch: list[str],
           args: list[str]) -> Job:
    env = {**os.environ, **cluster, "PYTHON": sys.executable}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30",
                          f"--output={out_dir}/%x-%j.out", *sbatch, script, *args, f"run.dir={run_dir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.strip().split(";")[0]
    name = "lkm-pretrain" if "pretrain" in script else "lkm-finetune"
    return Job(job, env, out_dir / f"{name}-{job}.out", run_dir)


def wait(jobs: list[Job], until: Callable[[], bool], what: str, max_restarts: dict[str, int]) -> None:
    """Poll until ``until()``; fail, with every job's ``scontrol show job`` and log, when nothing moved for
    STALL_S seconds, when a job ended before ``until()`` held, or when a job was requeued more often than
    ``max_restarts[job.id]`` (a requeue loop keeps changing state but gets nowhere)."""
    def fail(why: str) -> None:
        pytest.fail(f"{why} (waiting for {what})\n" + "\n".join(j.report() for j in jobs))

    seen, moved = None, time.monotonic()
    while not until():
        now = [j.progress() for j in jobs]
        if now != seen:
            seen, moved = now, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            fail(f"no progress for {STALL_S} s: job states, logs and run directories unchanged")
        for j, (_, restarts, _, _) in zip(jobs, now, strict=True):
            if restarts.isdigit() and int(restarts) > max_restarts[j.id]:
                fail(f"job {j.id} restarted {restarts} times")
        if all(state in ENDED for state, *_ in now) and not until():
            fail("the jobs ended")
        time.sleep(0.5)


def attempts(text: str, job: str) -> dict[int, str]:
    """The job log split at the sbatch script's line "job <id> (restart N) on ...": attempt N -> its lines."""
    marks = list(re.finditer(rf"job {job} \(restart (\d+)\) on (\S+):", text))
    return {int(m.group(1)): text[m.start():marks[i + 1].start() if i + 1 < len(marks) else len(text)]
            for i, m in enumerate(marks)}


def placement(text: str) -> tuple[dict[int, str], set[str]]:
    """Rank -> host from the join lines, and the rendezvous hosts they used."""
    found = JOIN.findall(text)
    assert all(world == "2" for _, world, _, _ in found), found
    return {int(rank): host for rank, _, host, _ in found}, {master for *_, master in found}


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r for r in records if r.get("kind") == "train"]


def test_two_nodes_signalled_mid_run_requeue_resume_and_match_one_node(
        slurm_cluster: dict, slurm_2node_cluster: dict, pretrain_betons: dict[str, Path], tmp_path: Path) -> None:
    data = [f"data.train={pretrain_betons['train']}", f"data.val={pretrain_betons['val']}", "train.epochs=2"]
    # the uninterrupted reference, 1 node x 2 tasks on the single-node cluster, at the same time
    ref = submit("slurm/imagenet_pretrain.sh", slurm_cluster, tmp_path / "one_node", tmp_path / "one_node/run",
                 ["--nodes=1", "--ntasks-per-node=2"], [PRETRAIN, *data])
    two = submit("slurm/imagenet_pretrain.sh", slurm_2node_cluster, tmp_path / "two_nodes",
                 tmp_path / "two_nodes/run", ["--nodes=2", "--ntasks-per-node=1"], [PRETRAIN, *data])
    limits = {ref.id: 0, two.id: 1}
    try:
        wait([ref, two], lambda: bool(train_records(two.run_dir)), "the 2-node job's first training step", limits)
        # SIGUSR1 to the job's steps (the srun tasks on n1 and n2), as --signal=USR1@300 before the time limit
        subprocess.run(["scancel", "--signal=USR1", two.id], env=two.env, check=True)
        wait([ref, two], lambda: ref.state() in ENDED and two.state() in ENDED, "both jobs to end", limits)
        for job in (ref, two):
            assert job.state() == "COMPLETED", job.report()
    finally:
        ref.cancel()
        two.cancel()

    # the 2-node job: one requeue; both attempts ran rank 0 on n1 (the rendezvous host) and rank 1 on n2
    log, report = two.text(), two.report()
    assert two.field("Restarts") == "1", report
    runs = attempts(log, two.id)
    assert sorted(runs) == [0, 1], report
    for n, text in runs.items():
        assert text.startswith(f"job {two.id} (restart {n}) on n[1-2]:"), report
        assert placement(text) == ({0: "n1", 1: "n2"}, {"n1"}), (n, report)
    # before: the signal reached the tasks on both nodes, rank 0 wrote a checkpoint and requeued the job
    first, second = runs[0], runs[1]
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING engine.preemption: received SIGUSR1" in first, report
    saved = re.findall(r"\[rank 0\] INFO backbone\.train: checkpoint: (\S+) \(step (\d+)\)", first)
    assert saved, report
    path, step = saved[-1]
    assert 0 < int(step) < 16, report  # mid-run: 2 epochs x 8 steps
    assert f"requeued SLURM job {two.id}" in first and "finished:" not in first, report
    # after: both ranks resumed from that checkpoint and the run finished
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] INFO backbone\.train: resumed from checkpoint {re.escape(path)} "
                         rf"at epoch \d+, step {step} ", second), report
    assert "received SIG" not in second and "finished:" in second, report

    # the reference: one attempt, both ranks on one host, never signalled
    ref_log = ref.text()
    assert list(attempts(ref_log, ref.id)) == [0] and "received SIG" not in ref_log, ref.report()
    hosts, masters = placement(ref_log)
    assert sorted(hosts) == [0, 1] and len(set(hosts.values())) == 1 and "n1" not in hosts.values(), ref.report()

    # world size 2 both times, deterministic: identical weights
    a = torch.load(ref.run_dir / "final.pth", weights_only=True)["state_dict"]
    b = torch.load(two.run_dir / "final.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_two_node_finetune_writes_final_weights(slurm_2node_cluster: dict, tmp_path: Path) -> None:
    devkit = make_voc(tmp_path / "voc", n_train=6, n_val=3)
    job = submit("slurm/segmentation_finetune.sh", slurm_2node_cluster, tmp_path / "job", tmp_path / "run",
                 ["--nodes=2", "--ntasks-per-node=1"],
                 [FINETUNE, f"data.root={devkit}", "train.iterations=4", "eval.every=0", "data.global_batch=4"])
    try:
        wait([job], lambda: job.state() in ENDED, "the fine-tune to end", {job.id: 0})
        assert job.state() == "COMPLETED", job.report()
    finally:
        job.cancel()
    log = job.text()
    assert placement(log) == ({0: "n1", 1: "n2"}, {"n1"}), job.report()
    assert "global batch 4 (2 processes)" in log, job.report()
    final = torch.load(job.run_dir / "final.pth", weights_only=True)
    assert final["val"]["images"] == 3  # the 3 val images, sharded over the two nodes and summed
    assert final["state_dict"] and all(torch.isfinite(v).all() for v in final["state_dict"].values()
                                       if v.is_floating_point())
