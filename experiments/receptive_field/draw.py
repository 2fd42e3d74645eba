"""The Figure 3 grid: rows are images; columns the input, then each model (x scale) with its VRF.

Each heat-map panel shows the (resized) image dimmed, the heat map (square-root scaled, so the
tails show), the VRF's outline (smoothed: the exact VRF is often speckled) and the location (+).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from experiments.imaging import display_image, new_figure

from .measure import ImageItem, VRFComparison, scale_input

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["receptive_field_grid", "draw_receptive_fields"]


def _smoothed(mask: np.ndarray) -> np.ndarray:
    """``mask`` box-blurred over ~1/24 of the image's smaller side: an outline of the region, not of its speckle."""
    k = max(3, min(mask.shape) // 24) | 1
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)[0, 0].numpy()


def _input_panel(ax: Axes, comparison: VRFComparison, i: int, x: torch.Tensor) -> None:
    """The image as it looks, its location (+), and its name, size and where the location comes from."""
    h, w = comparison.sizes[i]
    r, c = comparison.points[i]
    ax.imshow(display_image(x))
    ax.plot(c, r, marker="+", color="lime", markersize=12, markeredgewidth=2)
    ax.set_title(f"{comparison.names[i]}\n{w}x{h}, point ({r}, {c}) [{comparison.point_sources[i]}]", fontsize=7)


def _vrf_panel(ax: Axes, comparison: VRFComparison, i: int, x: torch.Tensor, model: str, scale: float) -> None:
    """One model's heat map on image ``i`` at ``scale``, its VRF outlined; the title gives the VRF's size."""
    vrf = comparison.results[model][scale][i]
    xs, _ = scale_input(x, comparison.points[i], scale)
    ax.imshow(0.35 * display_image(xs))  # dimmed: the heat map is what the eye should follow
    peak = float(vrf.heat.max())
    if peak > 0:
        ax.imshow(np.sqrt(vrf.heat / peak), cmap="inferno", alpha=0.7, vmin=0, vmax=1)
        if 0 < vrf.area < vrf.heat.size:
            ax.contour(_smoothed(vrf.mask()), levels=[0.5], colors="cyan", linewidths=1.0)
    pr, pc = vrf.point
    ax.plot(pc, pr, marker="+", color="lime", markersize=12, markeredgewidth=2)
    head = f"{model}" + (f" x{scale:g}" if len(comparison.scales) > 1 else "")
    body = "zero gradient: no VRF" if vrf.zero_gradient else f"VRF {100 * vrf.fraction:.1f}%, {vrf.side:.0f} px side"
    ax.set_title(f"{head}\n{body}", fontsize=7)


def _suptitle(comparison: VRFComparison) -> str:
    score = {"predicted": "logit of the predicted class", "sum": "sum of the class logits"}.get(
        comparison.target, f"logit of class {comparison.target}")  # type: ignore[arg-type]
    return (f"Valid receptive field: the pixels holding {100 * comparison.share:g}% of |d score / d input|, "
            f"score = {score} at +")


def receptive_field_grid(comparison: VRFComparison, images: Sequence[ImageItem],
                         panel_inches: float = 2.4) -> Figure:
    """The Figure 3 grid (not saved): ``axes[i][0]`` is image ``i``, ``axes[i][j]`` the j-th (model, scale)
    in the order of ``comparison.results``, each scale of a model in turn."""
    columns = [(m, s) for m in comparison.results for s in comparison.scales]
    n_rows, n_cols = len(comparison.names), 1 + len(columns)
    fig = new_figure(figsize=(panel_inches * n_cols, panel_inches * n_rows + 0.3), dpi=100)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, (x, _label) in enumerate(images[: n_rows]):
        x = x[0] if x.dim() == 4 else x
        _input_panel(axes[i][0], comparison, i, x)
        for j, (model, s) in enumerate(columns, start=1):
            _vrf_panel(axes[i][j], comparison, i, x, model, s)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(_suptitle(comparison), fontsize=9)
    fig.tight_layout()
    return fig


def draw_receptive_fields(comparison: VRFComparison, images: Sequence[ImageItem], path: str | Path,
                          panel_inches: float = 2.4) -> Path:
    """Write the Figure 3 grid (:func:`receptive_field_grid`) as a PNG at ``path``; returns the path.

    Each heat-map panel's title gives the VRF area as a percentage of the image and the side of the
    equal-area square.
    """
    fig = receptive_field_grid(comparison, images, panel_inches)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
