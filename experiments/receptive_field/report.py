"""Measure, draw and save in one call (``receptive_field_report``), and the summary the tool prints.

Writes ``receptive_field.png`` (the grid of ``draw``) and ``receptive_field.json`` (the record of
``measure.VRFComparison.to_json`` plus the two paths) into one folder.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .draw import draw_receptive_fields
from .measure import CPU, DEFAULT_SHARE, ImageItem, Point, Target, compare_receptive_fields

__all__ = ["FIGURE_NAME", "JSON_NAME", "receptive_field_report", "format_summary"]

FIGURE_NAME = "receptive_field.png"
JSON_NAME = "receptive_field.json"


def receptive_field_report(models: Mapping[str, torch.nn.Module], images: Sequence[ImageItem], out_dir: str | Path,
                           scales: Sequence[float] = (1.0,), share: float = DEFAULT_SHARE, device: torch.device = CPU,
                           *, points: Sequence[Point | None] | Point | None = None, target: Target = "predicted",
                           names: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, draw and save: ``out_dir/receptive_field.png`` and ``receptive_field.json``; returns the JSON dict.

    See :func:`compare_receptive_fields` for the arguments; the dict is :meth:`VRFComparison.to_json`
    plus the paths of the two files (``figure``, ``json``).
    """
    comparison = compare_receptive_fields(models, images, scales, share, device, points=points, target=target,
                                          names=names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = draw_receptive_fields(comparison, images, out_dir / FIGURE_NAME)
    record = comparison.to_json()
    record["figure"] = str(figure)
    record["json"] = str(out_dir / JSON_NAME)
    (out_dir / JSON_NAME).write_text(json.dumps(record, indent=1))
    return record


def format_summary(record: Mapping[str, Any]) -> str:
    """Readable table of a report's JSON dict: one line per model and scale."""
    rows = [(model, scale, v["mean_fraction"], v["mean_side"], v["mean_area"], v["zero_gradient_images"])
            for model, per_scale in record["models"].items() for scale, v in per_scale.items()]
    width = max([len("model")] + [len(r[0]) for r in rows])
    n = len(record["images"])
    lines = [f"valid receptive field ({100 * record['share']:g}% of the gradient mass), mean over {n} image(s):",
             f"{'model':<{width}}  scale  VRF area %  sqrt side px  area px",
             f"{'-' * width}  -----  ----------  ------------  -------"]
    for model, scale, fraction, side, area, zero in rows:
        note = f"  ({zero} with zero gradient)" if zero else ""
        lines.append(f"{model:<{width}}  {scale:>5}  {100 * fraction:>9.1f}%  {side:>12.1f}  {area:>7.0f}{note}")
    return "\n".join(lines)

