"""SLURM launch: job resources as sbatch arguments or a submitit executor, sbatch submission, waiting.

One place turns a job's resources (:class:`SlurmResources`: nodes, tasks and GPUs per node, CPUs per
task, time limit, memory, partition / account / qos, the time-limit warning signal and its delay,
requeue, extra sbatch arguments) into what a launcher needs:

- :func:`sbatch_args`: the ``sbatch`` options, for the stage scripts under ``slurm/`` (the comparison's
  launcher submits them with :func:`sbatch`);
- :func:`submitit_executor`: a configured ``submitit`` executor, ``slurm``, ``local`` or ``debug``
  (``python -m backbone.submit``).

Both give the same job the same resources; the warning signal is chosen here (``SBATCH_SIGNAL``, the
``USR1@300`` of the ``#SBATCH`` lines of ``slurm/*.sh``, which ``engine.preemption`` handles), so a
change of signal is made once. Under submitit, submitit sends its own (USR2), which ``engine.preemption``
handles too.

Queue helpers: :func:`sbatch` (submit, return the job id), :func:`job_queued` (``squeue``: is the job
still pending or running) and :func:`wait_for_jobs` (a line whenever the running set changes). Job logs
follow one naming rule, :func:`output_arg` / :func:`job_log` (``<log dir>/<job name>-<job id>.out``).

Knows nothing about the stages: imports neither timm nor the stage packages.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # submitit is imported when an executor is built: the sbatch path does not need it
    import submitit

__all__ = [
    "SBATCH_SIGNAL",
    "SIGNAL_DELAY_S",
    "SlurmError",
    "SlurmResources",
    "Cluster",
    "sbatch_args",
    "submitit_executor",
    "time_minutes",
    "dependency_arg",
    "output_arg",
    "job_log",
    "sbatch",
    "job_queued",
    "queued_jobs",
    "wait_for_jobs",
    "python_env",
]

# The time-limit warning of our sbatch jobs: what slurm/imagenet_pretrain.sh and
# slurm/segmentation_finetune.sh ask for (#SBATCH --signal=USR1@300) and engine.preemption handles
# (checkpoint at the next step boundary, requeue). Change it here to change it for every launcher.
SBATCH_SIGNAL = "USR1"
SIGNAL_DELAY_S = 300

# squeue states of a job that has not ended (it may still start, run or be requeued)
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING"})
LOG_NAME = "%x-%j.out"  # sbatch's patterns: job name, job id

Cluster = Literal["slurm", "local", "debug"]


class SlurmError(RuntimeError):
    """SLURM refused a request (e.g. sbatch rejected the job); the message names the command."""


@dataclass(frozen=True)
class SlurmResources:
    """What one job asks SLURM for.

    ``time`` is SLURM's time format (``"24:00:00"``, ``"1-12:00:00"``, ``"90"``) or minutes as an int.
    ``signal``: the time-limit warning, sent ``signal_delay_s`` seconds before the end; None means the
    launcher's own (``SBATCH_SIGNAL`` for sbatch, submitit's under submitit). ``signal_delay_s=None``:
    no warning at all (sbatch only: submitit always sends one). ``extra_args``: more sbatch options,
    last (so they win over the ones above), e.g. ``["--constraint=a100"]``.
    """

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time: str | int = "24:00:00"
    mem_gb: int = 0  # 0: the partition's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    signal: str | None = None
    signal_delay_s: int | None = SIGNAL_DELAY_S
    requeue: bool = True
    extra_args: Sequence[str] = field(default_factory=tuple)


def time_minutes(time_limit: str | int) -> int:
    """A SLURM time limit in whole minutes (seconds rounded up): ``90``, ``"90"``, ``"1:30:00"``, ``"1-06"``.

    SLURM's formats: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``.
    """
    if isinstance(time_limit, int):
        return time_limit
    text = time_limit.strip()
    try:
        days, sep, rest = text.partition("-")
        if not sep:
            days, rest = "0", text
        parts = [int(p) for p in rest.split(":")]
        d = int(days)
        if sep:  # D-H, D-H:M, D-H:M:S
            h, m, s = (parts + [0, 0])[:3]
        elif len(parts) == 1:  # M
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:  # M:S
            h, m, s = 0, parts[0], parts[1]
        else:  # H:M:S
            h, m, s = parts
        if len(parts) > 3 or min(d, h, m, s) < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"time limit {time_limit!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)") \
            from None
    return d * 24 * 60 + h * 60 + m + (1 if s else 0)


def sbatch_args(res: SlurmResources) -> list[str]:
    """The sbatch options for ``res``, in a fixed order (resources, account, warning, requeue, extras)."""
    args = [f"--nodes={res.nodes}", f"--ntasks-per-node={res.tasks_per_node}", f"--gpus-per-node={res.gpus_per_node}",
            f"--cpus-per-task={res.cpus_per_task}", f"--time={res.time}"]
    if res.mem_gb:
        args.append(f"--mem={res.mem_gb}G")
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            args.append(f"--{key}={getattr(res, key)}")
    if res.signal_delay_s is not None:
        args.append(f"--signal={res.signal or SBATCH_SIGNAL}@{res.signal_delay_s}")
    if res.requeue:
        args.append("--requeue")
    return args + list(res.extra_args)


def _additional_parameters(extra_args: Sequence[str]) -> dict[str, str | bool]:
    """``--key=value`` / ``--flag`` sbatch options as submitit's ``slurm_additional_parameters``."""
    params: dict[str, str | bool] = {}
    for arg in extra_args:
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(f"extra sbatch argument {arg!r}: submitit takes only long options, --key=value or --flag")
        key, sep, value = arg[2:].partition("=")
        params[key.replace("-", "_")] = value if sep else True
    return params


def _submitit_signal_check(res: SlurmResources) -> None:
    from submitit.core.job_environment import JobEnvironment

    own = JobEnvironment.USR_SIG  # submitit's handler listens to this one only
    if res.signal is not None and res.signal.removeprefix("SIG") != own:
        raise ValueError(f"submitit sends its own warning signal ({own}; environment variable "
                         f"SUBMITIT_PREEMPT_SIGNAL), not {res.signal}: leave signal unset for submitit")
    if res.signal_delay_s is None:
        raise ValueError("submitit always sends its warning signal: give signal_delay_s (seconds before the end)")


def submitit_executor(res: SlurmResources, cluster: Cluster, folder: str | Path, name: str,
                      max_requeues: int = 20) -> submitit.AutoExecutor:
    """A submitit executor with ``res``, for ``cluster``: ``slurm``, ``local`` (processes on this machine)
    or ``debug`` (in this process, pdb works).

    local and debug run on this machine only: one node (a note on stderr when ``res`` asks for more);
    debug runs a single task. The SLURM-only settings (warning delay, requeue, partition / account / qos,
    extra sbatch options, the CPUs per task given to srun and ``OMP_NUM_THREADS``) apply to ``slurm``.
    ``max_requeues``: how often a timed-out job is resubmitted.
    """
    import submitit

    if cluster not in ("slurm", "local", "debug"):
        raise ValueError(f"cluster must be slurm, local or debug, got {cluster!r}")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=max_requeues)
    tasks = 1 if cluster == "debug" else res.tasks_per_node  # the debug executor runs the job once, here
    nodes = res.nodes if cluster == "slurm" else 1
    if nodes != res.nodes:
        print(f"note: --{cluster} runs on this machine: --nodes {res.nodes} ignored", file=sys.stderr)
    params: dict[str, object] = dict(name=name, nodes=nodes, tasks_per_node=tasks, cpus_per_task=res.cpus_per_task,
                                     timeout_min=time_minutes(res.time))
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if cluster == "slurm":
        _submitit_signal_check(res)
        additional: dict[str, str | bool] = {"requeue": True} if res.requeue else {}
        additional.update(_additional_parameters(res.extra_args))
        params["slurm_signal_delay_s"] = res.signal_delay_s
        # As slurm/launch.sh does for the sbatch scripts: the srun of submitit's script gets the job's CPUs per task
        # (since SLURM 22.05 srun no longer inherits --cpus-per-task; where tasks are bound to cores each would
        # get one CPU), and the tasks' thread count is the same (where a site does not bind, torch would otherwise
        # start a thread per CPU of the node in every rank).
        params["slurm_srun_args"] = [f"--cpus-per-task={res.cpus_per_task}"]
        params["slurm_setup"] = [f"export OMP_NUM_THREADS={res.cpus_per_task}"]
        if additional:
            params["slurm_additional_parameters"] = additional
        for key in ("partition", "account", "qos"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
    executor.update_parameters(**params)
    return executor


def dependency_arg(job_ids: Iterable[str]) -> list[str]:
    """``--dependency=afterok:<id>:<id>...`` (start after all of them succeeded), or nothing without ids."""
    ids = list(job_ids)
    return [f"--dependency=afterok:{':'.join(ids)}"] if ids else []


def output_arg(log_dir: Path) -> str:
    """``--output`` for a job whose log is ``log_dir/<job name>-<job id>.out`` (see :func:`job_log`)."""
    return f"--output={log_dir}/{LOG_NAME}"


def job_log(log_dir: Path, job_name: str, job_id: str) -> Path:
    """The log file of a job submitted with :func:`output_arg`."""
    return log_dir / f"{job_name}-{job_id}.out"


def sbatch(args: Sequence[str], cwd: str | Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Submit one job (``sbatch --parsable ARGS``); returns its id. SlurmError naming the command when refused.

    ``--kill-on-invalid-dep=yes`` always: a job whose dependency failed is cancelled rather than left
    pending for ever.
    """
    proc = subprocess.run(["sbatch", "--parsable", "--kill-on-invalid-dep=yes", *args], cwd=cwd,
                          env=None if env is None else dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}\n"
                         f"  sbatch {shlex.join(args)}")
    return proc.stdout.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"


def job_queued(job_id: str) -> bool:
    """The job is still pending or running (squeue knows it and it has not ended)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    return out in ACTIVE_STATES


def queued_jobs(job_ids: Iterable[str]) -> list[tuple[str, str, str]]:
    """(job id, state, job name) of each of the jobs squeue still lists."""
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %j"], capture_output=True,
                         text=True).stdout.split("\n")
    return [(j, state, name) for j, state, name in (line.split() for line in out if len(line.split()) == 3)]


def wait_for_jobs(job_ids: Iterable[str], log_dir: Path, poll_s: float = 5.0) -> None:
    """Until squeue lists none of the jobs any more, with a line whenever a job starts or ends.

    The line names the running jobs with their logs (:func:`job_log` in ``log_dir``).
    """
    ids = list(job_ids)
    shown = None
    while True:
        jobs = queued_jobs(ids)
        if not jobs:
            return
        running = [f"{j} ({name}, log {job_log(log_dir, name, j)})" for j, state, name in jobs if state == "RUNNING"]
        state = (tuple(running), len(jobs))
        if state != shown:
            print(f"[{time.strftime('%H:%M:%S')}] {len(jobs)} SLURM job(s) left; running: "
                  f"{'; '.join(running) or 'none yet'}", flush=True)
            shown = state
        time.sleep(poll_s)


def python_env(python: str = sys.executable) -> dict[str, str]:
    """This environment with ``PYTHON`` set: the job scripts under slurm/ run ``$PYTHON`` (this venv's)."""
    return {**os.environ, "PYTHON": python}
