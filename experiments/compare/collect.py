"""Collect: score what has finished, gather every figure with its provenance, aggregate the seeds, compare,
and write the table and the figures.

Reuse is decided by content, never by file times. A fine-tune's score file
(``segmentation.evaluate.score_path``: ``eval_final_<settings>.json`` and its ``.per_image.npz``) is
reused when it records the SHA-256 of the current ``final.pth`` and the settings asked for, else the
fine-tune is evaluated again. With ``evaluate.crf`` each fine-tune has a second score, with the dense CRF
(``eval_final_<settings>_crf.json``), gathered into cells and comparisons of its own
(``segmentation_crf``, ``comparisons_crf``). A pretraining's ImageNet score under Table 6's protocol
(``backbone.evaluate``: ``eval_imagenet_224_crop0.875.json``) is reused when it names the current
``final.pth`` by hash, the protocol and the validation data, else ``backbone.evaluate`` runs again.

``gather`` reads one record per run and seed (each naming the weights by hash, the evaluation settings,
and from ``run.json`` the recipe hash, world size, global batch, seed and code version), aggregates the
seeds of each cell (mean ± standard deviation, n) and makes every comparison of the paper with a
confidence interval (``stats.paired_difference``), a verdict corrected for the table's family of comparisons
(Holm) and the smallest difference its seeds could detect; ``collect`` writes ``table6.md``, ``table6.json``,
``table6.png`` and the figures. A cell's mIoU and a comparison's difference come from the same per-image
counts: a score JSON whose mIoU disagrees with its ``.per_image.npz`` is refused (``check_score``).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.logs import read_metrics
from engine.provenance import file_sha256, read_run_record

from . import stats
from .config import CompareConfig, EvaluateConfig
from .plan import Run, StageFailed
from .table import PAPER_TABLE6, display, table_markdown

__all__ = ["eval_settings", "crf_variants", "eval_json", "score_problem", "check_score", "evaluate_runs",
           "imagenet_problem", "evaluate_imagenet", "provenance", "pretrain_record", "finetune_record", "aggregate",
           "comparisons", "judge", "compared", "setting", "seed_plan", "chance_miou", "gather", "collect",
           "PRETRAIN_KEYS", "FINETUNE_KEYS", "PAPER_SETTING"]

PRETRAIN_KEYS = ("top5_error", "top1_error", "ffcv_top5_error", "ffcv_top1_error")
FINETUNE_KEYS = ("miou", "pixel_acc", "boundary_acc", "internal_acc")
RUN_FIELDS = ("recipe_hash", "world_size", "global_batch", "seed", "code_version")
# What Table 6 was measured on: ImageNet-1k val (50,000 images, 1,000 classes) and PASCAL VOC 2012 val (1,449
# images). The paper's figures are shown beside ours only when every finished run was scored on exactly these.
PAPER_SETTING = {"pretrain_images": 50_000, "pretrain_classes": 1000, "dataset": "voc", "split": "val",
                 "val_images": 1449}
SCORE_TOLERANCE = 1e-6  # |mIoU of the JSON - mIoU of its per-image counts| (fractions) that still counts as equal


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


# ---------------------------------------------------------------------------------------------
# Segmentation scores
# ---------------------------------------------------------------------------------------------
def eval_settings(run: Run, ev: EvaluateConfig, crf: bool = False) -> Any:
    """``segmentation.evaluate.EvalSettings`` of a fine-tune's score: the comparison's evaluation, and the
    run's own sliding window (its ``eval.window`` / ``eval.overlap``), all stated explicitly; with ``crf``,
    followed by the dense CRF with DeepLab's defaults (``segmentation.crf.CRFParams()``)."""
    from segmentation.crf import CRFParams
    from segmentation.evaluate import MS_SCALES, EvalSettings

    cfg = run.stage_config()
    return EvalSettings(cfg.data.val_split, MS_SCALES if ev.ms else (1.0,), ev.flip, cfg.eval.window,
                        cfg.eval.overlap, ev.max_images, ev.boundary_width, CRFParams() if crf else None)


def crf_variants(ev: EvaluateConfig) -> tuple[bool, ...]:
    """The scores the comparison asks of each fine-tune: without CRF, and with it when ``evaluate.crf``."""
    return (False, True) if ev.crf else (False,)


def eval_json(run: Run, ev: EvaluateConfig, crf: bool = False) -> Path:
    """The score file of a fine-tune's ``final.pth`` under the comparison's evaluation settings (a CRF score
    has its own file: ``..._crf.json``)."""
    from segmentation.evaluate import score_path

    return score_path(run.final, eval_settings(run, ev, crf))


def score_problem(run: Run, ev: EvaluateConfig, crf: bool = False) -> str | None:
    """Why the score file cannot be used for ``run.final`` (missing, other weights, other settings, with or
    without CRF), or None."""
    path = eval_json(run, ev, crf)
    if not path.exists() or not path.with_suffix(".per_image.npz").exists():
        return "no score yet" + (" with CRF" if crf else "")
    record = json.loads(path.read_text())
    if record.get("weights_sha256") != file_sha256(run.final):
        return f"{path.name} scored other weights"
    wanted = eval_settings(run, ev, crf).to_json()
    differ = [k for k, v in wanted.items() if record.get(k) != v]
    if differ:
        return f"{path.name} was computed with other settings ({', '.join(differ)})"
    return None


def check_score(path: Path, record: dict[str, Any]) -> None:
    """StageFailed unless the score JSON's mIoU and image count are those of its per-image counts: the table's
    cell is read from the JSON and the comparison's difference from the counts, so they must be one data."""
    npz = path.with_suffix(".per_image.npz")
    with np.load(npz) as z:
        counts = z["tp_fp_fn"]
    from_counts = float(stats.miou_from_counts(counts.sum(0)))
    if record.get("images") != counts.shape[0] or abs(record["miou"] - from_counts) > SCORE_TOLERANCE:
        raise StageFailed(f"{path} says mIoU {100 * record['miou']:.2f} % over {record.get('images')} images, but "
                          f"its per-image counts ({npz.name}) give {100 * from_counts:.2f} % over {counts.shape[0]}: "
                          "one of the two was edited or damaged; delete both and run again with --collect to "
                          "evaluate that final.pth anew")


def _evaluate(run: Run, ev: EvaluateConfig, out: Path, crf: bool = False) -> None:
    from segmentation.evaluate import main as evaluate_main

    s = eval_settings(run, ev, crf)
    # the CRF's predictions in their own folder: Figures 3 and 6 show the network's
    argv = ["--checkpoint", str(run.final), "--out", str(out),
            "--save-png", str(run.dir / ("predictions_crf" if crf else "predictions")),
            "--boundary-width", str(s.boundary_width), "--max-images", str(s.max_images), "--split", s.split,
            "--window", str(s.window), "--overlap", repr(s.overlap),
            *(["--ms"] if ev.ms else []), *(["--flip"] if ev.flip else []), *(s.crf.cli().split() if crf else [])]
    # in this process (no second start-up of torch and timm per run); the per-class table goes to a log
    report = out.with_suffix(".txt")
    with report.open("w") as f, contextlib.redirect_stdout(f):
        rc = evaluate_main(argv)
    if rc != 0:
        raise StageFailed(f"evaluating {run.final}{' with CRF' if crf else ''} failed (exit {rc}); the error is "
                          f"above, the report in {report}")


def evaluate_runs(runs: Sequence[Run], ev: EvaluateConfig, skip: Collection[Path] = ()) -> dict[str, Path]:
    """Evaluate every finished fine-tune (except the directories in ``skip``) whose score is missing or
    belongs to other weights or settings, with and without CRF as ``ev.crf`` asks; {run dir: score JSON}
    (the CRF's under ``<run dir>+crf``)."""
    done = {}
    for run in runs:
        if run.kind != "finetune" or not run.finished or run.dir in skip:
            continue
        for crf in crf_variants(ev):
            out = eval_json(run, ev, crf)
            problem = score_problem(run, ev, crf)
            if problem is not None:
                print(f"evaluate {run.name}{' with CRF' if crf else ''} ({problem}) -> {out}", flush=True)
                _evaluate(run, ev, out, crf)
            done[str(run.dir) + ("+crf" if crf else "")] = out
    return done


# ---------------------------------------------------------------------------------------------
# ImageNet scores
# ---------------------------------------------------------------------------------------------
def imagenet_problem(run: Run) -> str | None:
    """Why the pretraining's Table 6 protocol score cannot be used for ``run.final``, or None."""
    from backbone.evaluate import PAPER, record_path
    from backbone.write_beton import meta_path

    path = record_path(run.final, PAPER)
    if not path.exists():
        return "no score under the paper's protocol yet"
    record = json.loads(path.read_text())
    if (record.get("weights") or {}).get("sha256") != file_sha256(run.final):
        return f"{path.name} scored other weights"
    p = record.get("protocol") or {}
    if (p.get("resolution"), p.get("crop_ratio"), p.get("flip")) != (PAPER.resolution, PAPER.crop_ratio, PAPER.flip):
        return f"{path.name} used another protocol"
    meta = meta_path(run.stage_config().data.val)
    if meta.exists() and (record.get("data") or {}).get("meta_sha256") != file_sha256(meta):
        return f"{path.name} was computed on other validation data"
    return None


def evaluate_imagenet(run: Run) -> Path:
    """``python -m backbone.evaluate`` on the run's final weights and validation data, Table 6's protocol.

    A subprocess: ffcv's loader threads must not live in this process, which forks data loader workers
    for the segmentation evaluation afterwards."""
    from backbone.evaluate import PAPER, record_path

    cfg = run.stage_config()
    cmd = [sys.executable, "-m", "backbone.evaluate", "--weights", str(run.final), "--data", str(cfg.data.val),
           "--workers", str(max(1, min(cfg.data.num_workers, os.cpu_count() or 1))),
           "--device", "cpu" if cfg.train.device == "cpu" else "auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"ImageNet evaluation of {run.final} failed (exit {proc.returncode}):\n"
                          f"{proc.stderr[-2000:]}")
    print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"scored {run.final}", flush=True)
    return record_path(run.final, PAPER)


# ---------------------------------------------------------------------------------------------
# One record per run and seed
# ---------------------------------------------------------------------------------------------
def provenance(run: Run) -> dict[str, Any]:
    """What the run trained with, from its ``run.json``: recipe hash, world size, global batch, seed, code
    version, and for a fine-tune the backbone weights it started from (by content)."""
    record = read_run_record(run.dir)
    out: dict[str, Any] = {k: record.get(k) for k in RUN_FIELDS}
    if run.kind == "finetune":
        out["pretrained_sha256"] = (record.get("pretrained") or {}).get("sha256")
    out["run_record"] = str(run.dir / "run.json")
    return out


def _ffcv_validation(run: Run) -> dict[str, Any] | None:
    """The last per-epoch validation of pretraining (ffcv-imagenet's protocol), with its resolution and flip."""
    metrics = run.dir / "metrics.jsonl"
    vals = [r for r in read_metrics(metrics) if r.get("kind") == "val"] if metrics.exists() else []
    if not vals:
        return None
    v, cfg = vals[-1], run.stage_config()
    return {"top5_error": _pct(v["top5_error"]), "top1_error": _pct(1 - v["top1"]), "epoch": v.get("epoch"),
            "val_res": cfg.resolution.val_res, "flip": cfg.train.flip_tta,
            "source": f"{metrics} (validation after epoch {v.get('epoch')})"}


def pretrain_record(run: Run, score: bool = True) -> dict[str, Any] | None:
    """A finished pretraining's ImageNet errors (%): Table 6's protocol (scored now when missing or stale,
    with ``score``) and ffcv's last validation, each with its source and the run's provenance, the classes of its
    validation data and its epochs; or None."""
    from backbone.evaluate import PAPER, record_path
    from backbone.write_beton import meta_path

    if not run.finished:
        return None
    if imagenet_problem(run) is not None:
        if not score:
            return None
        evaluate_imagenet(run)
    path = record_path(run.final, PAPER)
    s = json.loads(path.read_text())
    ffcv = _ffcv_validation(run)
    cfg = run.stage_config()
    meta = meta_path(cfg.data.val) if cfg.data.val else None
    classes = json.loads(meta.read_text()).get("num_classes") if meta and meta.exists() else None
    return {"seed": run.seed, "top5_error": _pct(s["top5_error"]), "top1_error": _pct(s["top1_error"]),
            "images": s["images"], "classes": classes, "epochs": cfg.train.epochs, "protocol": s["protocol"],
            "source": str(path),
            "weights_sha256": s["weights"]["sha256"], "data_meta_sha256": (s.get("data") or {}).get("meta_sha256"),
            "eval_code_version": s.get("code_version"),
            "ffcv_top5_error": ffcv and ffcv["top5_error"], "ffcv_top1_error": ffcv and ffcv["top1_error"],
            "ffcv": ffcv, "run": provenance(run)}


def finetune_record(run: Run, ev: EvaluateConfig, crf: bool = False) -> dict[str, Any] | None:
    """The scores (%) of a finished fine-tune whose score file (with CRF or without) is current, with the
    files, the weights' hash, the settings, ``crf`` (the CRF's parameters, or None) and the run's
    provenance; or None. With ``crf``, also the CRF's time per image. StageFailed when the JSON's mIoU is not
    that of its per-image counts (``check_score``)."""
    if not run.finished or score_problem(run, ev, crf) is not None:
        return None
    out = eval_json(run, ev, crf)
    s = json.loads(out.read_text())
    check_score(out, s)
    settings = eval_settings(run, ev, crf).to_json()
    record = {"seed": run.seed, "miou": _pct(s["miou"]), "pixel_acc": _pct(s["pixel_acc"]),
              "boundary_acc": _pct(s["boundary_acc"]), "internal_acc": _pct(s["internal_acc"]),
              "images": s["images"], "crf": settings["crf"], "source": str(out),
              "per_image": str(out.with_suffix(".per_image.npz")), "weights_sha256": s["weights_sha256"],
              "settings": settings, "eval_code_version": s.get("code_version"), "run": provenance(run)}
    if crf:
        record["crf_seconds_per_image"] = s.get("crf_seconds_per_image")
    return record


def aggregate(records: dict[int, dict[str, Any] | None], keys: Sequence[str]) -> dict[str, Any] | None:
    """One cell of the table from its runs' records by seed: the mean of each key (the table's figure),
    ``std`` (sample standard deviation, None for one seed), ``n``, the seeds found and missing, and the
    per-seed records under ``runs``. None when no seed has finished."""
    done = {s: r for s, r in sorted(records.items()) if r is not None}
    if not done:
        return None
    cell: dict[str, Any] = {}
    std: dict[str, float | None] = {}
    for k in keys:
        summary = stats.summarize([r.get(k) for r in done.values()])
        cell[k] = None if summary.mean is None else round(summary.mean, 2)
        std[k] = None if summary.std is None else round(summary.std, 2)
    return {**cell, "std": std, "n": len(done), "seeds": list(done),
            "missing_seeds": [s for s in records if s not in done], "runs": {str(s): r for s, r in done.items()}}


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------
def comparison_pairs(backbones: Sequence[str], heads: Sequence[str]) -> list[dict[str, str]]:
    """The paper's comparisons: every other backbone against the first under each head (ResNet50-GCN vs
    ResNet50), and every other head against the first under each backbone (GCN + BR vs Baseline).
    The difference is always B - A."""
    pairs = []
    for h in heads:
        for b in backbones[1:]:
            pairs.append({"kind": "backbone", "a": f"{backbones[0]}+{h}", "b": f"{b}+{h}",
                          "label": f"{display(b)} vs {display(backbones[0])}, {display(h)} head",
                          "better_a": display(backbones[0]), "better_b": display(b)})
    for b in backbones:
        for h in heads[1:]:
            pairs.append({"kind": "head", "a": f"{b}+{heads[0]}", "b": f"{b}+{h}",
                          "label": f"{display(h)} vs {display(heads[0])}, {display(b)} backbone",
                          "better_a": display(heads[0]), "better_b": display(h)})
    return pairs


def _paper_difference(a: str, b: str) -> float | None:
    (ba, ha), (bb, hb) = a.split("+"), b.split("+")
    pa = PAPER_TABLE6.get(f"miou_{ha}", {}).get(ba)
    pb = PAPER_TABLE6.get(f"miou_{hb}", {}).get(bb)
    return None if pa is None or pb is None else round(pb - pa, 1)


def load_counts(cell: dict[str, Any] | None) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    """{seed: per-image tp/fp/fn counts} of a cell's runs, and the image names (the same for every seed)."""
    counts: dict[int, np.ndarray] = {}
    names = None
    for s, rec in (cell or {}).get("runs", {}).items():
        with np.load(rec["per_image"]) as z:
            counts[int(s)] = z["tp_fp_fn"]
            if names is not None and not np.array_equal(names, z["names"]):
                raise StageFailed(f"{rec['per_image']} scored other images than the cell's other seeds")
            names = z["names"]
    return counts, names


PROCEDURE = ("paired t interval over seeds (or over pretraining runs, for a backbone comparison that has several) "
             "with the image-level variance added, each at its own t quantile (Banerjee 1960); image level from a "
             "paired bootstrap of the validation images (the same for both arms and every seed), mIoU from summed "
             "per-image counts; verdicts Holm-corrected over the table's comparisons")
SCOPE_ONE_SEED = "this seed only"  # one paired seed: image-level uncertainty only
SCOPE_ONE_PRETRAINING = "this pretraining only"  # backbone comparison, every seed from one pretraining per backbone


def comparisons(segmentation: dict[str, dict[str, Any] | None], backbones: Sequence[str], heads: Sequence[str],
                cfg_stats: Any, pretrain_seed: Callable[[int], int] | None = None) -> list[dict[str, Any]]:
    """Each comparison with its difference and interval (``stats.paired_difference``) over the seeds both arms
    finished; ``None`` figures where an arm has no finished seed. The verdicts come from :func:`judge`, over
    the table's whole family.

    ``pretrain_seed`` maps a fine-tune seed to the pretraining seed it started from. In a backbone
    comparison the pretraining runs are the independent units (fine-tunes from one pretraining share its
    weights); when all its seeds started from one pretraining per backbone, the interval covers fine-tuning's
    seeds and the images only, and the verdict is scoped to that pretraining (``scope``)."""
    out = []
    for pair in comparison_pairs(backbones, heads):
        entry: dict[str, Any] = {**pair, "paper": _paper_difference(pair["a"], pair["b"])}
        (ca, na), (cb, nb) = load_counts(segmentation.get(pair["a"])), load_counts(segmentation.get(pair["b"]))
        if na is not None and nb is not None and not np.array_equal(na, nb):
            raise StageFailed(f"{pair['a']} and {pair['b']} were scored on different validation images: evaluate "
                              "both with the same settings")
        seeds = sorted(set(ca) & set(cb))
        if not seeds:
            entry.update(estimate=None, text="–", verdict="no seed finished in both", scope="")
            out.append(entry)
            continue
        units, scope = None, ""
        if pair["kind"] == "backbone" and pretrain_seed is not None:
            pretrainings = {s: pretrain_seed(s) for s in seeds}
            distinct = len(set(pretrainings.values()))
            if distinct == 1 and len(seeds) > 1:
                scope = SCOPE_ONE_PRETRAINING
            elif 1 < distinct < len(seeds):  # some fine-tunes share a pretraining: those are one unit
                units = pretrainings
        if len(seeds) == 1:
            scope = SCOPE_ONE_SEED
        d = stats.paired_difference(ca, cb, units=units, replicates=cfg_stats.replicates,
                                    confidence=cfg_stats.confidence, seed=cfg_stats.seed)
        entry.update(d.to_json(), unit="pretraining" if units is not None else "seed", scope=scope,
                     unpaired_seeds=sorted(set(ca) ^ set(cb)))
        out.append(entry)
    return out


def _components(c: dict[str, Any]) -> stats.Components:
    return stats.Components((c.get("seed_sd") or 0.0) ** 2, c["units"], c["image_se"] ** 2, c["images"])


def judge(family: Sequence[dict[str, Any]], confidence: float) -> dict[str, Any]:
    """The verdicts of a family of comparisons (every comparison of the table with a difference, with and
    without CRF), in place: Holm-adjusted p-values (``p_holm``), ``significant`` after the correction,
    ``verdict`` and ``text``, and the smallest difference each could detect with its seeds (``detectable``:
    80 % power at the family's strictest level, ``alpha / m``, the one Holm applies to its first step, so the
    power under Holm is at least that) and, where the paper has one, the seeds its difference would need.
    Returns the family's description for table6.json."""
    tested = [c for c in family if c.get("estimate") is not None]
    alpha = 1 - confidence
    m = len(tested)
    level = alpha / max(m, 1)
    for c, p in zip(tested, stats.holm([c["p_value"] for c in tested]), strict=True):
        c["p_holm"] = p
        c["significant"] = p < alpha
        c["verdict"] = stats.verdict(c["significant"], c["estimate"], c["better_b"], c["better_a"], c["scope"])
        c["text"] = stats.format_difference(c["estimate"], c["low"], c["high"], c["verdict"])
        parts = _components(c)
        c["detectable"] = None if c["units"] < 2 else round(stats.detectable_difference(parts, level), 2)
        c["detectable_alpha"], c["power"] = level, stats.POWER
        c["seeds_for_paper"] = None if c["units"] < 2 or not c.get("paper") else \
            stats.seeds_needed(c["paper"], parts, level)
    return {"correction": "holm", "size": m, "alpha": alpha, "plan_alpha": level, "power": stats.POWER,
            "comparisons": [c["label"] + (", both + CRF" if c.get("crf") else "") for c in tested]}


def seed_plan(family: Sequence[dict[str, Any]], deltas: Sequence[float], confidence: float) -> list[dict[str, Any]]:
    """``--plan-seeds``: for each comparison of the family, what its seeds can detect and how many units (seeds,
    or pretraining runs for a backbone comparison that has several) each difference in ``deltas`` needs, at the
    family's strictest level (:func:`judge`) with 80 % power, from the spread observed so far."""
    tested = [c for c in family if c.get("estimate") is not None]
    level = (1 - confidence) / max(len(tested), 1)
    plans = []
    for c in family:
        plan = {"label": c["label"] + (", both + CRF" if c.get("crf") else ""), "units": c.get("units"),
                "unit": c.get("unit"), "seeds": c.get("seeds"), "seed_sd": c.get("seed_sd"),
                "image_se": c.get("image_se"), "detectable": None, "needed": {}, "scope": c.get("scope", ""),
                "alpha": level, "power": stats.POWER}
        if c.get("estimate") is not None and c["units"] >= 2:
            parts = _components(c)
            plan["detectable"] = stats.detectable_difference(parts, level)
            plan["needed"] = {d: stats.seeds_needed(d, parts, level) for d in deltas}
        plans.append(plan)
    return plans


# ---------------------------------------------------------------------------------------------
# The record of the whole table
# ---------------------------------------------------------------------------------------------
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


def _by_network(runs: Sequence[Run], kind: str) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        if r.kind == kind:
            out.setdefault(r.network, []).append(r)
    return out


def compared(cfg: CompareConfig, runs: Sequence[Run], stale: dict[Path, str] | None = None) -> dict[str, Any]:
    """The segmentation cells (with CRF too when ``evaluate.crf``), the comparisons and their verdicts
    (:func:`judge` over the family of all of them): the part of the record ``--plan-seeds`` needs too. Reads the
    current score files only (evaluates nothing); ``stale`` fine-tunes are left out."""
    stale = stale or {}

    def cells(crf: bool) -> dict[str, dict[str, Any] | None]:
        return {key: aggregate({r.seed: None if r.dir in stale else finetune_record(r, cfg.evaluate, crf)
                                for r in rs}, FINETUNE_KEYS)
                for key, rs in _by_network(runs, "finetune").items()}

    def compare(cells: dict[str, dict[str, Any] | None], crf: bool) -> list[dict[str, Any]]:
        return [{**c, "crf": crf} for c in comparisons(cells, cfg.backbones, cfg.heads, cfg.stats, cfg.backbone_seed)]

    seg = cells(False)
    out: dict[str, Any] = {"segmentation": seg, "comparisons": compare(seg, False)}
    # with evaluate.crf, the CRF's scores in keys of their own: a cell, a comparison, an interval never
    # mixes scores with and without CRF; the verdicts are one family with the plain ones
    if cfg.evaluate.crf:
        seg_crf = cells(True)
        out.update(segmentation_crf=seg_crf, comparisons_crf=compare(seg_crf, True))
    out["family"] = judge(out["comparisons"] + out.get("comparisons_crf", []), cfg.stats.confidence)
    return out


def setting(pre: dict[str, dict[str, Any] | None], seg: dict[str, dict[str, Any] | None],
            finetune: Run | None) -> dict[str, Any]:
    """Whether the finished runs were scored in Table 6's setting (``PAPER_SETTING``: ImageNet-1k val, VOC 2012
    val), so that the paper's figures may stand beside ours, and what they were scored on."""
    pre_runs = [r for cell in pre.values() for r in (cell or {}).get("runs", {}).values()]
    seg_runs = [r for cell in seg.values() for r in (cell or {}).get("runs", {}).values()]
    data = finetune.stage_config().data if finetune is not None else None
    found = {"pretrain_images": sorted({r.get("images") for r in pre_runs}, key=str),
             "pretrain_classes": sorted({r.get("classes") for r in pre_runs}, key=str),
             "dataset": data.dataset if data else None, "split": data.val_split if data else None,
             "val_images": sorted({r.get("images") for r in seg_runs}, key=str),
             "epochs": sorted({r.get("epochs") for r in pre_runs}, key=str)}
    paper = bool(pre_runs and seg_runs) and all(
        found[k] == v if k in ("dataset", "split") else found[k] == [v] for k, v in PAPER_SETTING.items())
    classes = found["pretrain_classes"]
    return {"paper": paper, **found,
            # top-5 of fewer than 10 classes holds most of them: top-1 is the row that tells networks apart
            "top_k": 5 if all(c is None or c >= 10 for c in classes) else 1}


def gather(cfg: CompareConfig, runs: Sequence[Run], stale: dict[Path, str] | None = None,
           score: bool = True) -> dict[str, Any]:
    """Every figure of the table with its provenance, aggregated over seeds, the comparisons with their verdicts,
    and the setting they were measured in (JSON-able).

    ``stale`` fine-tunes (backbone retrained since; {dir: reason}) are left out and listed. With ``score``
    a pretraining without a current ImageNet score under the paper's protocol is scored now."""
    stale = stale or {}
    pre = {b: aggregate({r.seed: pretrain_record(r, score) for r in rs}, PRETRAIN_KEYS)
           for b, rs in _by_network(runs, "pretrain").items()}
    finetunes = [r for r in runs if r.kind == "finetune"]

    def settings(crf: bool) -> dict[str, Any] | None:
        return eval_settings(finetunes[0], cfg.evaluate, crf).to_json() if finetunes else None

    seg = compared(cfg, runs, stale)
    family = seg.pop("family")
    return {
        "backbones": list(cfg.backbones), "heads": list(cfg.heads), "seeds": list(cfg.seeds),
        "pretrain_seeds": cfg.pretrain_seeds,
        "pretrain": pre,
        "crf": cfg.evaluate.crf,  # whether segmentation_crf / comparisons_crf are there
        **seg,
        "chance_miou": chance_miou(finetunes[0]) if finetunes else None,
        "paper": PAPER_TABLE6,
        "setting": setting(pre, seg["segmentation"], finetunes[0] if finetunes else None),
        "evaluation": {"segmentation": settings(False),
                       **({"segmentation_crf": settings(True)} if cfg.evaluate.crf else {})},
        "stats": {"confidence": cfg.stats.confidence, "replicates": cfg.stats.replicates, "seed": cfg.stats.seed,
                  "procedure": PROCEDURE, "family": family},
        "missing": [r.name for r in runs if not r.finished or r.dir in stale],
        "stale": [{"run": r.name, "dir": str(r.dir), "reason": stale[r.dir]} for r in runs if r.dir in stale],
        "output": str(Path(cfg.output).resolve()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _first_seed_runs(runs: Sequence[Run], skip: Collection[Path]) -> dict[str, Run]:
    """Per network, its finished fine-tune of the lowest seed: what Figures 3 and 6 show."""
    out: dict[str, Run] = {}
    for r in sorted((r for r in runs if r.kind == "finetune" and r.finished and r.dir not in skip),
                    key=lambda r: r.seed):
        out.setdefault(r.network, r)
    return out


def _draw_figures(cfg: CompareConfig, runs: Sequence[Run], result: dict[str, Any], out: Path,
                  skip: Collection[Path]) -> dict[str, Path | None]:
    """Figure 6 per backbone and Figure 3 (one seed per network), and the headline per-image difference."""
    from experiments import figures

    written: dict[str, Path | None] = {}
    finished = [r for r in runs if r.kind == "finetune" and r.finished and r.dir not in skip]
    for b in cfg.backbones:
        seeds = sorted(r.seed for r in finished if r.backbone == b)
        if seeds:  # the lowest seed with a finished fine-tune of this backbone, its heads in column order
            mine = [r for h in cfg.heads for r in finished if (r.backbone, r.head, r.seed) == (b, h, seeds[0])]
            written[f"figure6_{b}"] = figures.prediction_grid(mine, out / f"figure6_{b}.png",
                                                              cfg.figures.figure6_images)
    first = _first_seed_runs(runs, skip)
    if first and cfg.figures.vrf_images > 0:
        written["figure3"] = figures.receptive_field_figure(list(first.values()), out / "figure3", cfg.figures)
    written.update(draw_stage_curves(runs, out, skip))
    headline = headline_comparison(result, cfg.figures.headline_head)
    if headline is not None and headline.get("estimate") is not None:
        written["per_image_difference"] = figures.per_image_difference(
            result, headline, runs, out / "per_image_difference.png", cfg.figures.difference_images)
    return written


def draw_stage_curves(runs: Sequence[Run], out: Path, skip: Collection[Path] = ()) -> dict[str, Path | None]:
    """``curves_pretrain.png`` and ``curves_finetune.png``: every run of the stage side by side, training loss
    and validation metric against the step, one line per run and seed (from each run's ``metrics.jsonl``,
    finished or not, so a partial output shows how far each run got)."""
    from engine.curves import draw_curves

    written: dict[str, Path | None] = {}
    for kind, title in (("pretrain", "pretraining"), ("finetune", "fine-tuning")):
        mine = {f"{r.network} s{r.seed}": r.dir for r in runs if r.kind == kind and r.dir not in skip}
        if mine:
            written[f"curves_{kind}"] = draw_curves(mine, out / f"curves_{kind}.png", title=title)
    return written


def headline_comparison(result: dict[str, Any], head: str) -> dict[str, Any] | None:
    """The backbone comparison under ``head`` (under the last head when ``head`` was not run); with one
    backbone, the first head comparison; None without any comparison."""
    backbone = [c for c in result["comparisons"] if c["kind"] == "backbone"]
    if not backbone:
        return result["comparisons"][0] if result["comparisons"] else None
    wanted = head if head in result["heads"] else result["heads"][-1]
    return next((c for c in backbone if c["b"].endswith(f"+{wanted}")), backbone[-1])


def collect(cfg: CompareConfig, runs: Sequence[Run], stale: dict[Path, str] | None = None) -> dict[str, Any]:
    """Score what needs it, then write table6.md/.json/.png and the figures; returns the JSON record."""
    import torch

    from experiments import figures

    stale = stale or {}
    threads = torch.get_num_threads()
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    evaluate_runs(runs, cfg.evaluate, skip=stale)
    result = gather(cfg, runs, stale)
    torch.set_num_threads(threads)  # importing ffcv (the pretraining checks) sets it to 1
    written: dict[str, Path | None] = {"table": out / "table6.md", "json": out / "table6.json"}
    (out / "table6.md").write_text(table_markdown(result))
    written["chart"] = figures.table_chart(result, out / "table6.png")
    written.update(_draw_figures(cfg, runs, result, out, stale))
    result["files"] = {k: str(v) for k, v in written.items() if v is not None}
    (out / "table6.json").write_text(json.dumps(result, indent=1))
    return result
