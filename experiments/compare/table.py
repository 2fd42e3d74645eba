"""Table 6 as markdown: the paper's figures (``PAPER_TABLE6``), our rows beside them, and the notes below.

``table_rows`` orders the rows as the paper does, then our extra ones (top-1 error, boundary /
internal accuracy); ``table_markdown`` renders the JSON record of ``collect.gather`` with each of our
cells beside the paper's, a dash where a run has not finished.
"""
from __future__ import annotations

from typing import Any

from experiments.imaging import DISPLAY

__all__ = ["PAPER_TABLE6", "table_rows", "table_markdown"]

# Peng et al., Table 6 (%): ImageNet top-5 error (224 centre crop of 256), VOC 2012 val mIoU.
PAPER_TABLE6 = {
    "imagenet_top5_error": {"resnet50": 7.7, "resnet50_gcn": 7.9},
    "miou_baseline": {"resnet50": 65.7, "resnet50_gcn": 71.2},
    "miou_gcn_br": {"resnet50": 72.3, "resnet50_gcn": 72.5},
}

Row = tuple[str, str, dict[str, Any]]  # (label, paper key or '', {backbone: value or (boundary, internal)})


def _cell(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def table_rows(result: dict[str, Any]) -> list[Row]:
    """(row label, paper key or '', {backbone: value}) in Table 6's order, then our extra rows."""
    bs, heads = result["backbones"], result["heads"]
    pre, seg = result["pretrain"], result["segmentation"]

    def pick(b: str, h: str, key: str) -> float | None:
        rec = seg.get(f"{b}+{h}")
        return rec[key] if rec else None

    rows: list[Row] = [("ImageNet cls top-5 error (%)", "imagenet_top5_error",
                        {b: pre[b]["top5_error"] if pre.get(b) else None for b in bs})]
    for h in heads:
        key = f"miou_{h}" if f"miou_{h}" in PAPER_TABLE6 else ""
        rows.append((f"Seg. score, {DISPLAY.get(h, h)} (mIoU %)", key, {b: pick(b, h, "miou") for b in bs}))
    rows.append(("ImageNet cls top-1 error (%)", "", {b: pre[b]["top1_error"] if pre.get(b) else None for b in bs}))
    for h in heads:
        rows.append((f"{DISPLAY.get(h, h)}: boundary / internal acc. (%)", "",
                     {b: (pick(b, h, "boundary_acc"), pick(b, h, "internal_acc")) for b in bs}))
    return rows


def _row_cells(key: str, values: dict[str, Any], backbones: list[str]) -> str:
    """`` ours | paper |`` for each backbone; the paper's cell is empty where Table 6 has no figure."""
    cells = []
    for b in backbones:
        v = values[b]
        ours = f"{_cell(v[0])} / {_cell(v[1])}" if isinstance(v, tuple) else _cell(v)
        paper = PAPER_TABLE6.get(key, {}).get(b) if key else None
        cells.append(f" {ours} | {'' if paper is None else paper} |")
    return "".join(cells)


def _notes(result: dict[str, Any]) -> list[str]:
    """What the figures are, chance, what is missing."""
    multi_scale = any((r or {}).get("scales", [1]) != [1.0] for r in result["segmentation"].values())
    lines = ["", "Ours: ImageNet top-5 error of the last validation of each pretraining run (centre crop 224/256, "
             "flip-averaged); mIoU over the fine-tunes' validation split ("
             + ("multi-scale" if multi_scale else "single scale")
             + "). Paper: Peng et al., Table 6 (ImageNet; PASCAL VOC 2012 val)."]
    if result.get("chance_miou") is not None:
        lines.append(f"Chance (background everywhere) on the same split: mIoU {result['chance_miou']:.1f}%.")
    if result["missing"]:
        lines.append("Not finished yet (shown as –): " + ", ".join(result["missing"]) + ".")
    lines.append("Every figure's source file is in table6.json.")
    return lines


def table_markdown(result: dict[str, Any]) -> str:
    """The table (``# Table 6`` heading, one ours / paper column pair per backbone) and its notes."""
    bs = result["backbones"]
    header = "| |" + "".join(f" {DISPLAY.get(b, b)} | paper |" for b in bs)
    lines = ["# Table 6: ResNet50 vs ResNet50-GCN", "", header, "|---|" + "---:|---:|" * len(bs)]
    lines += [f"| {label} |" + _row_cells(key, values, bs) for label, key, values in table_rows(result)]
    return "\n".join(lines + _notes(result)) + "\n"
