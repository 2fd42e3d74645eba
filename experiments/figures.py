"""The comparison's pictures: Table 6 as a bar chart with error bars, the headline comparison per image,
Figure 6's prediction grid, Figure 3's VRF.

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

__all__ = ["table_chart", "per_image_difference", "prediction_grid", "receptive_field_figure"]

OURS, PAPER = "#3b6ea8", "#c9d7e8"


def _label(bars, values: Sequence[float | None], ax, spread: Sequence[float | None] | None = None) -> None:
    for i, (bar, v) in enumerate(zip(bars, values, strict=True)):
        if v is not None:
            top = bar.get_height() + ((spread[i] or 0) if spread is not None else 0)
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, top), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")


def _seed_values(cell: dict[str, Any] | None, key: str) -> list[float]:
    return [r[key] for r in (cell or {}).get("runs", {}).values() if r.get(key) is not None]


def _bars(ax, x: np.ndarray, cells: Sequence[dict[str, Any] | None], key: str, width: float, **style) -> None:
    """Bars of the seeds' mean, error bars of their standard deviation, a dot per seed."""
    means = [(c or {}).get(key) for c in cells]
    stds = [((c or {}).get("std") or {}).get(key) for c in cells]
    bars = ax.bar(x, [m or 0 for m in means], width, yerr=[s or 0 for s in stds], capsize=2,
                  error_kw={"elinewidth": 0.8}, **style)
    for xi, c in zip(x, cells, strict=True):
        seeds = _seed_values(c, key)
        if len(seeds) > 1:
            ax.plot([xi] * len(seeds), seeds, ".", color="black", ms=2.5, zorder=3)
    _label(bars, means, ax, stds)


def table_chart(result: dict[str, Any], path: Path) -> Path:
    """Two panels: classification error per backbone (the paper's protocol; top-5, or top-1 with fewer than 10
    classes), and segmentation mIoU per head and backbone; ours (dark: mean over seeds, error bar one standard
    deviation, dots the seeds), beside the paper's (light, where the paper has the figure) only when the runs
    were scored in the paper's setting (``collect.setting``)."""
    plt = pyplot()
    bs, heads, paper = result["backbones"], result["heads"], result["paper"]
    setting = {"paper": False, "top_k": 5, **(result.get("setting") or {})}
    k, with_paper = setting["top_k"], setting["paper"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(heads), 3.6),
                                   gridspec_kw={"width_ratios": [1, max(1, len(heads))]})
    x = np.arange(len(bs))
    bar = 0.4 if with_paper else 0.6
    _bars(ax1, x - (0.2 if with_paper else 0), [result["pretrain"].get(b) for b in bs], f"top{k}_error", bar,
          color=OURS, label="ours")
    if with_paper:
        theirs = [paper["imagenet_top5_error"].get(b) for b in bs]
        _label(ax1.bar(x + 0.2, [v or 0 for v in theirs], 0.4, color=PAPER, label="paper"), theirs, ax1)
    ax1.set_xticks(x, [DISPLAY.get(b, b) for b in bs])
    ax1.set_ylabel(f"{'ImageNet' if with_paper else 'pretraining data'} top-{k} error (%), 224 crop")
    ax1.set_title("Pretraining (lower is better)", fontsize=9)
    width = 0.8 / ((2 if with_paper else 1) * len(bs))
    xh = np.arange(len(heads))
    for i, b in enumerate(bs):
        off = ((2 * i - len(bs)) * width + width / 2) if with_paper else (i - (len(bs) - 1) / 2) * width
        alpha = 1 - 0.7 * i / max(1, len(bs) - 1)  # 1 down to 0.3, however many backbones
        _bars(ax2, xh + off, [result["segmentation"].get(f"{b}+{h}") for h in heads], "miou", width, color=OURS,
              alpha=alpha, label=f"{DISPLAY.get(b, b)} (ours)")
        if with_paper:
            ref = [paper.get(f"miou_{h}", {}).get(b) for h in heads]
            _label(ax2.bar(xh + off + width, [v or 0 for v in ref], width, color=PAPER, alpha=alpha,
                           hatch="//" if i else None, label=f"{DISPLAY.get(b, b)} (paper)"), ref, ax2)
    if result.get("chance_miou") is not None:
        ax2.axhline(result["chance_miou"], color="grey", ls="--", lw=0.8, label="chance (all background)")
    ax2.set_xticks(xh, [DISPLAY.get(h, h) for h in heads])
    ax2.set_ylabel("segmentation mIoU (%)")
    ax2.set_ylim(0, 130)  # headroom for the legend above the bars
    ax2.set_title("Fine-tuning (higher is better)", fontsize=9)
    ax2.legend(fontsize=7, loc="upper center", ncol=3)
    ax1.legend(fontsize=7)
    seeds = result.get("seeds", [0])
    where = "" if with_paper else "\nnot the paper's setting: the paper's figures are not shown"
    fig.suptitle(f"Table 6: ResNet50 vs ResNet50-GCN (ours: mean ± sd over {len(seeds)} seed(s), dots: seeds){where}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def per_image_difference(result: dict[str, Any], comparison: dict[str, Any], runs: Sequence[Run], path: Path,
                         n_images: int = 3) -> Path | None:
    """Where B helps and where it hurts, per validation image: each image's own mIoU under B minus under A
    (mean over the comparison's paired seeds), sorted, and the ``n_images`` images it helps most and hurts
    most (input | ground truth | A | B, predictions of the first paired seed). The comparison's own
    figure (from counts summed over images) is in the title."""
    from PIL import Image

    from experiments.compare.collect import load_counts
    from experiments.compare.stats import image_scores
    from segmentation.datasets import SegmentationDataset, build_samples, dataset_info, palette_for

    seeds = comparison["seeds"]
    (ca, names), (cb, _) = (load_counts(result["segmentation"].get(comparison[k])) for k in ("a", "b"))
    diff = 100 * np.mean([image_scores(cb[s]) - image_scores(ca[s]) for s in seeds], axis=0)
    order = np.argsort(diff)
    by_key = {(r.network, r.seed): r for r in runs if r.kind == "finetune"}
    ra, rb = by_key[comparison["a"], seeds[0]], by_key[comparison["b"], seeds[0]]
    d = ra.stage_config().data
    num_classes, _ = dataset_info(d.dataset)
    samples = {s.name: s for s in build_samples(d.dataset, d.val_split, d.root, d.sbd_root or None)}
    palette = palette_for(d.dataset)
    picks = [("helps", i) for i in order[::-1] if diff[i] > 0][:n_images] + \
        [("hurts", i) for i in order if diff[i] < 0][:n_images]

    plt = pyplot()
    rows = max(1, len(picks))
    fig = plt.figure(figsize=(10, max(3.2, 1.3 * rows)))
    grid = fig.add_gridspec(rows, 5, width_ratios=[3.2, 1, 1, 1, 1])
    ax = fig.add_subplot(grid[:, 0])
    colours = np.where(diff[order] >= 0, "#2e8b57", "#c0392b")
    ax.bar(np.arange(len(diff)), diff[order], color=colours, width=1.0)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("validation images, sorted")
    ax.set_ylabel("per-image mIoU, B - A (points)")
    helped, hurt = int((diff > 0).sum()), int((diff < 0).sum())
    ax.set_title(f"B helps {helped}, hurts {hurt}, ties {len(diff) - helped - hurt} of {len(diff)} images", fontsize=8)
    columns = ["input", "ground truth", DISPLAY.get(ra.backbone, ra.backbone), DISPLAY.get(rb.backbone, rb.backbone)]
    if ra.backbone == rb.backbone:
        columns[2:] = [DISPLAY.get(ra.head, ra.head), DISPLAY.get(rb.head, rb.head)]
    for row, (what, i) in enumerate(picks):
        name = str(names[i])
        image, label = SegmentationDataset([samples[name]], num_classes).load(0)
        panels = [np.asarray(image).transpose(1, 2, 0), _colour(np.asarray(label), palette)]
        for r in (ra, rb):
            png = r.dir / "predictions" / f"{name}.png"
            panels.append(_colour(np.asarray(Image.open(png)), palette) if png.exists() else None)
        for j, im in enumerate(panels):
            a = fig.add_subplot(grid[row, 1 + j])
            a.axis("off")
            if im is not None:
                a.imshow(im, interpolation="nearest")
            if row == 0:
                a.set_title(columns[j], fontsize=7)
            if j == 0:
                a.text(-0.08, 0.5, f"{what}\n{diff[i]:+.1f}", transform=a.transAxes, ha="right", va="center",
                       fontsize=7)
    fig.suptitle(f"{comparison['label']}: {comparison['text']} (mIoU points, B - A; seeds {seeds})", fontsize=9)
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
    fig.suptitle(f"Figure 6: {DISPLAY.get(runs[0].backbone, runs[0].backbone)} (seed {runs[0].seed})", fontsize=9)
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
