"""Table 6 as markdown: ours as mean ± standard deviation over seeds (n), the paper's figures
(``PAPER_TABLE6``) beside them only when the runs were scored in the paper's setting, the comparisons with their
intervals, Holm-corrected verdicts and detectable differences, and notes that say what each row measures.

``table_rows`` orders the rows as the paper does, then our extra ones (with ``evaluate.crf``: each head's mIoU
after the dense CRF, "+ CRF"; top-1 error, ffcv-imagenet's validation protocol, boundary / internal
accuracy); ``table_markdown`` renders the JSON record of ``collect.gather``, a dash where no seed of a run has
finished. Scores with CRF have rows and comparisons of their own, never mixed with the plain ones. With fewer
than 10 pretraining classes the classification rows are top-1 (top-5 would hold most of the classes).
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


def _setting(result: dict[str, Any]) -> dict[str, Any]:
    """The record's setting (``collect.setting``); a record without one is not taken as the paper's."""
    return {"paper": False, "top_k": 5, **(result.get("setting") or {})}


def table_rows(result: dict[str, Any]) -> list[Row]:
    """(row label, paper key or '', {backbone: Summary}) in Table 6's order, then our extra rows."""
    bs, heads = result["backbones"], result["heads"]
    pre, seg = result["pretrain"], result["segmentation"]
    ffcv = _ffcv_label(result)
    setting = _setting(result)
    k, data = setting["top_k"], "ImageNet" if setting["paper"] else "Pretraining data"
    rows: list[Row] = [(f"{data} cls top-{k} error (%)", "imagenet_top5_error" if k == 5 else "",
                        {b: cell_summary(pre.get(b), f"top{k}_error") for b in bs})]
    crf = result.get("segmentation_crf") if result.get("crf") else None
    for h in heads:
        key = f"miou_{h}" if f"miou_{h}" in PAPER_TABLE6 else ""
        rows.append((f"Seg. score, {display(h)} (mIoU %)", key,
                     {b: cell_summary(seg.get(f"{b}+{h}"), "miou") for b in bs}))
    if crf is not None:  # Table 6 has no CRF: no paper figure beside these
        for h in heads:
            rows.append((f"Seg. score, {display(h)} + CRF (mIoU %)", "",
                         {b: cell_summary(crf.get(f"{b}+{h}"), "miou") for b in bs}))
    if k == 5:  # with top-1 as the first row it is not repeated, and ffcv's top-5 is left out with it
        rows.append((f"{data} cls top-1 error (%)", "", {b: cell_summary(pre.get(b), "top1_error") for b in bs}))
        rows.append((f"{data} top-5 error (%), {ffcv}", "",
                     {b: cell_summary(pre.get(b), "ffcv_top5_error") for b in bs}))
    rows.append((f"{data} top-1 error (%), {ffcv}", "", {b: cell_summary(pre.get(b), "ffcv_top1_error") for b in bs}))
    for cells, suffix in ((seg, ""), *(((crf, " + CRF"),) if crf is not None else ())):
        for h in heads:
            rows.append((f"{display(h)}{suffix}: boundary / internal acc. (%)", "",
                         {b: (cell_summary(cells.get(f"{b}+{h}"), "boundary_acc"),
                              cell_summary(cells.get(f"{b}+{h}"), "internal_acc")) for b in bs}))
    return rows


def _row_cells(key: str, values: dict[str, Any], backbones: list[str], paper: bool) -> str:
    """`` ours |`` for each backbone, and `` paper |`` after it in the paper's setting (empty where Table 6 has
    no figure)."""
    cells = []
    for b in backbones:
        v = values[b]
        if isinstance(v, tuple):  # boundary / internal: means only
            ours = "–" if v[0].mean is None else f"{v[0].mean:.1f} / {v[1].mean:.1f}"
        else:
            ours = v.format()
        figure = PAPER_TABLE6.get(key, {}).get(b) if key else None
        cells.append(f" {ours} |" + (f" {'' if figure is None else figure} |" if paper else ""))
    return "".join(cells)


def _label(c: dict[str, Any]) -> str:
    return f"{c['label']}, both + CRF" if c.get("crf") else c["label"]


def _seeds_cell(c: dict[str, Any]) -> str:
    if c.get("estimate") is None:
        return "–"
    n = str(len(c["seeds"]))
    return f"{n} ({c['units']} pretrainings)" if c.get("unit") == "pretraining" else n


def _detectable_line(c: dict[str, Any], paper: bool) -> str:
    unit = "pretraining runs" if c.get("unit") == "pretraining" else "seeds"
    if c.get("detectable") is None:
        return (f"- {_label(c)}: detectable with these seeds: not known with one {unit[:-1]} (no spread from "
                f"{unit[:-1]} to {unit[:-1]} to measure yet)")
    line = f"- {_label(c)}: detectable with these seeds: >= {c['detectable']:.1f} points"
    if paper and c.get("paper") and not c.get("crf"):
        need = c.get("seeds_for_paper")
        line += (f"; the paper's {c['paper']:+.1f} would need {need} {unit}" if need is not None else
                 f"; the paper's {c['paper']:+.1f} is below what any number of {unit} can detect on these images")
    return line


def _comparison_lines(result: dict[str, Any]) -> list[str]:
    # with CRF: each comparison again between the two arms' CRF scores (its own interval; Table 6 has no CRF)
    comps = (result.get("comparisons") or []) + ((result.get("comparisons_crf") or []) if result.get("crf") else [])
    if not comps:
        return []
    st = result.get("stats") or {}
    family = st.get("family") or {}
    conf = st.get("confidence", 0.95)
    paper = _setting(result)["paper"]
    head = "| comparison | difference [interval], verdict | p, Holm | seeds | images |"
    lines = ["", f"## Differences in mIoU points (B - A), {round(100 * conf)} % interval and verdict", "",
             head + (" paper |" if paper else ""), "|---|---|---:|---:|---:|" + ("---:|" if paper else "")]
    for c in comps:
        tested = c.get("estimate") is not None
        p = f"{c['p_holm']:.2g}" if tested and c.get("p_holm") is not None else "–"
        images = str(c["images"]) if tested else "–"
        figure = "" if c.get("paper") is None or c.get("crf") else f"{c['paper']:+.1f}"
        lines.append(f"| {_label(c)} | {c['text']} | {p} | {_seeds_cell(c)} | {images} |"
                     + (f" {figure} |" if paper else ""))
    tested = [c for c in comps if c.get("estimate") is not None]
    if not tested:
        return lines
    m = family.get("size", len(tested))
    crf_split = (f" ({sum(not c.get('crf') for c in tested)} without CRF, {sum(bool(c.get('crf')) for c in tested)}"
                 " with)") if result.get("crf") else ""
    lines += ["", "Interval: a paired t interval over the seeds with the validation images' sampling variance added, "
              "each at its own t quantile (Banerjee 1960): estimate ± sqrt(t(G - 1)² s² / G + t(images - 1)² V), s "
              "the standard deviation of the G paired seed differences (seed s of both networks), V the variance of "
              "the image-level error all seeds share, from a paired bootstrap of the validation images (the same "
              f"images for both networks and every seed; {st.get('replicates', '?')} replicates, generator seed "
              f"{st.get('seed', '?')}), mIoU from the summed per-image counts. It holds the seed-to-seed variation of "
              "the runs and the choice of validation images. Verdict: Holm's correction over the "
              f"{m} comparison{'s' if m != 1 else ''} of this table{crf_split}, family-wise level "
              f"{100 * (1 - conf):g} %: significant when the Holm-adjusted p is below {1 - conf:g} (an interval that "
              "excludes 0 with a larger adjusted p is not significant).",
              "", "Detectable with these seeds: the smallest true difference these seeds would call significant with "
              f"{round(100 * family.get('power', 0.8))} % probability at the family's strictest level (alpha / {m} = "
              f"{family.get('plan_alpha', (1 - conf) / m):.3g}), from the spread observed so far "
              "(`python -m experiments.compare ... --plan-seeds DELTA`: the seeds a difference DELTA needs):", ""]
    lines += [_detectable_line(c, paper) for c in tested]
    lines.append("")
    scopes = {c.get("scope") for c in tested}
    if "this seed only" in scopes:
        lines.append("this seed only: with one seed the interval holds the validation images' sampling error only; "
                     "the verdict speaks for these runs and cannot speak for another seed.")
    if "this pretraining only" in scopes:
        lines.append(f"this pretraining only: every fine-tune of these backbone comparisons started from one "
                     f"pretraining run per backbone (pretraining seeds {result.get('pretrain_seeds')}), so the "
                     "interval holds fine-tuning's seed-to-seed variation and the images, not pretraining's: the "
                     "verdict compares those two weight files, not the two architectures (pretrain once per seed, "
                     "pretrain.seeds = seeds, to compare the architectures). Head comparisons share their backbone "
                     "and are not affected.")
    if any(c.get("unit") == "pretraining" for c in tested):
        lines.append("Backbone comparisons over pretraining runs: the fine-tunes of one pretraining are averaged "
                     "first; the seed level of the interval counts pretraining runs.")
    unpaired = sorted({s for c in comps for s in c.get("unpaired_seeds", [])})
    if unpaired:
        lines.append(f"Seeds finished by one arm only are left out of that comparison: {unpaired}.")
    return lines


def _setting_lines(result: dict[str, Any]) -> list[str]:
    """Why the paper's figures are or are not beside ours, and what the classification rows measure here."""
    setting = _setting(result)
    lines = []
    if setting["paper"]:
        epochs = "/".join(str(e) for e in setting.get("epochs", []) if e is not None) or "?"
        lines.append(f"Paper columns: Peng et al., Table 6. The training budgets differ: our pretraining ran {epochs} "
                     "epochs, the paper's (its schedule is not stated) far longer; ffcv-imagenet reports about 9 % "
                     "top-5 error (90.8 % top-5 accuracy) for ResNet-50 after 16 epochs, under its own protocol "
                     "(rn50_16_epochs.yaml; 256 px, flip).")
    else:
        imgs, classes, val = ("/".join(str(x) for x in setting.get(k, []) if x is not None)
                              for k in ("pretrain_images", "pretrain_classes", "val_images"))
        pre = f"pretraining scored on {imgs} images of {classes or '?'} classes" if imgs else \
            "no pretraining scored yet"
        seg = f"segmentation on {val} images ({setting.get('dataset')} {setting.get('split')})" if val else \
            "no fine-tune scored yet"
        lines.append(f"Not the paper's setting ({pre}; {seg}; Table 6 is ImageNet val, 50,000 images of 1,000 "
                     "classes, and PASCAL VOC 2012 val, 1,449 images): the paper's figures are therefore not shown "
                     "beside these.")
    if setting["top_k"] == 1:
        classes = "/".join(str(x) for x in setting.get("pretrain_classes", [])) or "?"
        lines.append(f"Top-1, not the paper's top-5: the pretraining data has {classes} classes, and with fewer than "
                     "10 the five best guesses hold most of them, so top-5 error is about 0 for any network that has "
                     "learned anything.")
    ratio = _protocol_scale(result)
    if ratio is not None:
        lines.append(f"The first row is Table 6's protocol, 224 px, on networks validated at {224 / ratio:.0f} px "
                     f"during training: it shows them the images {ratio:.1f}x larger than they were trained to see, so "
                     "it measures how they cope with that change of scale, not their accuracy at their own scale; "
                     "the ffcv-protocol row is at the training scale.")
    return lines


def _protocol_scale(result: dict[str, Any]) -> float | None:
    """Table 6's evaluation resolution over the one the networks were validated at in training, when they differ
    by more than a quarter (224 px on 64 px networks: 3.5); None otherwise or when not known."""
    for cell in result["pretrain"].values():
        for rec in (cell or {}).get("runs", {}).values():
            val_res = (rec.get("ffcv") or {}).get("val_res")
            resolution = (rec.get("protocol") or {}).get("resolution", 224)
            if val_res:
                ratio = resolution / val_res
                return ratio if ratio > 1.25 or ratio < 0.8 else None
    return None


def _notes(result: dict[str, Any]) -> list[str]:
    """What the figures are, seeds, chance, what is missing or stale."""
    ev = (result.get("evaluation") or {}).get("segmentation") or {}
    scales = ev.get("scales", [1.0])
    inference = ("multi-scale " + "/".join(f"{s:g}" for s in scales) if scales != [1.0] else "single scale") + \
        (", flipped" if ev.get("flip") else "")
    seeds, pre_seeds = result.get("seeds", [0]), result.get("pretrain_seeds", result.get("seeds", [0]))
    k = _setting(result)["top_k"]
    errors = "top-5 / top-1 error" if k == 5 else "top-1 error"
    lines = ["", "Cells: mean ± standard deviation over seeds (n = seeds finished). "
             f"Seeds: fine-tunes {seeds}, pretraining {pre_seeds}"
             + ("" if pre_seeds == seeds else " (fine-tune seed s starts from pretraining seed s where there is "
                "one, else from the first: pretraining's seed-to-seed variation is then not in the spread)") + ".",
             f"Classification {errors}: final.pth of each pretraining on one 224 x 224 centre crop of the image "
             "resized to 256 (224/256 of the short side), no flip: the paper's protocol "
             "(eval_imagenet_224_crop0.875.json, for the weights it names by hash). The ffcv-protocol rows are the "
             "last per-epoch validation of pretraining (metrics.jsonl): the same crop resized to val_res, logits "
             "averaged with the mirrored image.",
             f"mIoU: final.pth of each fine-tune on the validation split ({inference}), IoU per class from the "
             "confusion counts over all images, averaged over the classes present.", *_setting_lines(result)]
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
    """The table (``# Table 6`` heading, our column per backbone, the paper's beside it in the paper's setting),
    the comparisons, notes."""
    bs = result["backbones"]
    paper = _setting(result)["paper"]
    header = "| |" + "".join(f" {display(b)} |" + (" paper |" if paper else "") for b in bs)
    rule = "|---|" + ("---:|---:|" if paper else "---:|") * len(bs)
    lines = ["# Table 6: ResNet50 vs ResNet50-GCN", "", header, rule]
    lines += [f"| {label} |" + _row_cells(key, values, bs, paper) for label, key, values in table_rows(result)]
    return "\n".join(lines + _comparison_lines(result) + _notes(result)) + "\n"
