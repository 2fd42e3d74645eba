"""The rehearsal, ``python -m experiments.compare ... --rehearse``: the real plan with every stage cut short, run
where the real one will run, before it spends a thousand GPU-hours.

The same as the real run: the data paths, the launcher and its SLURM options (nodes, tasks and GPUs per node, CPUs
per task, partition, account), hence the world size and the distributed set-up (process group, DDP, the loaders'
shards), the global batch and its accumulation, SyncBatchNorm, FLOP counting, the evaluation settings and the
collect step. Cut short: each stage trains ``rehearse.steps`` optimiser steps (pretraining: one epoch of that many),
each evaluation sees ``rehearse.images`` validation images, one seed runs (the others repeat the same stages), and
at step ``rehearse.preempt_at`` every stage acts as if SLURM's time-limit signal had come: it checkpoints and, under
SLURM, requeues its job, which starts again and resumes (the local launcher starts it again itself).

Everything goes to ``<output>-rehearsal``, marked by ``REHEARSAL.md`` (a real run refuses a folder so marked), and
ends with one table, ``rehearsal.md`` / ``rehearsal.json``: per stage, whether it ran, was preempted and resumed,
its throughput per GPU, data-wait share and MFU, and the GPU-hours the full plan would take at that throughput.
"""
from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.config import ConfigError
from engine.lock import LOCK_NAME
from engine.logs import read_metrics
from engine.provenance import read_run_record

from .config import CompareConfig
from .plan import Run

__all__ = ["MARKER", "rehearsal_output", "rehearsal_config", "start_fresh", "refuse_rehearsal_output", "stage_speed",
           "stage_events", "planned_images", "report", "report_markdown", "write_report"]

MARKER = "REHEARSAL.md"
REPORT = "rehearsal"  # rehearsal.md, rehearsal.json


def rehearsal_output(cfg: CompareConfig) -> Path:
    """Where the rehearsal of ``cfg`` writes: beside the real output, never inside it."""
    out = Path(cfg.output).resolve()
    return out.with_name(out.name + "-rehearsal")


def rehearsal_config(cfg: CompareConfig) -> CompareConfig:
    """``cfg`` cut short (module doc): its own output, the first seed, every stage ``rehearse.steps`` steps long with
    a preemption at ``rehearse.preempt_at``, ``rehearse.images`` images per evaluation, one image per figure."""
    r = copy.deepcopy(cfg)
    n = cfg.rehearse
    r.output = str(rehearsal_output(cfg))
    r.seeds = cfg.seeds[:1]
    r.pretrain.seeds = [cfg.backbone_seed(cfg.seeds[0])]
    check = max(1, min(10, n.steps // 4))  # a throughput record every few steps
    preempt = [f"run.preempt_at_step={n.preempt_at}"] if n.preempt_at else []
    r.pretrain.overrides = [*cfg.pretrain.overrides, "train.epochs=1", f"train.steps_per_epoch={n.steps}",
                            "train.eval_every=1", f"data.val_max_images={n.images}", f"run.check_every_steps={check}",
                            *preempt]
    r.finetune.overrides = [*cfg.finetune.overrides, f"train.iterations={n.steps}", "eval.every=0",
                            f"eval.max_images={n.images}", f"run.checkpoint_every={n.steps}",
                            f"run.check_every_steps={check}", *preempt]
    r.evaluate.max_images = n.images
    r.figures.figure6_images = min(cfg.figures.figure6_images, 2)
    r.figures.vrf_images = min(cfg.figures.vrf_images, 1)
    return r


def start_fresh(rehearsal: CompareConfig) -> None:
    """Remove an earlier rehearsal (only from a folder it marked) and mark the new one: a rehearsal is cheap, and
    its figures must describe this cluster as it is now. The caller holds the folder's lock."""
    out = Path(rehearsal.output)
    out.mkdir(parents=True, exist_ok=True)
    earlier = [p for p in out.iterdir() if p.name != LOCK_NAME]  # the lock is this call's: it holds it
    if earlier and not (out / MARKER).exists():
        raise ConfigError(f"{out} exists and is not a rehearsal's folder (no {MARKER}): move it, or set output= "
                          "to another folder")
    for p in earlier:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (out / MARKER).write_text(
        "# A rehearsal, not results\n\nWritten by `python -m experiments.compare --rehearse`: every stage of the plan "
        "cut to a few steps, to check the cluster set-up and estimate the cost. Its scores say nothing about the "
        "networks. See rehearsal.md.\n")


def refuse_rehearsal_output(cfg: CompareConfig) -> None:
    """A real run in a rehearsal's folder would mix cut-short runs with real ones: ConfigError."""
    out = Path(cfg.output).resolve()
    if (out / MARKER).exists():
        raise ConfigError(f"{out} holds a rehearsal ({MARKER}): its runs are cut short. Give the real run its own "
                          "output= (the rehearsal of output=X writes to X-rehearsal)")


def stage_speed(run: Run, preempt_at: int) -> dict[str, Any]:
    """Throughput of a rehearsed run from its training records: per process (one GPU each on a GPU machine), data
    wait, MFU, over the records after the resume (the warm part: the first record of each attempt holds the start-up
    and is left out where there are later ones)."""
    path = run.dir / "metrics.jsonl"
    train = [r for r in read_metrics(path) if r.get("kind") == "train"] if path.exists() else []
    if not train:
        return {}
    warm = [r for r in train if r["step"] > preempt_at] or train
    if len(warm) > 1:
        warm = warm[1:]

    def mean(key: str) -> float | None:
        values = [r[key] for r in warm if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"img_per_s_per_process": mean("img_per_s_per_process"), "data_wait": mean("data_wait"), "mfu": mean("mfu"),
            "device": warm[-1].get("device"), "world_size": warm[-1].get("world_size"),
            "resolution": warm[-1].get("resolution"), "records": len(warm)}


def stage_events(run: Run) -> str:
    """What happened to a rehearsed run, from its log: finished, preempted, resumed."""
    log = run.dir / "train.log"
    text = log.read_text() if log.exists() else ""
    parts = ["finished" if run.finished else "did not finish"]
    if "acting as if SLURM's warning signal" in text:
        parts.append("preempted" + (", resumed" if "resumed from checkpoint" in text else ", NOT resumed"))
    return "; ".join(parts)


def planned_images(run: Run) -> list[tuple[int, int]] | None:
    """The real run's training images, as (images, resolution) per epoch (pretraining: progressive resizing) or one
    entry (fine-tuning: crops of one size); None where the training set cannot be read here."""
    cfg = run.stage_config()
    if run.kind == "pretrain":
        from backbone.train import resolution_at
        from backbone.write_beton import read_meta

        try:
            n = int(read_meta(cfg.data.train)["num_images"])
        except (OSError, KeyError, ValueError):
            return None
        per_epoch = n // cfg.data.global_batch * cfg.data.global_batch  # every rank drops its last partial batch
        if cfg.train.steps_per_epoch:
            per_epoch = min(per_epoch, cfg.train.steps_per_epoch * cfg.data.global_batch)
        return [(per_epoch, resolution_at(cfg.resolution, e)) for e in range(cfg.train.epochs)]
    iterations = cfg.train.iterations
    if not iterations:
        train_images = (read_run_record(run.dir).get("data") or {}).get("train_images")
        if not train_images:
            return None
        iterations = max(1, round(cfg.train.epochs * (train_images // cfg.data.global_batch)))
    return [(iterations * cfg.data.global_batch, cfg.data.crop_size)]


def _hours(images: list[tuple[int, int]], speed: dict[str, Any]) -> float | None:
    """Processor-hours of training ``images`` at the rehearsed throughput, scaled by pixel count where the
    resolution differs from the rehearsed one."""
    tp, res = speed.get("img_per_s_per_process"), speed.get("resolution")
    if not tp:
        return None
    return sum(n * ((r / res) ** 2 if res else 1.0) for n, r in images) / tp / 3600


def report(real: CompareConfig, real_runs: Sequence[Run], rehearsal: CompareConfig,
           rehearsed: Sequence[Run]) -> dict[str, Any]:
    """Per rehearsed stage: what happened, its throughput, and the cost of the real runs it stands for."""
    stages = []
    for run in rehearsed:
        speed = stage_speed(run, rehearsal.rehearse.preempt_at)
        planned = [r for r in real_runs if (r.kind, r.backbone, r.head) == (run.kind, run.backbone, run.head)]
        hours = [_hours(images, speed) if (images := planned_images(r)) is not None else None for r in planned]
        stages.append({"stage": run.name.rsplit(" (seed", 1)[0], "kind": run.kind, "dir": str(run.dir),
                       "events": stage_events(run), "processes": speed.get("world_size") or run.world_size,
                       **speed, "planned_runs": len(planned),
                       "planned_hours": None if not hours or None in hours else sum(hours)})
    table = Path(rehearsal.output) / "table6.json"
    unit = "GPU" if any(s.get("device") == "cuda" for s in stages) else "process"
    known = [s["planned_hours"] for s in stages]
    return {"output": rehearsal.output, "real_output": str(Path(real.output).resolve()), "launcher":
            real.launch.launcher, "steps": real.rehearse.steps, "preempt_at": real.rehearse.preempt_at,
            "images": real.rehearse.images, "seed": rehearsal.seeds[0], "unit": unit, "stages": stages,
            "collect": "table6.md and table6.json written" if table.exists() else "no table6.json",
            "total_hours": None if None in known else sum(known)}


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def report_markdown(rep: dict[str, Any]) -> str:
    unit = rep["unit"]
    lines = [f"# Rehearsal ({rep['launcher']} launcher)", "",
             f"Every stage of the plan cut to {rep['steps']} optimiser steps"
             + (f", preempted at step {rep['preempt_at']} and resumed" if rep["preempt_at"] else "")
             + f"; {rep['images']} validation images per evaluation; seed {rep['seed']} only. Output {rep['output']} "
             f"(the real run writes to {rep['real_output']}). Its scores say nothing about the networks.", "",
             f"| stage | processes | what happened | img/s per {unit} | data wait | MFU | full plan: runs | "
             f"full plan: {unit}-hours |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for s in rep["stages"]:
        mfu = "n/a" if s.get("mfu") is None else f"{100 * s['mfu']:.0f} %"
        wait = "–" if s.get("data_wait") is None else f"{100 * s['data_wait']:.0f} %"
        lines.append(f"| {s['stage']} | {s['processes']} | {s['events']} | "
                     f"{_num(s.get('img_per_s_per_process'), ',.1f')} | {wait} | {mfu} | {s['planned_runs']} | "
                     f"{_num(s['planned_hours'], ',.1f')} |")
    lines += ["", f"Evaluation and collect: {rep['collect']}.", ""]
    total = rep["total_hours"]
    lines.append(f"Estimated cost of the full plan: {_num(total, ',.0f')} {unit}-hours of training at the throughput "
                 "measured here (pretraining scaled by pixel count to each epoch's resolution; evaluation, queueing "
                 "and restarts not included)." if total is not None else
                 "Estimated cost of the full plan: unknown (a stage has no throughput, or its training set cannot "
                 "be read here).")
    if unit == "process":
        lines.append("These processes ran on CPUs: the figures describe this machine, not a GPU cluster.")
    return "\n".join(lines) + "\n"


def write_report(rep: dict[str, Any]) -> Path:
    out = Path(rep["output"])
    (out / f"{REPORT}.json").write_text(json.dumps(rep, indent=1) + "\n")
    path = out / f"{REPORT}.md"
    path.write_text(report_markdown(rep))
    return path
