"""The comparison's command line, ``python -m experiments.compare``: flags, the flow of one call, the summary.

``main`` loads the config, plans, checks, then either shows the plan (``--dry-run``), submits SLURM
jobs (``--launcher sbatch``, waiting with ``--wait``), or runs what is missing here, and collects.
Errors in the config, the data or a stage exit with code 2 and one ``error:`` line.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, OverridesParser, describe_keys, load_config
from engine.lock import FolderLock
from engine.logs import setup_logging

from .collect import collect
from .config import CompareConfig
from .launch import Interrupted, run_local, submit_sbatch, wait_for_table
from .plan import Run, StageFailed, check_plan, move_aside, plan, stale_reason

__all__ = ["build_parser", "print_summary", "main"]


def _description() -> str:
    # the package's docstring is the manual: its usage block and the two paragraphs after it
    doc = sys.modules[__package__].__doc__ or ""
    return doc.split("\n\n")[0] + "\n\n" + "\n\n".join(doc.split("\n\n")[1:3])


def build_parser() -> argparse.ArgumentParser:
    p = OverridesParser(
        prog="python -m experiments.compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_description(), epilog="config keys (section.key=default):\n" + describe_keys(CompareConfig))
    p.add_argument("--config", type=Path, default=None, help="YAML config (configs/table6.yaml, configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. launch.launcher=sbatch")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: evaluate finished fine-tunes that have no score yet, write the table/figures")
    p.add_argument("--launcher", choices=("local", "sbatch"), default=None, help="shorthand for launch.launcher=")
    p.add_argument("--wait", action="store_true", help="sbatch: wait for the jobs, then print the table")
    p.add_argument("--dry-run", action="store_true", help="print the plan (commands or sbatch lines), run nothing")
    p.add_argument("--no-check", action="store_true",
                   help="skip the data checks on this machine (paths only visible on the cluster's nodes)")
    return p


def print_summary(result: dict[str, Any]) -> None:
    """The table, then every file written."""
    print(Path(result["files"]["table"]).read_text())
    print("files:")
    for key, path in result["files"].items():
        print(f"  {key:<22} {path}")


def print_local_plan(runs: Sequence[Run], stale: dict[Path, str]) -> None:
    """--dry-run with the local launcher: each run's state and command line."""
    for run in runs:
        state = "stale, would be moved aside and rerun" if run.dir in stale else \
            "finished, reused" if run.finished else "to run"
        print(f"{run.name} ({state}):\n  {shlex.join(run.command())}")


def handle_stale(runs: Sequence[Run], move: bool) -> dict[Path, str]:
    """Fine-tunes trained from backbone weights that are not their pretraining's current final.pth: moved
    aside (``<dir>.stale-<n>``, never deleted) so that they are retrained, or, without ``move`` (--collect,
    --dry-run), only named. Returns {dir: reason} of those not moved."""
    left: dict[Path, str] = {}
    for run in runs:
        reason = stale_reason(run)
        if reason is None:
            continue
        if move:
            print(f"{run.name} is stale ({reason}): moved to {move_aside(run)}, it runs again", flush=True)
        else:
            print(f"{run.name} is stale ({reason})", flush=True)
            left[run.dir] = reason
    return left


def launch_sbatch(cfg: CompareConfig, runs: Sequence[Run], args: argparse.Namespace, overrides: list[str],
                  lock: FolderLock) -> None:
    """Submit the jobs and a collect job that reruns this command with --collect; with --wait, print the table.
    The output's lock is released once they are submitted: the collect job takes it (each stage job takes its
    run directory's)."""
    config = [] if args.config is None else ["--config", str(args.config.resolve())]
    collect_argv = ["-m", "experiments.compare", *config, "--collect", *overrides]
    ids = submit_sbatch(cfg, runs, collect_argv, dry_run=args.dry_run)
    lock.release()
    if args.dry_run:
        return
    out = Path(cfg.output).resolve()
    if not args.wait:
        print(f"the table appears in {out / 'table6.md'} when job {ids['collect']} ends; or run again with "
              "--collect at any time")
        return
    print_summary(json.loads(wait_for_table(ids, out).read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"launch.launcher={args.launcher}"] if args.launcher else [])
    setup_logging()
    lock = None
    try:
        cfg = load_config(CompareConfig, args.config, overrides)
        runs = plan(cfg)  # a bad config stops here, before the output folder exists
        lock = FolderLock(Path(cfg.output).resolve(), "comparison output")
        if not args.dry_run:  # one comparison at a time per output; a dry run writes nothing
            lock.acquire()
        stale = handle_stale(runs, move=not (args.collect or args.dry_run))
        check_plan(runs, data=not (args.no_check or args.collect), skip_recipe=stale)
        if args.dry_run and cfg.launch.launcher == "local":
            print_local_plan(runs, stale)
        elif not args.collect and cfg.launch.launcher == "sbatch":
            launch_sbatch(cfg, runs, args, overrides, lock)
        else:
            if not args.collect:
                run_local(runs)
            print_summary(collect(cfg, runs, stale))
    except (ConfigError, CheckpointError, StageFailed, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # a run stopped by the signal (it checkpointed): one line, exit 128 + the signal
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C while planning, checking or collecting: nothing is training
        print("interrupted (Ctrl-C): nothing is lost; run the same command again to go on", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
    return 0
