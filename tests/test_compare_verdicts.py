"""The comparison's verdicts from score files on disk (no training): a cell and its differences from the same
data (a hand-edited score is refused), the "this pretraining only" scope, pretraining runs as the units of a
backbone comparison, Holm's correction over the table's family, the detectable-difference line, ``--plan-seeds``,
and a table that shows the paper's figures only in the paper's setting (top-1 with fewer than 10 classes).

Each test plans a small comparison (``configs/*/tiny_cpu.yaml``), marks its runs finished (``final.pth``,
``run.json`` naming the backbone weights) and writes each fine-tune's score files as ``segmentation.evaluate``
does, from synthetic per-image counts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from engine.provenance import file_sha256
from experiments.compare import CompareConfig, PretrainStageConfig, StageConfig, plan, table_markdown
from experiments.compare.collect import compared, eval_json, eval_settings, gather, judge, setting
from experiments.compare.plan import Run, StageFailed
from experiments.compare.stats import Components, detectable_difference, miou_from_counts, seeds_needed

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ["resnet10t", "resnet50_gcn"]
HEADS = ["baseline", "gcn_br"]
IMAGES, CLASSES = 40, 4
GAIN = {"resnet10t+baseline": 0.0, "resnet10t+gcn_br": 0.10, "resnet50_gcn+baseline": 0.01,
        "resnet50_gcn+gcn_br": 0.12}  # mIoU over the first network, by network


def _config(output: Path, seeds=(0, 1, 2), pretrain_seeds=(0,), crf: bool = False) -> CompareConfig:
    cfg = CompareConfig(output=str(output), backbones=list(BACKBONES), heads=list(HEADS), seeds=list(seeds),
                        pretrain=PretrainStageConfig(str(ROOT / "configs/pretrain/tiny_cpu.yaml"),
                                                     seeds=list(pretrain_seeds)),
                        finetune=StageConfig(str(ROOT / "configs/segmentation/tiny_cpu.yaml")))
    cfg.evaluate.boundary_width, cfg.evaluate.crf, cfg.stats.replicates = 2, crf, 300
    return cfg


def _counts(network: str, seed: int, crf: bool) -> np.ndarray:
    """images x classes x 3: recall of each labelled area = base + the network's gain + a seed effect + noise."""
    rng = np.random.default_rng(0)
    area = rng.integers(100, 1000, size=(IMAGES, CLASSES))  # the same images for every run
    base = 0.5 + rng.uniform(-0.1, 0.1, size=(IMAGES, CLASSES))
    rng = np.random.default_rng([seed, sorted(GAIN).index(network), crf])
    recall = np.clip(base + GAIN[network] + 0.05 * crf + rng.normal(0, 0.02) + rng.uniform(-0.1, 0.1, base.shape),
                     0, 1)
    tp = np.rint(recall * area).astype(np.int64)
    return np.stack([tp, np.zeros_like(tp), area - tp], axis=-1)


def write_score(run: Run, cfg: CompareConfig, crf: bool = False) -> Path:
    """The score JSON and .per_image.npz of ``run.final`` as segmentation.evaluate writes them."""
    counts = _counts(run.network, run.seed, crf)
    path = eval_json(run, cfg.evaluate, crf)
    record = {"checkpoint": str(run.final), "weights_sha256": file_sha256(run.final),
              **eval_settings(run, cfg.evaluate, crf).to_json(), "miou": float(miou_from_counts(counts.sum(0))),
              "pixel_acc": 0.9, "boundary_acc": 0.5, "internal_acc": 0.95, "images": IMAGES}
    path.write_text(json.dumps(record))
    np.savez(path.with_suffix(".per_image.npz"), names=np.array([f"im{i}" for i in range(IMAGES)]),
             tp_fp_fn=counts, band=np.ones((IMAGES, 4), np.int64))
    return path


def finished(cfg: CompareConfig, scored: bool = True) -> list[Run]:
    """The plan of ``cfg`` with every run finished, and every fine-tune scored (with CRF too when asked)."""
    runs = plan(cfg)
    for r in runs:
        r.dir.mkdir(parents=True, exist_ok=True)
        r.final.write_bytes(r.name.encode())
    for r in runs:
        if r.kind == "finetune":
            (r.dir / "run.json").write_text(json.dumps({"pretrained": {"sha256": file_sha256(r.after[0].final)}}))
            if scored:
                for crf in (False, True) if cfg.evaluate.crf else (False,):
                    write_score(r, cfg, crf)
    return runs


def _by_pair(comps: list[dict]) -> dict[tuple[str, str], dict]:
    return {(c["a"], c["b"]): c for c in comps}


# ---------------------------------------------------------------------------------------------
# Issue 23, item 5: a cell and the differences come from the same data
# ---------------------------------------------------------------------------------------------
def test_a_hand_edited_miou_is_refused_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from experiments.compare import main

    cfg = _config(tmp_path / "t6")
    runs = finished(cfg)
    cells = compared(cfg, runs)["segmentation"]
    for key, cell in cells.items():  # untouched: each cell is the mean of its runs' counts' mIoU
        from_counts = [100 * miou_from_counts(_counts(key, s, False).sum(0)) for s in cfg.seeds]
        assert cell["miou"] == pytest.approx(np.mean(from_counts), abs=0.01)
    victim = next(r for r in runs if r.network == "resnet10t+gcn_br" and r.seed == 1)
    path = eval_json(victim, cfg.evaluate)
    path.write_text(json.dumps({**json.loads(path.read_text()), "miou": 0.99}))
    with pytest.raises(StageFailed, match=rf"{path} says mIoU 99\.00 % .* per-image counts .* give \d+\.\d\d %"):
        compared(cfg, runs)
    with pytest.raises(StageFailed, match="edited or damaged"):
        gather(cfg, runs, score=False)
    assert main([f"output={cfg.output}", *_overrides(cfg), "--plan-seeds", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and len(err.strip().splitlines()) == 1


def _overrides(cfg: CompareConfig) -> list[str]:
    return [f"backbones=[{', '.join(cfg.backbones)}]", f"heads=[{', '.join(cfg.heads)}]",
            f"seeds=[{', '.join(map(str, cfg.seeds))}]", f"pretrain.seeds=[{', '.join(map(str, cfg.pretrain.seeds))}]",
            f"pretrain.config={cfg.pretrain.config}", f"finetune.config={cfg.finetune.config}",
            "evaluate.boundary_width=2", f"stats.replicates={cfg.stats.replicates}"]


# ---------------------------------------------------------------------------------------------
# What the interval of a backbone comparison holds
# ---------------------------------------------------------------------------------------------
def test_backbone_verdicts_from_one_pretraining_are_for_that_pretraining_only(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "one", pretrain_seeds=(0,))
    comps = compared(cfg, finished(cfg))["comparisons"]
    for c in comps:
        assert c["unit"] == "seed" and c["units"] == 3
        if c["kind"] == "backbone":
            assert c["scope"] == "this pretraining only" and c["text"].endswith("; this pretraining only")
        else:  # a head comparison shares its backbone: not affected
            assert c["scope"] == "" and "only" not in c["text"]
    # every fine-tune seed with its own pretraining: the seeds hold both stages' variation, nothing to scope
    cfg = _config(tmp_path / "all", pretrain_seeds=(0, 1, 2))
    assert all(c["scope"] == "" and c["unit"] == "seed" for c in compared(cfg, finished(cfg))["comparisons"])


def test_fine_tunes_of_one_pretraining_are_one_unit_of_a_backbone_comparison(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "t6", seeds=(0, 1, 2), pretrain_seeds=(0, 1))  # seed 2 starts from pretraining 0
    comps = _by_pair(compared(cfg, finished(cfg))["comparisons"])
    backbone = comps["resnet10t+baseline", "resnet50_gcn+baseline"]
    assert backbone["unit"] == "pretraining" and backbone["units"] == 2 and backbone["seeds"] == [0, 1, 2]
    per_seed = [100 * (miou_from_counts(_counts("resnet50_gcn+baseline", s, False).sum(0))
                       - miou_from_counts(_counts("resnet10t+baseline", s, False).sum(0))) for s in (0, 1, 2)]
    units = [(per_seed[0] + per_seed[2]) / 2, per_seed[1]]  # pretraining 0: seeds 0 and 2; pretraining 1: seed 1
    assert backbone["estimate"] == pytest.approx(np.mean(units)) and backbone["seed_sd"] == pytest.approx(
        np.std(units, ddof=1))
    head = comps["resnet10t+baseline", "resnet10t+gcn_br"]
    assert head["unit"] == "seed" and head["units"] == 3 and head["scope"] == ""


# ---------------------------------------------------------------------------------------------
# The family: Holm's correction, the detectable difference
# ---------------------------------------------------------------------------------------------
def _entry(label: str, p: float, estimate: float = 2.0) -> dict:
    return {"label": label, "estimate": estimate, "low": 0.1, "high": 3.9, "p_value": p, "units": 3,
            "seed_sd": 1.0, "image_se": 0.3, "images": 100, "better_a": "A", "better_b": "B", "scope": "",
            "paper": None}


def test_verdicts_are_holm_corrected_over_the_family() -> None:
    family = [_entry("one", 0.01), _entry("two", 0.02), _entry("three", 0.04), _entry("four", 0.3),
              {"label": "untested", "estimate": None}]
    described = judge(family, 0.95)
    # sorted 0.01, 0.02, 0.04, 0.3 -> x4, x3, x2, x1 = 0.04, 0.06, 0.08, 0.3
    assert [c["p_holm"] for c in family[:4]] == pytest.approx([0.04, 0.06, 0.08, 0.3])
    assert [c["significant"] for c in family[:4]] == [True, False, False, False]
    # "three": its own interval excludes 0 (p 0.04), but not after the correction
    assert family[2]["text"] == "+2.0 [+0.1, +3.9], not significant"
    assert family[0]["text"] == "+2.0 [+0.1, +3.9], significant (B better)"
    assert described["correction"] == "holm" and described["size"] == 4
    assert described["comparisons"] == ["one", "two", "three", "four"] and "p_holm" not in family[4]
    # the detectable difference: 80 % power at alpha / m, the level of Holm's first step
    parts = Components(1.0, 3, 0.09, 100)
    assert family[0]["detectable"] == pytest.approx(detectable_difference(parts, 0.05 / 4), abs=0.005)
    assert described["plan_alpha"] == pytest.approx(0.0125)


def test_table_and_json_carry_the_family_the_verdicts_and_the_detectable_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "t6", crf=True)
    result = gather(cfg, finished(cfg), score=False)
    family = result["stats"]["family"]
    assert family["correction"] == "holm" and family["size"] == 8  # 4 without CRF, 4 with
    assert sum(label.endswith(", both + CRF") for label in family["comparisons"]) == 4
    everything = result["comparisons"] + result["comparisons_crf"]
    assert [c["p_holm"] for c in everything] == pytest.approx(
        [min(1, p) for p in _holm_by_hand([c["p_value"] for c in everything])])
    md = table_markdown(result)
    assert "Holm's correction over the 8 comparisons of this table (4 without CRF, 4 with)" in md
    assert "Banerjee 1960" in md and "alpha / 8 = 0.00625" in md
    for c in everything:
        label = c["label"] + (", both + CRF" if c["crf"] else "")
        assert c["detectable"] > 0 and f"- {label}: detectable with these seeds: >= {c['detectable']:.1f} points" in md
        assert f"| {label} | {c['text']} | {c['p_holm']:.2g} | 3 | {IMAGES} |" in md
        assert c["significant"] == (c["p_holm"] < 0.05)
    head = _by_pair(result["comparisons"])["resnet10t+baseline", "resnet10t+gcn_br"]
    assert head["significant"] and head["estimate"] == pytest.approx(10, abs=1.5)  # GAIN: +0.10
    assert "this pretraining only: every fine-tune of these backbone comparisons" in md
    json.dumps(result)  # JSON-able as written to table6.json


def _holm_by_hand(p: list[float]) -> list[float]:
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        out[i] = running
    return out


# ---------------------------------------------------------------------------------------------
# --plan-seeds
# ---------------------------------------------------------------------------------------------
def test_plan_seeds_reads_the_scores_and_prints_what_the_seeds_can_detect(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from experiments.compare import main

    cfg = _config(tmp_path / "t6")
    runs = finished(cfg)
    unscored = next(r for r in runs if r.network == "resnet50_gcn+gcn_br" and r.seed == 2)
    eval_json(unscored, cfg.evaluate).unlink()  # finished, not evaluated yet: --plan-seeds must not evaluate it
    files = {p: p.stat().st_mtime_ns for p in Path(cfg.output).rglob("*")}
    assert main([f"output={cfg.output}", *_overrides(cfg), "--plan-seeds", "0.2,5.5"]) == 0
    out = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in Path(cfg.output).rglob("*")} == files  # nothing written or trained
    family = compared(cfg, runs)["comparisons"]
    level = 0.05 / 4
    assert f"alpha = {level:.3g}" in out and "over 4 comparisons" in out
    for c in family:
        assert c["label"] in out
        if c["units"] < 2:
            continue
        parts = Components(c["seed_sd"] ** 2, c["units"], c["image_se"] ** 2, c["images"])
        assert f"detectable with these seeds: >= {detectable_difference(parts, level):.1f} points" in out
        need = seeds_needed(5.5, parts, level)
        assert (f"5.5 points: {need} seeds" if need else "5.5 points: more seeds cannot get there") in out
    assert "0.2 points: " in out and "this pretraining only" in out
    assert f"finished but without a current score (run --collect first to include them): {unscored.name}" in out
    assert not eval_json(unscored, cfg.evaluate).exists() and not (Path(cfg.output) / "table6.md").exists()


@pytest.mark.parametrize("value", ["0", "abc", "1,,2"])
def test_plan_seeds_needs_differences(value: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from experiments.compare import main

    with pytest.raises(SystemExit) as e:
        main([f"output={tmp_path}", "--plan-seeds", value])
    assert e.value.code == 2 and "--plan-seeds" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The setting: the paper's figures beside ours only in the paper's setting; top-1 with few classes
# ---------------------------------------------------------------------------------------------
def _pre(images: int, classes: int) -> dict:
    return {"r": {"top5_error": 1.0, "runs": {"0": {"images": images, "classes": classes, "epochs": 16}}}}


def test_the_papers_setting_is_imagenet_val_and_voc_2012_val(tmp_path: Path) -> None:
    ft = next(r for r in plan(_config(tmp_path)) if r.kind == "finetune")  # tiny_cpu.yaml: voc, val split
    seg = {"n": {"runs": {"0": {"images": 1449}}}}
    assert setting(_pre(50_000, 1000), seg, ft) == {
        "paper": True, "pretrain_images": [50_000], "pretrain_classes": [1000], "dataset": "voc", "split": "val",
        "val_images": [1449], "epochs": [16], "top_k": 5}
    shapes = setting(_pre(300, 6), {"n": {"runs": {"0": {"images": 100}}}}, ft)
    assert shapes["paper"] is False and shapes["top_k"] == 1
    assert setting(_pre(50_000, 1000), {"n": {"runs": {"0": {"images": 300}}}}, ft)["paper"] is False  # a subset
    assert setting(_pre(10_000, 100), seg, ft) == {**setting(_pre(10_000, 100), seg, ft), "paper": False, "top_k": 5}
    assert setting({}, {}, None)["paper"] is False  # nothing finished: nothing to show the paper's figures beside


def _record(paper: bool, classes: int) -> dict:
    cell = {"top5_error": 0.3, "top1_error": 2.7, "ffcv_top5_error": 0.3, "ffcv_top1_error": 4.3,
            "std": {}, "n": 1, "runs": {"0": {"ffcv": {"val_res": 64, "flip": True}, "protocol": {"resolution": 224}}}}
    comparison = {"label": "ResNet50-GCN vs ResNet50, Baseline head", "text": "-0.4 [-9.0, +8.2], not significant",
                  "estimate": -0.4, "seeds": [0, 1], "units": 2, "unit": "seed", "images": 100, "paper": 5.5,
                  "p_holm": 0.9, "detectable": 31.25, "seeds_for_paper": 14, "scope": "this pretraining only"}
    return {"backbones": ["resnet50", "resnet50_gcn"], "heads": ["baseline"], "seeds": [0, 1], "pretrain_seeds": [0],
            "pretrain": {"resnet50": cell, "resnet50_gcn": cell},
            "segmentation": {"resnet50+baseline": {"miou": 68.2, "std": {"miou": 1.8}, "n": 2},
                             "resnet50_gcn+baseline": {"miou": 67.8, "std": {"miou": 5.4}, "n": 2}},
            "comparisons": [comparison], "stats": {"confidence": 0.95, "replicates": 2000, "seed": 0,
                                                   "family": {"size": 1, "plan_alpha": 0.05, "power": 0.8}},
            "setting": {"paper": paper, "top_k": 5 if classes >= 10 else 1, "pretrain_images": [300],
                        "pretrain_classes": [classes], "dataset": "voc", "split": "val", "val_images": [100],
                        "epochs": [2]},
            "chance_miou": 12.0, "missing": []}


def test_a_toy_table_shows_no_paper_figures_and_top_1_over_6_classes() -> None:
    md = table_markdown(_record(paper=False, classes=6))
    table = md.split("\n\n")[1]
    assert table.splitlines()[0] == "| | ResNet50 | ResNet50-GCN |" and "paper" not in table
    assert "| Pretraining data cls top-1 error (%) | 2.7 (n=1) | 2.7 (n=1) |" in table
    assert "top-5" not in table and "7.7" not in md and "65.7" not in md and "+5.5" not in md
    assert "| comparison | difference [interval], verdict | p, Holm | seeds | images |\n" in md
    assert "Not the paper's setting (pretraining scored on 300 images of 6 classes; segmentation on 100 images" in md
    assert "Top-1, not the paper's top-5: the pretraining data has 6 classes" in md
    assert "validated at 64 px during training: it shows them the images 3.5x larger" in md
    assert "- ResNet50-GCN vs ResNet50, Baseline head: detectable with these seeds: >= 31.2 points\n" in md


def test_the_papers_setting_puts_its_figures_beside_ours_with_the_budget_note() -> None:
    md = table_markdown(_record(paper=True, classes=1000))
    lines = md.splitlines()
    assert lines[2] == "| | ResNet50 | paper | ResNet50-GCN | paper |"
    assert "| ImageNet cls top-5 error (%) | 0.3 (n=1) | 7.7 | 0.3 (n=1) | 7.9 |" in lines
    assert "| Seg. score, Baseline (mIoU %) | 68.2 ± 1.8 (n=2) | 65.7 | 67.8 ± 5.4 (n=2) | 71.2 |" in lines
    assert "| ImageNet cls top-1 error (%) | 2.7 (n=1) |  | 2.7 (n=1) |  |" in lines
    assert ("Paper columns: Peng et al., Table 6. The training budgets differ: our pretraining ran 2 epochs" in md
            and "about 9 % top-5 error (90.8 % top-5 accuracy) for ResNet-50 after 16 epochs" in md)
    assert "| ResNet50-GCN vs ResNet50, Baseline head | -0.4 [-9.0, +8.2], not significant | 0.9 | 2 | 100 | +5.5 |" \
        in md
    assert "the paper's +5.5 would need 14 seeds" in md and "Top-1, not" not in md


def test_t_quantiles_match_scipy_stats() -> None:
    from experiments.compare.stats import t_quantile

    for df in (1, 2, 4.5, 99, float("inf")):
        for p in (0.025, 0.8, 0.975):
            assert t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df))
