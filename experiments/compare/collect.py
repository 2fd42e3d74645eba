"""Collect: evaluate the finished fine-tunes, gather every figure with its source, write table and figures.

``evaluate_runs`` scores each finished fine-tune whose score file is missing or older than its
weights; ``pretrain_record`` / ``finetune_record`` read one run's figures and name the file they come
from; ``gather`` makes the JSON record of the whole table; ``collect`` does all of it and writes
``table6.md``, ``table6.json``, ``table6.png`` and the figures.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.logs import read_metrics

from .config import CompareConfig, EvaluateConfig
from .plan import Run, StageFailed
from .table import PAPER_TABLE6, table_markdown

__all__ = ["eval_json", "evaluate_runs", "pretrain_record", "finetune_record", "chance_miou", "gather", "collect"]


def eval_json(run: Run, ev: EvaluateConfig, split: str) -> Path:
    """The score file of a fine-tune for ``split``, named after the evaluation's settings."""
    suffix = ("_ms" if ev.ms else "") + ("_flip" if ev.flip else "")
    return run.dir / f"eval_{split}{suffix}.json"


def _needs_scores(run: Run, scores: Path) -> bool:
    return not scores.exists() or scores.stat().st_mtime < run.final.stat().st_mtime


def _evaluate(run: Run, ev: EvaluateConfig, out: Path) -> None:
    from segmentation.evaluate import main as evaluate_main

    print(f"evaluate {run.backbone} + {run.head} -> {out}", flush=True)
    argv = ["--checkpoint", str(run.final), "--out", str(out), "--save-png", str(run.dir / "predictions"),
            "--boundary-width", str(ev.boundary_width), "--max-images", str(ev.max_images),
            *(["--ms"] if ev.ms else []), *(["--flip"] if ev.flip else [])]
    # in this process (no second start-up of torch and timm per run); the per-class table goes to a log
    report = out.with_suffix(".txt")
    with report.open("w") as f, contextlib.redirect_stdout(f):
        rc = evaluate_main(argv)
    if rc != 0:
        raise StageFailed(f"evaluating {run.final} failed (exit {rc}); the error is above, the report in {report}")


def evaluate_runs(runs: Sequence[Run], ev: EvaluateConfig) -> dict[str, Path]:
    """Evaluate every finished fine-tune without a (newer) score file; {run dir: JSON}."""
    done = {}
    for run in runs:
        if run.kind != "finetune" or not run.finished:
            continue
        out = eval_json(run, ev, run.stage_config().data.val_split)
        if _needs_scores(run, out):
            _evaluate(run, ev, out)
        done[str(run.dir)] = out
    return done


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def pretrain_record(run: Run) -> dict[str, Any] | None:
    """The last validation of a finished pretraining run, or None."""
    metrics = run.dir / "metrics.jsonl"
    if not run.finished or not metrics.exists():
        return None
    vals = [r for r in read_metrics(metrics) if r.get("kind") == "val"]
    if not vals:
        return None
    v = vals[-1]
    return {"top5_error": _pct(v["top5_error"]), "top1_error": _pct(1 - v["top1"]), "images": v.get("images"),
            "epoch": v.get("epoch"), "source": f"{metrics} (validation after epoch {v.get('epoch')})"}


def finetune_record(run: Run, ev: EvaluateConfig) -> dict[str, Any] | None:
    """The scores of a finished, evaluated fine-tune (%, with the score file as source), or None."""
    if not run.finished:
        return None
    out = eval_json(run, ev, run.stage_config().data.val_split)
    if not out.exists():
        return None
    s = json.loads(out.read_text())
    return {"miou": _pct(s["miou"]), "pixel_acc": _pct(s["pixel_acc"]), "boundary_acc": _pct(s["boundary_acc"]),
            "internal_acc": _pct(s["internal_acc"]), "images": s["images"], "split": s["split"],
            "scales": s["scales"], "flip": s["flip"], "source": str(out)}


def chance_miou(run: Run) -> float | None:
    """mIoU (%) of predicting background everywhere on the fine-tunes' validation split: the floor to beat."""
    import torch

    from segmentation.datasets import SegmentationDataset, build_samples, dataset_info
    from segmentation.metrics import SegmentationMetrics

    d = run.stage_config().data
    num_classes, _ = dataset_info(d.dataset)
    try:
        dataset = SegmentationDataset(build_samples(d.dataset, d.val_split, d.root, d.sbd_root or None), num_classes)
    except (ValueError, FileNotFoundError):
        return None
    metrics = SegmentationMetrics(num_classes, boundary_width=0)
    for i in range(len(dataset)):
        label = torch.as_tensor(dataset.load(i)[1]).long()
        metrics.update(torch.zeros_like(label), label)
    return _pct(metrics.compute()["miou"])


def gather(cfg: CompareConfig, runs: Sequence[Run]) -> dict[str, Any]:
    """Every figure of the table with where it came from (JSON-able)."""
    pre = {r.backbone: pretrain_record(r) for r in runs if r.kind == "pretrain"}
    seg = {(r.backbone, r.head): finetune_record(r, cfg.evaluate) for r in runs if r.kind == "finetune"}
    finetunes = [r for r in runs if r.kind == "finetune"]
    return {
        "backbones": list(cfg.backbones), "heads": list(cfg.heads),
        "pretrain": pre,
        "segmentation": {f"{b}+{h}": rec for (b, h), rec in seg.items()},
        "chance_miou": chance_miou(finetunes[0]) if finetunes else None,
        "paper": PAPER_TABLE6,
        "missing": [r.name for r in runs if not r.finished],
        "output": str(Path(cfg.output).resolve()),
    }


def _draw_figures(cfg: CompareConfig, runs: Sequence[Run], out: Path) -> dict[str, Path | None]:
    """Figure 6 per backbone that has a finished fine-tune, and Figure 3 over all of them."""
    from experiments import figures

    written: dict[str, Path | None] = {}
    finished = [r for r in runs if r.kind == "finetune" and r.finished]
    for b in cfg.backbones:
        mine = [r for r in finished if r.backbone == b]
        if mine:
            grid = out / f"figure6_{b}.png"
            written[f"figure6_{b}"] = figures.prediction_grid(mine, grid, cfg.figures.figure6_images)
    if finished and cfg.figures.vrf_images > 0:
        written["figure3"] = figures.receptive_field_figure(finished, out / "figure3", cfg.figures)
    return written


def collect(cfg: CompareConfig, runs: Sequence[Run]) -> dict[str, Any]:
    """Evaluate what needs it, then write table6.md/.json/.png and the figures; returns the JSON record."""
    import torch

    from experiments import figures

    threads = torch.get_num_threads()
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    evaluate_runs(runs, cfg.evaluate)
    result = gather(cfg, runs)
    torch.set_num_threads(threads)  # importing ffcv (the pretraining checks) sets it to 1
    written: dict[str, Path | None] = {"table": out / "table6.md", "json": out / "table6.json"}
    (out / "table6.md").write_text(table_markdown(result))
    written["chart"] = figures.table_chart(result, out / "table6.png")
    written.update(_draw_figures(cfg, runs, out))
    result["files"] = {k: str(v) for k, v in written.items() if v is not None}
    (out / "table6.json").write_text(json.dumps(result, indent=1))
    return result
