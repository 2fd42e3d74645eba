"""The comparison's pictures: Table 6 as a bar chart, Figure 6's prediction grid, Figure 3's VRF.

All three are drawn from files the pipeline wrote (the table's JSON record, the evaluator's
prediction PNGs, the fine-tuned ``final.pth``), so they can be redrawn at any time with
``python -m experiments.compare --collect``. matplotlib runs headless (Agg). The figures take the
comparison's runs (``experiments.compare.Run``: run directory, backbone, head, stage config); what
they share with the receptive-field tool (matplotlib, display names, the images of a split) is in
``experiments.imaging``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.compare.config import FiguresConfig
from experiments.compare.plan import Run
from experiments.imaging import DISPLAY, load_images_from_split, pyplot, split_dataset

__all__ = ["table_chart", "prediction_grid", "receptive_field_figure"]

OURS, PAPER = "#3b6ea8", "#c9d7e8"


def _label(bars, values: Sequence[float | None], ax) -> None:
    for bar, v in zip(bars, values, strict=True):
        if v is not None:
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")


def table_chart(result: dict[str, Any], path: Path) -> Path:
    """Two panels: ImageNet top-5 error per backbone, and segmentation mIoU per head and backbone,
    ours (dark) beside the paper's (light, where the paper has the figure)."""
    plt = pyplot()
    bs, heads, paper = result["backbones"], result["heads"], result["paper"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(heads), 3.6),
                                   gridspec_kw={"width_ratios": [1, max(1, len(heads))]})
    x = np.arange(len(bs))
    ours = [(result["pretrain"].get(b) or {}).get("top5_error") for b in bs]
    theirs = [paper["imagenet_top5_error"].get(b) for b in bs]
    _label(ax1.bar(x - 0.2, [v or 0 for v in ours], 0.4, color=OURS, label="ours"), ours, ax1)
    _label(ax1.bar(x + 0.2, [v or 0 for v in theirs], 0.4, color=PAPER, label="paper"), theirs, ax1)
    ax1.set_xticks(x, [DISPLAY.get(b, b) for b in bs])
    ax1.set_ylabel("ImageNet top-5 error (%)")
    ax1.set_title("Pretraining (lower is better)", fontsize=9)
    width = 0.8 / (2 * len(bs))
    xh = np.arange(len(heads))
    for i, b in enumerate(bs):
        mine = [(result["segmentation"].get(f"{b}+{h}") or {}).get("miou") for h in heads]
        ref = [paper.get(f"miou_{h}", {}).get(b) for h in heads]
        off = (2 * i - len(bs)) * width + width / 2
        _label(ax2.bar(xh + off, [v or 0 for v in mine], width, color=OURS, alpha=1 - 0.35 * i,
                       label=f"{DISPLAY.get(b, b)} (ours)"), mine, ax2)
        _label(ax2.bar(xh + off + width, [v or 0 for v in ref], width, color=PAPER, alpha=1 - 0.35 * i,
                       hatch="//" if i else None, label=f"{DISPLAY.get(b, b)} (paper)"), ref, ax2)
    if result.get("chance_miou") is not None:
        ax2.axhline(result["chance_miou"], color="grey", ls="--", lw=0.8, label="chance (all background)")
    ax2.set_xticks(xh, [DISPLAY.get(h, h) for h in heads])
    ax2.set_ylabel("segmentation mIoU (%)")
    ax2.set_ylim(0, 130)  # headroom for the legend above the bars
    ax2.set_title("Fine-tuning (higher is better)", fontsize=9)
    ax2.legend(fontsize=7, loc="upper center", ncol=3)
    ax1.legend(fontsize=7)
    fig.suptitle("Table 6: ResNet50 vs ResNet50-GCN", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _colour(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[np.asarray(mask, dtype=np.uint8)]


def prediction_grid(runs: Sequence[Run], path: Path, n_images: int) -> Path | None:
    """Figure 6 for one backbone: a row per validation image, input | each run's prediction | ground truth.

    ``runs`` are the backbone's finished fine-tunes in column order; predictions are the palette PNGs
    ``segmentation.evaluate --save-png`` wrote into ``<run dir>/predictions``. Returns None when no
    prediction is there yet.
    """
    from PIL import Image

    from segmentation.datasets import palette_for

    d = runs[0].stage_config().data
    dataset, names = split_dataset(d.root, d.val_split, n_images, d.dataset, d.sbd_root or None)
    palette = palette_for(d.dataset)
    columns = ["input", *[DISPLAY.get(r.head, r.head) for r in runs], "ground truth"]
    rows = []
    for i, name in enumerate(names):
        image, label = dataset.load(i)
        preds = []
        for r in runs:
            png = r.dir / "predictions" / f"{name}.png"
            preds.append(_colour(np.asarray(Image.open(png)), palette) if png.exists() else None)
        rows.append([np.asarray(image).transpose(1, 2, 0), *preds, _colour(np.asarray(label), palette)])
    if not rows or all(p is None for row in rows for p in row[1:-1]):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.6 * len(columns), 1.6 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            ax = axes[i][j]
            ax.axis("off")
            if im is None:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            else:
                ax.imshow(im, interpolation="nearest")
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
    fig.suptitle(f"Figure 6: {DISPLAY.get(runs[0].backbone, runs[0].backbone)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def receptive_field_figure(runs: Sequence[Run], out_dir: Path, figures_cfg: FiguresConfig) -> Path:
    """Figure 3: the valid receptive field of every finished fine-tune, on the same validation images."""
    import torch

    from experiments.receptive_field import receptive_field_report
    from segmentation.artifacts import load_model

    d = runs[0].stage_config().data
    images = load_images_from_split(d.root, d.val_split, figures_cfg.vrf_images, d.dataset, d.sbd_root or None)
    models = {f"{DISPLAY.get(r.backbone, r.backbone)} + {DISPLAY.get(r.head, r.head)}": load_model(r.final)[0]
              for r in runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    receptive_field_report(models, images, out_dir, scales=tuple(figures_cfg.vrf_scales),
                           share=figures_cfg.vrf_share, device=torch.device("cpu"))
    return out_dir / "receptive_field.png"
