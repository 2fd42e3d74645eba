"""Launchers of the plan: one run after another on this machine, or one SLURM job per run.

``run_local`` runs each unfinished run as a subprocess: one process, or one per GPU of this machine
through torchrun (``Run.command``). ``submit_sbatch`` submits the stage scripts
(``slurm/imagenet_pretrain.sh``, ``slurm/segmentation_finetune.sh``) with ``--dependency=afterok`` on
the backbone's pretraining, then a collect job after all of them; the job ids go to ``jobs.json`` so
that a later call reuses jobs still queued rather than submitting them twice. ``wait_for_table``
waits for the jobs and checks that the collect job it submitted wrote the table (``table6.json`` names
the job that wrote it). The resources become sbatch options, and
submission and waiting are done, by ``engine.slurm``.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from engine import slurm
from experiments import ROOT

from .config import CompareConfig, LaunchConfig, ResourceConfig
from .plan import Run, StageFailed

__all__ = ["STAGE_SCRIPTS", "JOBS_FILE", "Interrupted", "run_local", "job_resources", "stage_job_args",
           "collect_job_args", "read_jobs", "submit_sbatch", "wait_for_table"]

# The sbatch script of each stage (its #SBATCH lines are the defaults; our options override them).
STAGE_SCRIPTS = {"pretrain": "slurm/imagenet_pretrain.sh", "finetune": "slurm/segmentation_finetune.sh"}
JOBS_FILE = "jobs.json"  # {run dir or 'collect': job id} of the last submission, under output


class Interrupted(Exception):
    """A run stopped by Ctrl-C (or SIGTERM) given to the comparison: it checkpointed; the same command resumes it."""

    def __init__(self, signum: int, run: Run, rc: int) -> None:
        self.signum, self.run, self.rc = signum, run, rc
        name = signal.Signals(signum).name
        how = "it checkpointed" if rc == 128 + signum else f"it exited with code {rc}"
        super().__init__(f"interrupted by {name}: {run.name} stopped ({how}; its run directory is {run.dir}). "
                         "Run the same command again to resume: finished runs are reused")


_FORWARDED = (signal.SIGINT, signal.SIGTERM)


def _run_forwarding_signals(cmd: list[str]) -> tuple[int, int | None]:
    """Run ``cmd`` in its own process group and hand it every SIGINT/SIGTERM this process gets, one for one;
    returns (exit code, the first signal forwarded or None).

    Ctrl-C at a terminal signals the whole foreground process group. Were the child in ours, it would get
    the signal twice when we forward it (its trainer reads a second Ctrl-C as "stop at once, no
    checkpoint"), or, not forwarded, never where only this process is signalled (``kill -INT``). In its
    own group it gets each exactly once: the first makes it checkpoint and stop, a second stops it at once,
    as when it runs alone. This process waits for it rather than dying with a KeyboardInterrupt (which
    would kill the child before its checkpoint and print a traceback).
    """
    got: list[int] = []
    proc = subprocess.Popen(cmd, process_group=0)

    def forward(signum: int, frame: object) -> None:
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    previous = {s: signal.signal(s, forward) for s in _FORWARDED} if main_thread else {}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an unexpected error in this process: leave no child behind
            proc.kill()
            proc.wait()
    return rc, (got[0] if got else None)


def run_local(runs: Sequence[Run], resume_preempted: bool = False) -> None:
    """Each unfinished run in turn, as a subprocess whose output (progress bars, logs) is shown as is.

    Ctrl-C (or SIGTERM) reaches the running child once: it checkpoints and stops, and this raises
    Interrupted (no later run starts). With ``resume_preempted`` (a rehearsal, whose stages preempt themselves
    once), a run that stopped with a checkpoint is started again, once, to resume: what SLURM's requeue does."""
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.name}"
        if run.finished:
            print(f"{head}: finished before, reused ({run.final})", flush=True)
            continue
        procs = run.world_size
        print(f"{head} -> {run.dir}" + (" (resuming)" if run.dir.exists() else "")
              + (f", {procs} processes (torchrun, one per GPU)" if procs > 1 else ""), flush=True)
        t0 = time.monotonic()
        rc, signum = _run_forwarding_signals(run.command())
        if signum is None and rc != 0 and resume_preempted and not run.finished and any(run.dir.glob("checkpoint_*")):
            print(f"{head}: stopped at its rehearsed preemption (exit {rc}); starting it again to resume", flush=True)
            rc, signum = _run_forwarding_signals(run.command())
        if signum is not None:
            raise Interrupted(signum, run, rc)
        if rc != 0 or not run.finished:
            raise StageFailed(f"{run.name} failed (exit {rc}); its log: {run.dir / 'train.log'}. Fix the cause and "
                              "run the same command again: finished runs are reused and this one resumes")
        print(f"{head}: done in {time.monotonic() - t0:.0f} s", flush=True)


def job_resources(res: ResourceConfig, launch: LaunchConfig, stage_job: bool = True) -> slurm.SlurmResources:
    """The SLURM resources of one job from the config's section.

    Stage jobs checkpoint on engine.slurm's warning signal and are requeued (as their scripts' #SBATCH
    lines ask); the collect job is neither warned nor requeued: it is cheap to run again.
    """
    warning = {} if stage_job else {"signal_delay_s": None, "requeue": False}
    return slurm.SlurmResources(nodes=res.nodes, tasks_per_node=res.tasks_per_node, gpus_per_node=res.gpus_per_node,
                                cpus_per_task=res.cpus_per_task, time=res.time, mem_gb=res.mem_gb,
                                partition=launch.partition, account=launch.account, qos=launch.qos,
                                extra_args=tuple(launch.sbatch_args), **warning)


def _job_name(run: Run) -> str:
    return f"lkm-{run.kind}-{run.backbone}" + (f"-{run.head}" if run.head else "") + f"-s{run.seed}"


def stage_job_args(run: Run, cfg: CompareConfig, logs: Path, after: Sequence[str]) -> list[str]:
    """The sbatch arguments of one run's job: name, log, resources, dependency on ``after``, script, arguments."""
    res = cfg.launch.pretrain if run.kind == "pretrain" else cfg.launch.finetune
    return [f"--job-name={_job_name(run)}", slurm.output_arg(logs), *slurm.sbatch_args(job_resources(res, cfg.launch)),
            *slurm.dependency_arg(after), STAGE_SCRIPTS[run.kind], str(run.config), *run.overrides]


def collect_job_args(cfg: CompareConfig, logs: Path, after: Sequence[str], collect_argv: Sequence[str]) -> list[str]:
    """The sbatch arguments of the collect job: ``python collect_argv`` from this directory, after ``after``."""
    wrap = f"cd {shlex.quote(str(Path.cwd()))} && {shlex.join([sys.executable, *collect_argv])}"
    res = job_resources(cfg.launch.collect, cfg.launch, stage_job=False)
    return ["--job-name=lkm-collect", slurm.output_arg(logs), *slurm.sbatch_args(res), *slurm.dependency_arg(after),
            f"--wrap={wrap}"]


def read_jobs(out: Path) -> dict[str, str]:
    """The job ids of the last submission into ``out`` ({run dir or 'collect': id}); empty when none."""
    jobs_file = out / JOBS_FILE
    return json.loads(jobs_file.read_text()) if jobs_file.exists() else {}


def _submit(args: list[str]) -> str:
    try:
        return slurm.sbatch(args, cwd=ROOT, env=slurm.python_env())  # the job scripts run $PYTHON: this venv's
    except slurm.SlurmError as e:
        raise StageFailed(str(e)) from e


def _line(name: str, job: str, after: Sequence[str]) -> str:
    return f"{name}: job {job}" + (f" (after {', '.join(after)})" if after else "")


def submit_sbatch(cfg: CompareConfig, runs: Sequence[Run], collect_argv: Sequence[str], dry_run: bool = False) \
        -> dict[str, str]:
    """One job per unfinished run (fine-tunes after their pretraining), then the collect job after all.

    Jobs still queued from an earlier call for the same run directory are reused, not submitted again.
    Returns {run dir or 'collect': job id}.
    """
    out = Path(cfg.output).resolve()
    logs = out / "logs"
    known = read_jobs(out)
    ids: dict[str, str] = {}
    for run in runs:
        key = str(run.dir)
        if run.finished:
            print(f"{run.name}: finished before, reused ({run.final})")
            continue
        if not dry_run and key in known and slurm.job_queued(known[key]):
            ids[key] = known[key]
            print(f"{run.name}: job {known[key]} still queued, reused")
            continue
        after = [ids[str(d.dir)] for d in run.after if str(d.dir) in ids]  # a finished dependency needs no wait
        args = stage_job_args(run, cfg, logs, after)
        ids[key] = "<dry-run>" if dry_run else _submit(args)
        print(_line(run.name, ids[key], after) + (f"\n  sbatch {shlex.join(args)}" if dry_run else ""))
    after = list(ids.values())
    args = collect_job_args(cfg, logs, after, collect_argv)
    if not dry_run:
        logs.mkdir(parents=True, exist_ok=True)
        ids["collect"] = _submit(args)
        (out / JOBS_FILE).write_text(json.dumps({**known, **ids}, indent=1))
    else:
        ids["collect"] = "<dry-run>"
    print(_line("collect", ids["collect"], after)
          + (f"\n  sbatch {shlex.join(args)}" if dry_run else f"; logs in {logs}"))
    return ids


def wait_for_table(ids: dict[str, str], out: Path) -> Path:
    """Wait for the jobs, then the table6.json the collect job wrote (it records its SLURM job id);
    StageFailed when that job wrote none."""
    slurm.wait_for_jobs(ids.values(), out / "logs")
    table = out / "table6.json"
    written_by = json.loads(table.read_text()).get("slurm_job_id") if table.exists() else None
    if written_by != ids["collect"]:
        raise StageFailed(f"the jobs ended without a new table (collect job {ids['collect']}; table6.json "
                          f"{'was written by ' + str(written_by) if table.exists() else 'is missing'}); see the logs "
                          f"in {out / 'logs'}")
    return table
