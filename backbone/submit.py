"""Submit ImageNet pretraining through submitit (SLURM, local processes, or in-process).

    python -m backbone.submit --config configs/pretrain/resnet50_gcn_88_epochs.yaml \\
        --nodes 2 --gpus-per-node 8 --partition gpu data.train=... data.val=... run.dir=runs/r50gcn
    python -m backbone.submit --local --gpus-per-node 2 --config ... ...   # local processes
    python -m backbone.submit --debug --config ... ...                     # in this process (pdb works)

Each task runs the same trainer as ``slurm/imagenet_pretrain.sh`` (``backbone.train.run``); the
SLURM variables are mapped to ranks by ``engine.distributed`` through submitit's
``TorchDistributedEnvironment``. On the time-limit signal the trainer writes a checkpoint at the
next step boundary and hands over to submitit, which calls ``PretrainJob.checkpoint`` (resubmit
the same job) and requeues; the new job resumes from the latest checkpoint in ``run.dir``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import submitit

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, OverridesParser, load_config
from engine.slurm import Cluster, SlurmResources, submitit_executor


class PretrainJob(submitit.helpers.Checkpointable):
    """A picklable call of the trainer; ``checkpoint()`` (inherited) resubmits the same call.

    Resubmitting the same arguments is all a resume needs: the trainer finds the latest
    checkpoint in ``run.dir`` itself.
    """

    def __init__(self, config: str | None, overrides: Sequence[str]):
        self.config = config
        self.overrides = list(overrides)

    def __call__(self) -> str:
        from backbone.train import PretrainConfig, run

        cfg = load_config(PretrainConfig, self.config, self.overrides)
        return str(run(cfg))  # a plain string in the pickled result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        print(f"submitit: resubmitting {self.config} {' '.join(self.overrides)}; it resumes from run.dir",
              flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def absolute_overrides(cfg, overrides: Sequence[str]) -> list[str]:
    """Pin the paths a job uses to absolute ones: jobs may start in another working directory."""
    pinned = [f"data.train={Path(cfg.data.train).resolve()}", f"data.val={Path(cfg.data.val).resolve()}",
              f"run.dir={Path(cfg.run.dir).resolve()}"]
    return list(overrides) + pinned


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OverridesParser(
        prog="python -m backbone.submit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit backbone pretraining with submitit (SLURM by default). Config keys as in "
                    "python -m backbone.train --help.")
    p.add_argument("--config", type=Path, default=None, help="YAML config (configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.5")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run as local processes (submitit LocalExecutor)")
    mode.add_argument("--debug", action="store_true", help="run in this process (submitit DebugExecutor)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU-only jobs")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=12, help="also sets data.num_workers")
    p.add_argument("--mem-gb", type=int, default=None)
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="time limit per job (requeued after)")
    p.add_argument("--signal-delay-s", type=int, default=300,
                   help="time-limit warning sent this many seconds before the end (checkpoint + requeue)")
    p.add_argument("--max-requeues", type=int, default=20, help="how often a timed-out job is resubmitted")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--job-name", default="lkm-pretrain")
    p.add_argument("--folder", type=Path, default=Path("logs/submitit"),
                   help="submitit folder (scripts, pickles, logs); %%j is the job id")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("--no-check", action="store_true",
                   help="skip the data/run-dir checks on this machine (paths only visible on the cluster)")
    return p.parse_args(argv)


def resources(args: argparse.Namespace) -> SlurmResources:
    """The job's resources from the command line; one task per GPU unless --tasks-per-node says otherwise."""
    return SlurmResources(
        nodes=args.nodes, tasks_per_node=args.tasks_per_node or max(args.gpus_per_node, 1),
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time=args.timeout_min,
        mem_gb=args.mem_gb or 0, partition=args.partition or "", account=args.account or "", qos=args.qos or "",
        signal_delay_s=args.signal_delay_s)  # the signal itself is submitit's own


def cluster(args: argparse.Namespace) -> Cluster:
    """Where the job runs: debug (this process), local (processes here) or slurm."""
    return "debug" if args.debug else "local" if args.local else "slurm"


def make_executor(args: argparse.Namespace) -> submitit.Executor:
    """The submitit executor for the command line (engine.slurm maps the resources)."""
    return submitit_executor(resources(args), cluster(args), args.folder / "%j", name=args.job_name,
                             max_requeues=args.max_requeues)


def main(argv: Sequence[str] | None = None) -> int:
    from backbone.train import PretrainConfig, check_inputs

    args = parse_args(argv)
    overrides = list(args.overrides)
    if not args.debug:
        overrides.insert(0, f"data.num_workers={args.cpus_per_task}")
    try:
        cfg = load_config(PretrainConfig, args.config, overrides)
        if not args.no_check:
            check_inputs(cfg)  # bad data, model name or run dir: fail here, not in the queue
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = str(args.config.resolve()) if args.config else None
    job = make_executor(args).submit(PretrainJob(config, absolute_overrides(cfg, overrides)))
    print(f"submitted job {job.job_id} ({cluster(args)})")
    print(f"  log:     {job.paths.stdout}".replace("%t", "0"))
    print(f"  errors:  {job.paths.stderr}".replace("%t", "0"))
    print(f"  run dir: {Path(cfg.run.dir).resolve()}")
    if args.wait or args.debug:
        results = job.results()
        print(f"job {job.job_id} finished: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
