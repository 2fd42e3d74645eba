"""Training curves as a picture: the loss and the validation metric of runs against their progress.

Drawn from ``metrics.jsonl`` (what the run wrote; nothing is kept in memory), so a run directory's
``curves.png`` can be redrawn at any time, and several runs can share one figure side by side (the
comparison does). matplotlib is imported only here, headless (Agg).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .logs import read_metrics

__all__ = ["VAL_METRICS", "draw_curves"]

log = logging.getLogger(__name__)

# The validation number each stage reports, in the order they are looked for, with its label.
VAL_METRICS = (("miou", "val mIoU (%)"), ("top1", "val top-1 (%)"))


def _series(records: Sequence[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), int | float)
             and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def draw_curves(runs: Mapping[str, Path], path: Path, title: str = "") -> Path | None:
    """Training loss (left) and validation metric (right) against the step, one line per run.

    ``runs`` maps a label to a run directory (its ``metrics.jsonl``); runs without records are left out.
    Returns the PNG's path, or None when there is nothing to draw yet.
    """
    records = {label: read_metrics(d / "metrics.jsonl") for label, d in runs.items() if (d / "metrics.jsonl").exists()}
    records = {k: v for k, v in records.items() if v}
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global state between calls

    fig = Figure(figsize=(9, 3.4), dpi=110)
    loss_ax, val_ax = fig.subplots(1, 2)
    val_label = "validation"
    for label, recs in records.items():
        steps, loss = _series(recs, "train", "loss")
        if steps:
            loss_ax.plot(steps, loss, lw=1.2, label=label)
        for key, axis_label in VAL_METRICS:
            vsteps, values = _series(recs, "val", key)
            if vsteps:
                val_ax.plot(vsteps, [100 * v for v in values], marker="o", ms=3, lw=1.2, label=label)
                val_label = axis_label
                break
    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss")
    val_ax.set(xlabel="step", ylabel=val_label, title=val_label)
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        if len(records) > 1 and ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)  # a viewer never sees half a picture
    return path
