"""The comparison's command line, ``python -m experiments.compare``: flags, the flow of one call, the summary.

``main`` loads the config, plans, checks, then either shows the plan (``--dry-run``), plans the seeds from
the scores already there (``--plan-seeds``), submits SLURM jobs (``--launcher sbatch``, waiting with
``--wait``), or runs what is missing here, and collects. Errors in the config, the data or a stage exit with
code 2 and one ``error:`` line.
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

from .collect import collect, compared, crf_variants, score_problem, seed_plan
from .config import CompareConfig
from .launch import Interrupted, run_local, submit_sbatch, wait_for_table
from .plan import Run, StageFailed, check_plan, move_aside, plan, stale_reason
from .rehearse import refuse_rehearsal_output, rehearsal_config, report, start_fresh, write_report

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
    p.add_argument("--rehearse", action="store_true",
                   help="the first thing to run on a new cluster: the same plan, launcher and resources with "
                        "every stage cut to rehearse.steps steps (preempted and resumed on the way), into "
                        "<output>-rehearsal; ends with a table of what ran, throughput per GPU, data wait, MFU and "
                        "the full plan's GPU-hours")
    p.add_argument("--plan-seeds", type=_deltas, default=None, metavar="DELTA[,DELTA...]",
                   help="train and evaluate nothing: from the scores of the finished runs, print for each comparison "
                        "the smallest difference its seeds can detect, and the seeds each DELTA (mIoU points, e.g. "
                        "0.2,5.5) needs (80 %% power at the table's family-wise level)")
    return p


def _deltas(text: str) -> list[float]:
    """``--plan-seeds``' value: one or more differences in mIoU points, comma-separated, each > 0."""
    try:
        deltas = [abs(float(x)) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a difference in mIoU points (e.g. 5.5 or 0.2,5.5)") from None
    if not deltas or any(d == 0 for d in deltas):
        raise argparse.ArgumentTypeError(f"{text!r}: each difference must be nonzero (e.g. 5.5 or 0.2,5.5)")
    return deltas


def print_seed_plan(cfg: CompareConfig, runs: Sequence[Run], stale: dict[Path, str], deltas: Sequence[float]) -> None:
    """--plan-seeds: what each comparison's seeds can detect and the seeds each difference needs (read-only)."""
    result = compared(cfg, runs, stale)
    plans = seed_plan(result["comparisons"] + result.get("comparisons_crf", []), deltas, cfg.stats.confidence)
    unscored = [r.name for r in runs if r.kind == "finetune" and r.finished and r.dir not in stale
                and any(score_problem(r, cfg.evaluate, crf) for crf in crf_variants(cfg.evaluate))]
    if not plans:
        print("no comparison to plan: the config has one backbone and one head")
        return
    tested = sum(row["units"] is not None for row in plans)
    print(f"seed plan: {round(100 * plans[0]['power'])} % power at the family's strictest level (alpha = "
          f"{plans[0]['alpha']:.3g}, the table's {round(100 * cfg.stats.confidence)} % over {tested} comparisons "
          "with Holm's correction), from the spread the finished seeds show so far")
    for row in plans:
        n = len(row["seeds"] or [])
        unit = "pretraining runs" if row["unit"] == "pretraining" else "seeds"
        scope = f"; {row['scope']}" if row["scope"] else ""
        print(f"  {row['label']} ({n} paired seed{'s' if n != 1 else ''}{scope})")
        if row["detectable"] is None:
            print("    " + ("no seed finished in both networks yet" if not n else
                          f"one {unit[:-1]}: no spread from {unit[:-1]} to {unit[:-1]} to plan from; finish a second"))
            continue
        print(f"    spread from {unit[:-1]} to {unit[:-1]}: sd {row['seed_sd']:.2f} points over {row['units']} "
              f"{unit}; image-level error shared by all: se {row['image_se']:.2f} points")
        print(f"    detectable with these seeds: >= {row['detectable']:.1f} points")
        for delta, need in row["needed"].items():
            print(f"    {delta:g} points: " + (f"{need} {unit}" if need is not None else
                                               "more seeds cannot get there (the image-level error every seed shares "
                                               "is too large: it needs more validation images)"))
    if unscored:
        print("finished but without a current score (run --collect first to include them): " + ", ".join(unscored))


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
    """Submit the jobs and a collect job that reruns this command with --collect; with --wait (and always for a
    rehearsal), print the table. The output's lock is released once they are submitted: the collect job takes it
    (each stage job takes its run directory's)."""
    config = [] if args.config is None else ["--config", str(args.config.resolve())]
    collect_argv = ["-m", "experiments.compare", *config, "--collect", *(["--rehearse"] if args.rehearse else []),
                    *overrides]
    ids = submit_sbatch(cfg, runs, collect_argv, dry_run=args.dry_run)
    lock.release()
    if args.dry_run:
        return
    out = Path(cfg.output).resolve()
    if not (args.wait or args.rehearse):
        print(f"the table appears in {out / 'table6.md'} when job {ids['collect']} ends; or run again with "
              "--collect at any time")
        return
    print_summary(json.loads(wait_for_table(ids, out).read_text()))
    if args.rehearse:
        print((out / "rehearsal.md").read_text())


def collect_rehearsal(real: CompareConfig, cfg: CompareConfig, runs: Sequence[Run], stale: dict[Path, str]) -> None:
    """The rehearsal's collect: the table (marked as a rehearsal's), then the rehearsal's own report."""
    result = collect(cfg, runs, stale)
    table = Path(result["files"]["table"])
    table.write_text("> **Rehearsal**: every stage cut short (rehearsal.md); these scores say nothing about the "
                     "networks.\n\n" + table.read_text())
    print_summary(result)
    path = write_report(report(real, plan(real), cfg, runs))
    print(path.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"launch.launcher={args.launcher}"] if args.launcher else [])
    setup_logging()
    lock = None
    try:
        cfg = real = load_config(CompareConfig, args.config, overrides)
        if args.rehearse:
            cfg = rehearsal_config(real)
        else:
            refuse_rehearsal_output(cfg)
        runs = plan(cfg)  # a bad config stops here, before the output folder exists
        reading = args.collect or args.plan_seeds is not None  # read what is there: train nothing, move nothing
        lock = FolderLock(Path(cfg.output).resolve(), "comparison output")
        if not (args.dry_run or args.plan_seeds is not None):  # one comparison at a time per output
            lock.acquire()
        if args.rehearse and not (reading or args.dry_run):
            start_fresh(cfg)
        stale = handle_stale(runs, move=not (reading or args.dry_run))
        check_plan(runs, data=not (args.no_check or reading), skip_recipe=stale)
        if args.plan_seeds is not None:
            print_seed_plan(cfg, runs, stale, args.plan_seeds)
        elif args.dry_run and cfg.launch.launcher == "local":
            print_local_plan(runs, stale)
        elif not args.collect and cfg.launch.launcher == "sbatch":
            launch_sbatch(cfg, runs, args, overrides, lock)
        elif args.rehearse:
            if not args.collect:
                run_local(runs, resume_preempted=True)
            collect_rehearsal(real, cfg, runs, stale)
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
