"""Table 6 as markdown: the paper's figures (``PAPER_TABLE6``), ours beside them as mean ± standard deviation
over seeds (n), the comparisons with their intervals and verdicts, and notes that say what each row measures.

``table_rows`` orders the rows as the paper does, then our extra ones (with ``evaluate.crf``: each head's mIoU
after the dense CRF, "+ CRF"; top-1 error, ffcv-imagenet's validation protocol, boundary / internal
accuracy); ``table_markdown`` renders the JSON record of ``collect.gather``, a dash where no seed of a run has
finished. Scores with CRF have rows and comparisons of their own, never mixed with the plain ones.
"""
from __future__ import annotations

from typing import Any

from experiments.imaging import DISPLAY

from .stats import Summary

__all__ = ["PAPER_TABLE6", "display", "cell_summary", "table_rows", "table_markdown"]

# Peng et al., Table 6 (%): ImageNet top-5 error (224 centre crop of 256), VOC 2012 val mIoU.
PAPER_TABLE6 = {
    "imagenet_top5_error": {"resnet50": 7.7, "resnet50_gcn": 7.9},
    "miou_baseline": {"resnet50": 65.7, "resnet50_gcn": 71.2},
    "miou_gcn_br": {"resnet50": 72.3, "resnet50_gcn": 72.5},
}

Row = tuple[str, str, dict[str, Any]]  # (label, paper key or '', {backbone: Summary or (Summary, Summary)})


def display(name: str) -> str:
    return DISPLAY.get(name, name)


def cell_summary(cell: dict[str, Any] | None, key: str) -> Summary:
    """A cell's figure as a Summary (mean, std over seeds, n); empty for a cell without finished seeds."""
    if not cell or cell.get(key) is None:
        return Summary(None, None, 0)
    return Summary(cell[key], (cell.get("std") or {}).get(key), cell.get("n", 1))


def _ffcv_label(result: dict[str, Any]) -> str:
    """'ffcv protocol: 256 px, flip' from the pretraining records (what the last validation used)."""
    for cell in result["pretrain"].values():
        for rec in (cell or {}).get("runs", {}).values():
            if rec.get("ffcv"):
                f = rec["ffcv"]
                return f"ffcv protocol: {f['val_res']} px{', flip' if f['flip'] else ''}"
    return "ffcv protocol"


def table_rows(result: dict[str, Any]) -> list[Row]:
    """(row label, paper key or '', {backbone: Summary}) in Table 6's order, then our extra rows."""
    bs, heads = result["backbones"], result["heads"]
    pre, seg = result["pretrain"], result["segmentation"]
    ffcv = _ffcv_label(result)
    rows: list[Row] = [("ImageNet cls top-5 error (%)", "imagenet_top5_error",
                        {b: cell_summary(pre.get(b), "top5_error") for b in bs})]
    crf = result.get("segmentation_crf") if result.get("crf") else None
    for h in heads:
        key = f"miou_{h}" if f"miou_{h}" in PAPER_TABLE6 else ""
        rows.append((f"Seg. score, {display(h)} (mIoU %)", key,
                     {b: cell_summary(seg.get(f"{b}+{h}"), "miou") for b in bs}))
    if crf is not None:  # Table 6 has no CRF: no paper figure beside these
        for h in heads:
            rows.append((f"Seg. score, {display(h)} + CRF (mIoU %)", "",
                         {b: cell_summary(crf.get(f"{b}+{h}"), "miou") for b in bs}))
    rows.append(("ImageNet cls top-1 error (%)", "", {b: cell_summary(pre.get(b), "top1_error") for b in bs}))
    rows.append((f"ImageNet top-5 error (%), {ffcv}", "", {b: cell_summary(pre.get(b), "ffcv_top5_error") for b in bs}))
    rows.append((f"ImageNet top-1 error (%), {ffcv}", "", {b: cell_summary(pre.get(b), "ffcv_top1_error") for b in bs}))
    for cells, suffix in ((seg, ""), *(((crf, " + CRF"),) if crf is not None else ())):
        for h in heads:
            rows.append((f"{display(h)}{suffix}: boundary / internal acc. (%)", "",
                         {b: (cell_summary(cells.get(f"{b}+{h}"), "boundary_acc"),
                              cell_summary(cells.get(f"{b}+{h}"), "internal_acc")) for b in bs}))
    return rows


def _row_cells(key: str, values: dict[str, Any], backbones: list[str]) -> str:
    """`` ours | paper |`` for each backbone; the paper's cell is empty where Table 6 has no figure."""
    cells = []
    for b in backbones:
        v = values[b]
        if isinstance(v, tuple):  # boundary / internal: means only
            ours = "–" if v[0].mean is None else f"{v[0].mean:.1f} / {v[1].mean:.1f}"
        else:
            ours = v.format()
        paper = PAPER_TABLE6.get(key, {}).get(b) if key else None
        cells.append(f" {ours} | {'' if paper is None else paper} |")
    return "".join(cells)


def _comparison_lines(result: dict[str, Any]) -> list[str]:
    # with CRF: each comparison again between the two arms' CRF scores (its own interval; Table 6 has no CRF)
    comps = (result.get("comparisons") or []) + ((result.get("comparisons_crf") or []) if result.get("crf") else [])
    if not comps:
        return []
    st = result.get("stats") or {}
    conf = round(100 * st.get("confidence", 0.95))
    lines = ["", f"## Differences in mIoU points (B - A), {conf} % interval and verdict", "",
             "| comparison | ours | seeds | images | paper |", "|---|---|---:|---:|---:|"]
    for c in comps:
        if c.get("crf"):
            c = {**c, "label": f"{c['label']}, both + CRF", "paper": None}
        paper = "" if c.get("paper") is None else f"{c['paper']:+.1f}"
        n = "–" if c.get("estimate") is None else str(len(c["seeds"]))
        images = "–" if c.get("estimate") is None else str(c["images"])
        lines.append(f"| {c['label']} | {c['text']} | {n} | {images} | {paper} |")
    lines += ["", f"Interval: hierarchical paired bootstrap ({st.get('replicates', '?')} replicates, generator seed "
              f"{st.get('seed', '?')}): each replicate resamples the seeds both networks finished (paired by seed), "
              "then the validation images (the same images for both), and recomputes the mean over seeds of the "
              "mIoU difference from the summed per-image counts; percentile interval. Significant: the interval "
              "excludes 0."]
    if any(c.get("estimate") is not None and len(c["seeds"]) == 1 for c in comps):
        lines.append("With one seed the interval covers the choice of validation images only, not seed-to-seed "
                     "variation.")
    unpaired = sorted({s for c in comps for s in c.get("unpaired_seeds", [])})
    if unpaired:
        lines.append(f"Seeds finished by one arm only are left out of that comparison: {unpaired}.")
    return lines


def _notes(result: dict[str, Any]) -> list[str]:
    """What the figures are, seeds, chance, what is missing or stale."""
    ev = (result.get("evaluation") or {}).get("segmentation") or {}
    scales = ev.get("scales", [1.0])
    inference = ("multi-scale " + "/".join(f"{s:g}" for s in scales) if scales != [1.0] else "single scale") + \
        (", flipped" if ev.get("flip") else "")
    seeds, pre_seeds = result.get("seeds", [0]), result.get("pretrain_seeds", result.get("seeds", [0]))
    lines = ["", "Cells: mean ± standard deviation over seeds (n = seeds finished). "
             f"Seeds: fine-tunes {seeds}, pretraining {pre_seeds}"
             + ("" if pre_seeds == seeds else " (fine-tune seed s starts from pretraining seed s where there is "
                "one, else from the first: pretraining's seed-to-seed variation is then not in the spread)") + ".",
             "ImageNet top-5 / top-1 error: final.pth of each pretraining on one 224 x 224 centre crop of the image "
             "resized to 256 (224/256 of the short side), no flip: the paper's protocol "
             "(eval_imagenet_224_crop0.875.json, for the weights it names by hash). The ffcv-protocol rows are the "
             "last per-epoch validation of pretraining (metrics.jsonl): the same crop resized to val_res, logits "
             "averaged with the mirrored image.",
             f"mIoU: final.pth of each fine-tune on the validation split ({inference}), IoU per class from the "
             "confusion counts over all images, averaged over the classes present. Paper: Peng et al., Table 6 "
             "(ImageNet; PASCAL VOC 2012 val)."]
    if result.get("crf"):
        lines.append(_crf_note(result))
    if result.get("chance_miou") is not None:
        lines.append(f"Chance (background everywhere) on the same split: mIoU {result['chance_miou']:.1f}%.")
    if result.get("stale"):
        lines.append("Left out, trained from backbone weights that have changed since (rerun without --collect "
                     "to move them aside and retrain): " + ", ".join(s["run"] for s in result["stale"]) + ".")
    if result["missing"]:
        lines.append("Not finished yet (left out of the means; – where no seed has finished): "
                     + ", ".join(result["missing"]) + ".")
    lines.append("Every figure's source file, weights hash, settings and run provenance are in table6.json.")
    return lines


def _crf_note(result: dict[str, Any]) -> str:
    """What the "+ CRF" rows are: the inference above, then the dense CRF with these parameters; its time."""
    p = ((result.get("evaluation") or {}).get("segmentation_crf") or {}).get("crf") or {}
    params = ", ".join(f"{k} {v:g}" for k, v in p.items()) if p else "DeepLab's defaults"
    times = [rec["crf_seconds_per_image"] for cell in (result.get("segmentation_crf") or {}).values()
             for rec in (cell or {}).get("runs", {}).values() if rec.get("crf_seconds_per_image") is not None]
    time = f"; {1000 * sum(times) / len(times):.0f} ms of CRF per image on average" if times else ""
    return ("+ CRF rows: the same final.pth and inference, the class probabilities then refined by the fully "
            f"connected CRF (segmentation.evaluate --crf; {params}){time}. Their scores, spreads and comparisons "
            "use CRF scores only (eval_final_<settings>_crf.json); Table 6 of the paper has no CRF.")


def table_markdown(result: dict[str, Any]) -> str:
    """The table (``# Table 6`` heading, one ours / paper column pair per backbone), the comparisons, notes."""
    bs = result["backbones"]
    header = "| |" + "".join(f" {display(b)} | paper |" for b in bs)
    lines = ["# Table 6: ResNet50 vs ResNet50-GCN", "", header, "|---|" + "---:|---:|" * len(bs)]
    lines += [f"| {label} |" + _row_cells(key, values, bs) for label, key, values in table_rows(result)]
    return "\n".join(lines + _comparison_lines(result) + _notes(result)) + "\n"
