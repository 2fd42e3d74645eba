"""The Table 6 runner end to end on a tiny shapes data set: plan, local runs, seeds, reuse, provenance,
collect, errors.

One module-scoped comparison (two backbones x two heads x two fine-tune seeds, the backbones pretrained
once, a few steps each) is run through ``python -m experiments.compare``; the tests read what it wrote,
or copy a part of it to change it. The SLURM launcher's test (a real local cluster) is at the end.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from hangs import Watched, files_progress, run_watched
from PIL import Image

from engine.provenance import file_sha256
from experiments.compare import (
    CompareConfig,
    EvaluateConfig,
    PretrainStageConfig,
    StageConfig,
    plan,
    recipe_drift,
    table_markdown,
)
from experiments.shapes import ShapesSpec, write_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = ShapesSpec(seed=3, train_per_class=8, val_per_class=3, voc_train=6, voc_val=5, sbd=12,
                       min_size=48, max_size=56)
BACKBONES = ["resnet10t", "resnet50_gcn"]
HEADS = ["baseline", "gcn_br"]
SEEDS = [0, 1]  # the fine-tunes'; the backbones are pretrained once (pretrain.seeds=[0]) to keep this quick
SCORE = "eval_final_val_bw2.json"  # segmentation.evaluate's name for final.pth at the comparison's settings
IMAGENET_SCORE = "eval_imagenet_224_crop0.875.json"  # backbone.evaluate's, Table 6's protocol


def compare(*args: str) -> subprocess.CompletedProcess:
    """``python -m experiments.compare ARGS``, watched for progress (no wall-clock limit: a busy machine is slow)."""
    return run_watched([sys.executable, "-m", "experiments.compare", *args], cwd=ROOT)


@pytest.fixture
def compare_here(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """``experiments.compare``'s ``main`` in this process, for calls that plan, check or refuse and start no
    stage: the code of ``python -m experiments.compare`` without a new interpreter's start-up (several seconds
    each, with torch and timm to import; the module fixture runs the command itself)."""
    from experiments.compare import main

    monkeypatch.chdir(ROOT)  # relative config paths, as from the repository root

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["experiments.compare", *args], code, out.out, out.err)
    return call


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from backbone.write_beton import WriterSettings, write_beton

    data = tmp_path_factory.mktemp("shapes")
    write_shapes(data, TINY_SPEC, progress=False)
    for split in ("train", "val"):
        write_beton(data / "imagenet" / split, data / f"{split}.beton", WriterSettings(max_resolution=64),
                    num_workers=1)
    return {"data": data, "train": data / "train.beton", "val": data / "val.beton",
            "voc": data / "VOCdevkit", "sbd": data / "benchmark_RELEASE"}


def _list(xs) -> str:
    return f"[{', '.join(str(x) for x in xs)}]"


def tiny_overrides(d: dict[str, Path], output: Path, backbones=BACKBONES, heads=HEADS, seeds=SEEDS,
                   pretrain_seeds=(0,)) -> list[str]:
    return [
        f"output={output}", f"backbones={_list(backbones)}", f"heads={_list(heads)}", f"seeds={_list(seeds)}",
        f"pretrain.seeds={_list(pretrain_seeds)}", "stats.replicates=500",
        "pretrain.config=configs/pretrain/tiny_cpu.yaml",
        f"pretrain.overrides=[data.train={d['train']}, data.val={d['val']}, train.epochs=1, data.global_batch=8, "
        "train.deterministic=false]",
        "finetune.config=configs/segmentation/tiny_cpu.yaml",
        f"finetune.overrides=[data.root={d['voc']}, data.sbd_root={d['sbd']}, data.train_split=train_aug, "
        "train.iterations=4, eval.every=0, run.checkpoint_every=2, train.deterministic=false]",
        "evaluate.boundary_width=2", "figures.figure6_images=3", "figures.vrf_images=2",
        "figures.vrf_scales=[1.0, 2.0]",
    ]


@pytest.fixture(scope="module")
def table(shapes_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("table6")
    proc = compare(*tiny_overrides(shapes_data, output))  # ten runs: minutes, more on a loaded machine
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"output": output, "stdout": proc.stdout, "overrides": tiny_overrides(shapes_data, output),
            "data": shapes_data}


def _md_rows(md: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
            if line.startswith("| ") and "---" not in line}


DIFFERENCE = re.compile(r"^[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\], (not significant|significant \(.+ better\))"
                        r"(; this pretraining only)?$")


@pytest.mark.slow
def test_local_run_writes_table_json_chart_and_figures(table: dict) -> None:
    out = table["output"]
    for b in BACKBONES:
        assert (out / "pretrain" / b / "seed0" / "final.pth").exists() and not (out / "pretrain" / b / "seed1").exists()
        for h in HEADS:
            for s in SEEDS:
                run = out / "finetune" / f"{b}_{h}" / f"seed{s}"
                assert (run / "final.pth").exists() and (run / SCORE).exists()
                assert (run / SCORE).with_suffix(".per_image.npz").exists()
                assert "mIoU" in (run / SCORE).with_suffix(".txt").read_text()  # the evaluator's per-class report
                assert len(list((run / "predictions").glob("*.png"))) == TINY_SPEC.voc_val
    record = json.loads((out / "table6.json").read_text())
    assert record["missing"] == [] and record["backbones"] == BACKBONES
    assert record["seeds"] == SEEDS and record["pretrain_seeds"] == [0]
    for b in BACKBONES:
        assert record["pretrain"][b]["n"] == 1 and 0 <= record["pretrain"][b]["top5_error"] <= 100
        for h in HEADS:
            seg = record["segmentation"][f"{b}+{h}"]
            assert seg["n"] == len(SEEDS) and seg["seeds"] == SEEDS and seg["missing_seeds"] == []
            per_seed = [seg["runs"][str(s)]["miou"] for s in SEEDS]
            assert seg["miou"] == pytest.approx(sum(per_seed) / len(per_seed), abs=0.01)
            for s in SEEDS:
                source = json.loads(Path(seg["runs"][str(s)]["source"]).read_text())
                assert seg["runs"][str(s)]["miou"] == round(100 * source["miou"], 2)
                assert seg["runs"][str(s)]["images"] == TINY_SPEC.voc_val
    assert 0 < record["chance_miou"] < 100
    md = (out / "table6.md").read_text()
    rows = _md_rows(md)
    ours = record["segmentation"]["resnet10t+gcn_br"]
    assert rows["Seg. score, GCN + BR (mIoU %)"][0] == f"{ours['miou']:.1f} ± {ours['std']['miou']:.1f} (n=2)"
    # the shapes data is not the paper's setting: no paper column beside ours
    assert len(rows["Seg. score, GCN + BR (mIoU %)"]) == len(BACKBONES) and "Not the paper's setting" in md
    # every comparison of the paper: two backbone comparisons (one per head), two head comparisons
    comps = record["comparisons"]
    assert [(c["kind"], c["a"], c["b"]) for c in comps] == [
        ("backbone", "resnet10t+baseline", "resnet50_gcn+baseline"),
        ("backbone", "resnet10t+gcn_br", "resnet50_gcn+gcn_br"),
        ("head", "resnet10t+baseline", "resnet10t+gcn_br"), ("head", "resnet50_gcn+baseline", "resnet50_gcn+gcn_br")]
    for c in comps:
        assert c["seeds"] == SEEDS and c["images"] == TINY_SPEC.voc_val and c["replicates"] == 500
        assert c["low"] <= c["estimate"] <= c["high"] and DIFFERENCE.match(c["text"]), c["text"]
        assert f"| {c['label']} | {c['text']} | {c['p_holm']:.2g} | 2 | {TINY_SPEC.voc_val} |" in md
    for key in ("chart", f"figure6_{BACKBONES[0]}", f"figure6_{BACKBONES[1]}", "figure3", "per_image_difference",
                "curves_pretrain", "curves_finetune"):
        with Image.open(record["files"][key]) as im:
            assert im.size[0] > 200 and im.size[1] > 100, key
    vrf = json.loads((out / "figure3" / "receptive_field.json").read_text())
    assert len(vrf["models"]) == len(BACKBONES) * len(HEADS)  # one seed per network
    assert "[10/10] fine-tune resnet50_gcn + gcn_br (seed 1)" in table["stdout"] and "table6.md" in table["stdout"]


@pytest.mark.slow
def test_every_figure_names_its_weights_settings_and_run(table: dict) -> None:
    """Provenance in table6.json; the ImageNet rows are Table 6's protocol (final.pth, 224 crop of 256, one
    view, from eval_imagenet_224_crop0.875.json) and, labelled apart, ffcv's last validation."""
    out = table["output"]
    record = json.loads((out / "table6.json").read_text())
    run_fields = ("recipe_hash", "world_size", "global_batch", "seed", "code_version")
    for b in BACKBONES:
        pre_dir = out / "pretrain" / b / "seed0"
        rec = record["pretrain"][b]["runs"]["0"]
        score = json.loads((pre_dir / IMAGENET_SCORE).read_text())
        assert rec["source"] == str(pre_dir / IMAGENET_SCORE)
        assert (rec["top5_error"], rec["top1_error"]) == (round(100 * score["top5_error"], 2),
                                                          round(100 * score["top1_error"], 2))
        assert rec["weights_sha256"] == score["weights"]["sha256"] == file_sha256(pre_dir / "final.pth")
        assert (rec["protocol"]["resolution"], rec["protocol"]["crop_ratio"], rec["protocol"]["flip"]) == (224, 0.875,
                                                                                                          False)
        last_val = [json.loads(line) for line in (pre_dir / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line).get("kind") == "val"][-1]
        assert rec["ffcv_top5_error"] == round(100 * last_val["top5_error"], 2)
        assert (rec["ffcv"]["val_res"], rec["ffcv"]["flip"]) == (64, True)
        run_json = json.loads((pre_dir / "run.json").read_text())
        assert {k: rec["run"][k] for k in run_fields} == {k: run_json[k] for k in run_fields}
        assert rec["run"]["world_size"] == 1 and rec["run"]["global_batch"] == 8 and rec["run"]["seed"] == 0
        for h in HEADS:
            for s in SEEDS:
                ft_dir = out / "finetune" / f"{b}_{h}" / f"seed{s}"
                rec = record["segmentation"][f"{b}+{h}"]["runs"][str(s)]
                assert rec["weights_sha256"] == file_sha256(ft_dir / "final.pth")
                assert rec["settings"] == {"split": "val", "scales": [1.0], "flip": False, "window": 0, "overlap": 0.34,
                                           "max_images": 0, "boundary_width": 2, "crf": None}
                run_json = json.loads((ft_dir / "run.json").read_text())
                assert {k: rec["run"][k] for k in run_fields} == {k: run_json[k] for k in run_fields}
                assert rec["run"]["seed"] == s and rec["run"]["global_batch"] == 4 and rec["run"]["world_size"] == 1
                assert rec["run"]["pretrained_sha256"] == file_sha256(pre_dir / "final.pth")
                assert rec["eval_code_version"] and rec["run"]["recipe_hash"]
    rows = _md_rows((out / "table6.md").read_text())
    # 6 classes: top-1 rows (top-5 would hold 5 of them)
    assert "Pretraining data top-1 error (%), ffcv protocol: 64 px, flip" in rows
    assert "Pretraining data cls top-1 error (%)" in rows


@pytest.mark.slow
def test_second_call_reuses_finished_runs_and_collect_trains_nothing(table: dict) -> None:
    out = table["output"]
    finals = {p: p.stat().st_mtime_ns for p in out.rglob("final.pth")}
    scores = {p: p.stat().st_mtime_ns for p in [*out.rglob(SCORE), *out.rglob(IMAGENET_SCORE)]}
    overrides = [*table["overrides"], "figures.vrf_images=0"]  # figures are not what this test is about
    proc = compare(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished before, reused") == len(BACKBONES) * (1 + len(HEADS) * len(SEEDS))
    proc = compare("--collect", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused" not in proc.stdout and "fine-tune" not in proc.stdout.split("# Table 6")[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("final.pth")} == finals
    assert {p: p.stat().st_mtime_ns for p in [*out.rglob(SCORE), *out.rglob(IMAGENET_SCORE)]} == scores


@pytest.mark.slow
def test_changed_recipe_of_a_finished_run_is_an_error_naming_the_key(table: dict, compare_here) -> None:
    overrides = [o.replace("train.iterations=4", "train.iterations=4, optim.lr=0.5") for o in table["overrides"]]
    proc = compare_here(*overrides)
    assert proc.returncode == 2
    assert "another recipe" in proc.stderr and "optim.lr: 0.01 -> 0.5" in proc.stderr and "output=" in proc.stderr


@pytest.mark.slow
def test_a_planned_world_size_other_than_the_recorded_one_is_a_recipe_change(table: dict, compare_here) -> None:
    """The runs trained as one process; the same output planned as SLURM jobs of 2 x 8 tasks is refused."""
    one = "{nodes: 1, tasks_per_node: 1, gpus_per_node: 0, cpus_per_task: 1, time: '00:20:00'}"
    overrides = [*table["overrides"], "launch.pretrain={nodes: 2, tasks_per_node: 8, gpus_per_node: 8}"]
    proc = compare_here("--dry-run", "--launcher", "sbatch", "--no-check", *overrides)
    assert proc.returncode == 2
    assert "world size: 1 -> 16 processes" in proc.stderr and "launch.pretrain = 2 node(s) x 8 task(s)" in proc.stderr
    proc = compare_here("--dry-run", "--launcher", "sbatch", "--no-check", *table["overrides"],
                   f"launch.pretrain={one}", "launch.finetune={nodes: 1, tasks_per_node: 2, gpus_per_node: 2}")
    assert proc.returncode == 2 and "fine-tune" in proc.stderr and "world size: 1 -> 2 processes" in proc.stderr
    proc = compare_here("--dry-run", "--launcher", "sbatch", "--no-check", *table["overrides"],
                   *[f"launch.{s}={one}" for s in ("pretrain", "finetune", "collect")])
    assert proc.returncode == 0 and proc.stdout.count("finished before, reused") == 10, proc.stderr


def _small_copy(table: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of one pretraining and one of its fine-tunes (seed 0), and the overrides planning just them."""
    import shutil

    src, dst = table["output"], tmp_path / "t6"
    for part in ("pretrain/resnet10t/seed0", "finetune/resnet10t_baseline/seed0"):
        shutil.copytree(src / part, dst / part)
    overrides = tiny_overrides(table["data"], dst, backbones=["resnet10t"], heads=["baseline"], seeds=[0])
    return dst, [*overrides, "figures.vrf_images=0"]


@pytest.mark.slow
def test_a_finetune_whose_backbone_changed_is_left_out_then_moved_aside_and_rerun(table: dict, tmp_path: Path) -> None:
    out, overrides = _small_copy(table, tmp_path)
    ft, backbone = out / "finetune/resnet10t_baseline/seed0", out / "pretrain/resnet10t/seed0/final.pth"
    run_json = json.loads((ft / "run.json").read_text())
    run_json["pretrained"]["sha256"] = "0" * 64  # as if the backbone had been retrained since
    (ft / "run.json").write_text(json.dumps(run_json))
    proc = compare("--collect", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "table6.json").read_text())
    assert record["segmentation"]["resnet10t+baseline"] is None and [s["dir"] for s in record["stale"]] == [str(ft)]
    assert "is stale" in proc.stdout and (ft / "final.pth").exists()  # --collect moves nothing
    assert "Left out, trained from backbone weights that have changed since" in (out / "table6.md").read_text()
    proc = compare(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ft.parent / "seed0.stale-1" / "final.pth").exists() and "moved to" in proc.stdout  # kept, not deleted
    assert json.loads((ft / "run.json").read_text())["pretrained"]["sha256"] == file_sha256(backbone)
    record = json.loads((out / "table6.json").read_text())
    assert record["stale"] == [] and record["segmentation"]["resnet10t+baseline"]["n"] == 1


@pytest.mark.slow
def test_scores_of_other_weights_or_settings_are_recomputed(table: dict, tmp_path: Path) -> None:
    out, overrides = _small_copy(table, tmp_path)
    ft, pre = out / "finetune/resnet10t_baseline/seed0", out / "pretrain/resnet10t/seed0"
    seg, imagenet = json.loads((ft / SCORE).read_text()), json.loads((pre / IMAGENET_SCORE).read_text())
    true_miou, true_top5 = seg["miou"], imagenet["top5_error"]
    (ft / SCORE).write_text(json.dumps({**seg, "weights_sha256": "0" * 64, "miou": 0.0123}))
    imagenet["weights"]["sha256"] = "0" * 64
    (pre / IMAGENET_SCORE).write_text(json.dumps({**imagenet, "top5_error": 0.999}))
    proc = compare("--collect", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg, imagenet = json.loads((ft / SCORE).read_text()), json.loads((pre / IMAGENET_SCORE).read_text())
    assert seg["weights_sha256"] == file_sha256(ft / "final.pth") and seg["miou"] == pytest.approx(true_miou)
    assert imagenet["weights"]["sha256"] == file_sha256(pre / "final.pth")
    assert imagenet["top5_error"] == pytest.approx(true_top5)  # backbone.evaluate ran again on the same weights
    record = json.loads((out / "table6.json").read_text())
    assert record["segmentation"]["resnet10t+baseline"]["miou"] == round(100 * true_miou, 2)
    assert record["pretrain"]["resnet10t"]["top5_error"] == round(100 * true_top5, 2)
    # other settings: another score file, the table's figure from it
    proc = compare("--collect", *[o.replace("evaluate.boundary_width=2", "evaluate.boundary_width=3")
                                  for o in overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "table6.json").read_text())["segmentation"]["resnet10t+baseline"]["runs"]["0"]
    assert rec["source"] == str(ft / "eval_final_val_bw3.json") and rec["settings"]["boundary_width"] == 3
    assert json.loads((ft / "eval_final_val_bw3.json").read_text())["boundary_width"] == 3


@pytest.mark.slow
def test_collect_on_a_partial_output_aggregates_the_seeds_there_and_lists_the_missing(table: dict,
                                                                                       tmp_path: Path) -> None:
    import shutil

    partial = tmp_path / "partial"
    # hard links: nothing in this test writes into a run directory
    shutil.copytree(table["output"] / "pretrain", partial / "pretrain", copy_function=os.link)
    shutil.copytree(table["output"] / "finetune", partial / "finetune", copy_function=os.link)
    shutil.rmtree(partial / "finetune" / "resnet10t_gcn_br" / "seed1")
    shutil.rmtree(partial / "finetune" / "resnet50_gcn_baseline")
    overrides = [o if not o.startswith("output=") else f"output={partial}" for o in table["overrides"]]
    overrides = [o if not o.startswith("figures.vrf_images") else "figures.vrf_images=0" for o in overrides]
    proc = compare("--collect", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (partial / "table6.md").read_text()
    assert "Not finished yet" in md and "fine-tune resnet10t + gcn_br (seed 1)" in md
    assert "fine-tune resnet50_gcn + baseline (seed 0)" in md
    record = json.loads((partial / "table6.json").read_text())
    cell = record["segmentation"]["resnet10t+gcn_br"]
    assert cell["n"] == 1 and cell["seeds"] == [0] and cell["missing_seeds"] == [1] and cell["std"]["miou"] is None
    assert cell["miou"] == cell["runs"]["0"]["miou"]
    rows = _md_rows(md)
    assert rows["Seg. score, GCN + BR (mIoU %)"][0] == f"{cell['miou']:.1f} (n=1)"
    assert rows["Seg. score, Baseline (mIoU %)"][1] == "–"
    comps = {c["label"]: c for c in record["comparisons"]}
    head = comps["GCN + BR vs Baseline, resnet10t backbone"]
    assert head["seeds"] == [0] and head["unpaired_seeds"] == [1]
    assert comps["ResNet50-GCN vs resnet10t, Baseline head"]["text"] == "–"
    assert "Seeds finished by one arm only are left out of that comparison: [1]." in md


def test_dry_run_shows_commands_and_sbatch_dependencies(shapes_data: dict[str, Path], tmp_path: Path,
                                                        compare_here) -> None:
    overrides = tiny_overrides(shapes_data, tmp_path / "t6", seeds=[0, 1, 2], pretrain_seeds=(0, 1, 2))
    proc = compare_here("--dry-run", *overrides)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("-m backbone.train") == 2 * 3 and proc.stdout.count("segmentation/finetune.py") == 4 * 3
    for s in (0, 1, 2):
        backbone = tmp_path / "t6" / "pretrain" / "resnet10t" / f"seed{s}" / "final.pth"
        assert f"model.pretrained={backbone}" in proc.stdout
        assert f"fine-tune resnet50_gcn + gcn_br (seed {s}) (to run)" in proc.stdout
    proc = compare_here("--dry-run", "--launcher", "sbatch", "--no-check", *overrides)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("slurm/imagenet_pretrain.sh") == 6 and proc.stdout.count("--dependency=afterok") >= 13
    assert "--gpus-per-node=8" in proc.stdout and "--collect" in proc.stdout
    assert "--job-name=lkm-finetune-resnet10t-gcn_br-s2" in proc.stdout
    assert not (tmp_path / "t6").exists()  # a dry run writes nothing


@pytest.mark.parametrize("override, message", [
    ("heads=[baseline, gcnbr]", "are not heads"),
    ("evaluate.flipp=true", "Did you mean 'evaluate.flip'"),
    ("finetune.config=configs/segmentation/nope.yaml", "does not exist"),
    ("backbones=[resnet5O]", "unknown model 'resnet5O'"),
    ("seeds=[0, 0]", "distinct seeds"),
    ("seeds=[]", "at least one seed"),
    ("stats.confidence=95", "0 < confidence < 1"),
])
def test_bad_config_is_a_clear_error(shapes_data: dict[str, Path], tmp_path: Path, override: str, message: str,
                                    capsys: pytest.CaptureFixture) -> None:
    from experiments.compare import main

    assert main([*tiny_overrides(shapes_data, tmp_path / "t6"), override]) == 2  # stops before any data is read
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t6").exists()


def test_missing_data_names_the_path(tmp_path: Path, compare_here) -> None:
    proc = compare_here("--config", "configs/table6.yaml", f"output={tmp_path}")
    assert proc.returncode == 2 and "data.train" in proc.stderr and "does not exist" in proc.stderr


def _cell(value: float, sd: float | None, n: int, **more) -> dict:
    return {"miou": value, "std": {"miou": sd}, "n": n, **more}


def test_table_markdown_places_ours_beside_the_paper_with_spread_comparisons_and_dashes() -> None:
    record = {
        "backbones": ["resnet50", "resnet50_gcn"], "heads": ["baseline", "gcn", "gcn_br"],
        "seeds": [0, 1, 2], "pretrain_seeds": [0, 1, 2],
        "pretrain": {"resnet50": {"top5_error": 12.34, "top1_error": 30.0, "ffcv_top5_error": 11.0,
                                  "ffcv_top1_error": 29.0, "std": {"top5_error": 0.52, "top1_error": 1.0,
                                                                   "ffcv_top5_error": 0.4, "ffcv_top1_error": 0.9},
                                  "n": 3, "runs": {"0": {"ffcv": {"val_res": 256, "flip": True}}}},
                     "resnet50_gcn": None},
        "segmentation": {"resnet50+baseline": _cell(60.0, 1.25, 3, boundary_acc=50.0, internal_acc=90.0),
                         "resnet50+gcn": None, "resnet50+gcn_br": _cell(70.0, None, 1), "resnet50_gcn+baseline": None,
                         "resnet50_gcn+gcn": None, "resnet50_gcn+gcn_br": None},
        "comparisons": [{"label": "GCN + BR vs Baseline, ResNet50 backbone", "text": "+10.0 [+7.1, +12.9], significant "
                         "(GCN + BR better); this seed only", "estimate": 10.0, "seeds": [0], "images": 1449,
                         "paper": 6.6, "unpaired_seeds": [1, 2], "p_holm": 0.001, "units": 1,
                         "scope": "this seed only", "detectable": None},
                        {"label": "ResNet50-GCN vs ResNet50, Baseline head", "text": "–", "estimate": None,
                         "paper": 5.5}],
        "stats": {"confidence": 0.95, "replicates": 2000, "seed": 0},
        "setting": {"paper": True, "top_k": 5, "epochs": [16]},
        "chance_miou": 11.0, "missing": ["pretrain resnet50_gcn (seed 0)"],
    }
    md = table_markdown(record)
    lines = _md_rows(md)
    assert lines["ImageNet cls top-5 error (%)"] == ["12.3 ± 0.5 (n=3)", "7.7", "–", "7.9"]
    assert lines["ImageNet top-5 error (%), ffcv protocol: 256 px, flip"] == ["11.0 ± 0.4 (n=3)", "", "–", ""]
    assert lines["Seg. score, Baseline (mIoU %)"] == ["60.0 ± 1.2 (n=3)", "65.7", "–", "71.2"]
    assert lines["Seg. score, GCN + BR (mIoU %)"][0] == "70.0 (n=1)"  # one seed: no spread
    assert lines["Seg. score, GCN (mIoU %)"] == ["–", "", "–", ""]  # the paper's Table 6 has no GCN row
    assert lines["Baseline: boundary / internal acc. (%)"][0] == "50.0 / 90.0"
    assert ("| GCN + BR vs Baseline, ResNet50 backbone | +10.0 [+7.1, +12.9], significant (GCN + BR better); this "
            "seed only | 0.001 | 1 | 1449 | +6.6 |") in md
    assert "| ResNet50-GCN vs ResNet50, Baseline head | – | – | – | – | +5.5 |" in md
    assert "this seed only: with one seed the interval holds the validation images' sampling error only" in md
    assert "Chance (background everywhere) on the same split: mIoU 11.0%" in md
    assert ("Not finished yet (left out of the means; – where no seed has finished): pretrain resnet50_gcn (seed 0)."
            in md)
    assert "224 x 224 centre crop" in md and "no flip" in md


def _tiny_config(output: Path, backbones=BACKBONES, seeds=(0,)) -> CompareConfig:
    return CompareConfig(output=str(output), backbones=list(backbones), heads=list(HEADS), seeds=list(seeds),
                         pretrain=PretrainStageConfig(str(ROOT / "configs/pretrain/tiny_cpu.yaml")),
                         finetune=StageConfig(str(ROOT / "configs/segmentation/tiny_cpu.yaml")))


def test_plan_runs_every_stage_once_per_seed_each_after_its_own_backbone_and_seed(tmp_path: Path) -> None:
    cfg = _tiny_config(tmp_path, seeds=[0, 1, 2])
    runs = plan(cfg)
    pre = {(r.backbone, r.seed): r for r in runs if r.kind == "pretrain"}
    fts = [r for r in runs if r.kind == "finetune"]
    assert set(pre) == {(b, s) for b in BACKBONES for s in (0, 1, 2)} and len(fts) == 2 * 2 * 3
    assert len({r.dir for r in runs}) == len(runs)  # each run in its own directory
    for r in runs:
        assert f"train.seed={r.seed}" in r.overrides and r.dir.name == f"seed{r.seed}"
        assert all(runs.index(d) < runs.index(r) for d in r.after)  # the local launcher's order respects them
    for r in fts:
        assert r.dir == tmp_path / "finetune" / f"{r.backbone}_{r.head}" / f"seed{r.seed}"
        backbone = pre[r.backbone, r.seed]
        assert r.after == [backbone] and f"model.pretrained={backbone.final}" in r.overrides
    assert [r.seed for r in runs][:6] == [0] * 6  # seed by seed: a whole table for seed 0 first
    # seeds for the fine-tunes only: every fine-tune starts from the one pretraining
    cfg.pretrain.seeds = [0]
    runs = plan(cfg)
    assert [(r.backbone, r.seed) for r in runs if r.kind == "pretrain"] == [(b, 0) for b in BACKBONES]
    assert {r.after[0].seed for r in runs if r.kind == "finetune"} == {0}
    cfg.pretrain.seeds = [1, 5]  # fine-tune seed 1 from pretraining seed 1, the others from the first (1)
    runs = plan(cfg)
    assert {r.seed: r.after[0].seed for r in runs if r.kind == "finetune"} == {0: 1, 1: 1, 2: 1}
    assert sum(r.kind == "pretrain" and r.seed == 5 for r in runs) == 2


def test_recipe_drift_names_changed_keys_and_ignores_the_stage_not_recipe_keys(tmp_path: Path) -> None:
    import yaml

    runs = plan(_tiny_config(tmp_path))
    run = next(r for r in runs if r.kind == "finetune")
    planned = {"optim": {"lr": 0.5, "momentum": 0.9}, "run": {"dir": "/elsewhere", "keep_checkpoints": 5},
               "data": {"num_workers": 4, "root": "/moved/VOCdevkit"}, "eval": {"every": 7},
               "model": {"pretrained": "/moved/final.pth", "scales": (1.0, 2.0)}}
    assert recipe_drift(run, planned) == []  # nothing recorded yet: a new run
    run.dir.mkdir(parents=True)
    recorded = {"optim": {"lr": 0.01, "momentum": 0.9}, "run": {"dir": str(run.dir), "keep_checkpoints": 2},
                "data": {"num_workers": 0, "root": "/data/VOCdevkit"}, "eval": {"every": 100},
                "model": {"pretrained": "/old/final.pth", "scales": [1.0, 2.0]}, "train": {"device": "cpu"}}
    (run.dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert recipe_drift(run, planned) == ["optim.lr: 0.01 -> 0.5"]
    # a pretraining: its own NOT_RECIPE (evaluation cadence, validation batch, data paths)
    pre = next(r for r in runs if r.kind == "pretrain")
    pre.dir.mkdir(parents=True)
    (pre.dir / "config.yaml").write_text(yaml.safe_dump({"train": {"eval_every": 1, "epochs": 3},
                                                         "data": {"val_batch_size": 32, "train": "/a.beton"}}))
    assert recipe_drift(pre, {"train": {"eval_every": 2, "epochs": 3},
                              "data": {"val_batch_size": 64, "train": "/b.beton"}}) == []
    assert recipe_drift(pre, {"train": {"eval_every": 1, "epochs": 4},
                              "data": {"val_batch_size": 32, "train": "/a.beton"}}) == ["train.epochs: 3 -> 4"]


def test_world_size_and_global_batch_recorded_in_run_json_are_recipe(tmp_path: Path) -> None:
    import yaml

    run = next(r for r in plan(_tiny_config(tmp_path)) if r.kind == "finetune")
    run.dir.mkdir(parents=True)
    config = {"optim": {"lr": 0.01}, "data": {"global_batch": 8}}
    (run.dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run.dir / "run.json").write_text(json.dumps({"world_size": 8, "global_batch": 8}))
    assert recipe_drift(run, config, world_size=8) == []
    assert recipe_drift(run, config, world_size=1) == ["world size: 8 -> 1 processes"]
    (run.dir / "run.json").write_text(json.dumps({"world_size": 8, "global_batch": 64}))  # what it trained with
    assert recipe_drift(run, config, world_size=8) == ["global batch: 64 -> 8"]


def test_planned_world_size_is_the_sbatch_resources_or_the_gpus_here(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from experiments.compare import ResourceConfig

    cfg = _tiny_config(tmp_path)
    cfg.launch.launcher = "sbatch"
    cfg.launch.pretrain, cfg.launch.finetune = ResourceConfig(2, 8, 8), ResourceConfig(1, 4, 4)
    assert {(r.kind, r.world_size) for r in plan(cfg)} == {("pretrain", 16), ("finetune", 4)}
    cfg.launch.launcher = "local"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert {r.world_size for r in plan(cfg)} == {1}  # the tiny configs say train.device=cpu: one process
    cfg.finetune.overrides = ["train.device=auto"]
    assert {(r.kind, r.world_size) for r in plan(cfg)} == {("pretrain", 1), ("finetune", 8)}


@pytest.mark.parametrize("gpus, processes", [(0, 1), (1, 1), (8, 8)])
def test_local_launcher_starts_one_process_per_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int,
                                                   processes: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    cfg = _tiny_config(tmp_path)
    cfg.pretrain.overrides = cfg.finetune.overrides = ["train.device=auto"]
    for run in plan(cfg):
        cmd = run.command("python")
        entry = ["-m", "backbone.train"] if run.kind == "pretrain" else [str(ROOT / "segmentation" / "finetune.py")]
        launcher = ["python"] if processes == 1 else \
            ["python", "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        assert cmd[:len(launcher) + len(entry)] == [*launcher, *entry] and run.world_size == processes
        assert cmd[len(launcher) + len(entry):] == ["--config", str(run.config), *run.overrides]


def test_sbatch_jobs_depend_on_their_own_backbone_and_seed_and_queued_jobs_are_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from engine import slurm
    from experiments.compare.launch import submit_sbatch

    submitted: list[list[str]] = []

    def fake_sbatch(args, cwd=None, env=None) -> str:
        submitted.append(list(args))
        return str(100 + len(submitted))

    monkeypatch.setattr(slurm, "sbatch", fake_sbatch)
    queued: set[str] = set()
    monkeypatch.setattr(slurm, "job_queued", lambda job: job in queued)
    cfg = _tiny_config(tmp_path / "t6", seeds=[0, 1])
    runs = plan(cfg)
    ids = submit_sbatch(cfg, runs, ["-m", "experiments.compare", "--collect"])
    by_name = {a[0].removeprefix("--job-name="): a for a in submitted}
    pre = {(b, s): ids[str(tmp_path / "t6" / "pretrain" / b / f"seed{s}")] for b in BACKBONES for s in (0, 1)}
    assert len(set(pre.values())) == 4
    for b in BACKBONES:
        for s in (0, 1):
            assert not any(a.startswith("--dependency") for a in by_name[f"lkm-pretrain-{b}-s{s}"])
            assert "slurm/imagenet_pretrain.sh" in by_name[f"lkm-pretrain-{b}-s{s}"]
            for h in HEADS:
                args = by_name[f"lkm-finetune-{b}-{h}-s{s}"]
                assert f"--dependency=afterok:{pre[b, s]}" in args and "slurm/segmentation_finetune.sh" in args
                assert "--signal=USR1@300" in args and "--requeue" in args  # checkpoint and requeue on the warning
    collect = by_name["lkm-collect"]
    stage_ids = [ids[str(r.dir)] for r in runs]
    assert f"--dependency=afterok:{':'.join(stage_ids)}" in collect and collect[-1].startswith("--wrap=cd ")
    assert not any(a.startswith(("--signal", "--requeue")) for a in collect)
    assert json.loads((tmp_path / "t6" / "jobs.json").read_text()) == ids

    # a second call: the pretraining of the first backbone, seed 0, is still queued, the rest is not
    queued.add(pre[BACKBONES[0], 0])
    submitted.clear()
    ids2 = submit_sbatch(cfg, runs, ["-m", "experiments.compare", "--collect"])
    assert ids2[str(runs[0].dir)] == pre[BACKBONES[0], 0] and f"job {pre[BACKBONES[0], 0]} still queued, reused" in \
        capsys.readouterr().out
    assert [a[0] for a in submitted].count(f"--job-name=lkm-pretrain-{BACKBONES[0]}-s0") == 0
    ft = next(a for a in submitted if a[0] == f"--job-name=lkm-finetune-{BACKBONES[0]}-{HEADS[0]}-s0")
    assert f"--dependency=afterok:{pre[BACKBONES[0], 0]}" in ft  # waits for the reused job


def test_wait_for_table_wants_the_table_its_own_collect_job_wrote(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import slurm
    from experiments.compare import StageFailed, wait_for_table

    monkeypatch.setattr(slurm, "wait_for_jobs", lambda ids, logs: None)
    with pytest.raises(StageFailed, match="table6.json is missing"):
        wait_for_table({"collect": "42"}, tmp_path)
    (tmp_path / "table6.json").write_text(json.dumps({"slurm_job_id": "41"}))  # an earlier collect's table
    with pytest.raises(StageFailed, match="was written by 41"):
        wait_for_table({"collect": "42"}, tmp_path)
    (tmp_path / "table6.json").write_text(json.dumps({"slurm_job_id": "42"}))
    assert wait_for_table({"collect": "42"}, tmp_path) == tmp_path / "table6.json"


def test_no_file_modification_times_decide_anything_in_experiments() -> None:
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "experiments").rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"st_mtime|getmtime|st_ctime", line)]
    assert offenders == []


def test_demo_betons_are_reused_by_content_not_by_file_times(shapes_data: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    import shutil

    from experiments.demo import write_betons

    data = tmp_path / "shapes"
    shutil.copytree(shapes_data["data"] / "imagenet", data / "imagenet")
    shutil.copy(shapes_data["data"] / "shapes.json", data / "shapes.json")
    write_betons(data)
    assert capsys.readouterr().out.count(".beton: ") == 2
    later = (data / "shapes.json").stat().st_mtime + 3600
    os.utime(data / "shapes.json", (later, later))  # newer than the .beton files, the same content
    write_betons(data)
    assert capsys.readouterr().out.count(".beton: ") == 0
    manifest = json.loads((data / "shapes.json").read_text())
    (data / "shapes.json").write_text(json.dumps({**manifest, "spec": {**manifest["spec"], "seed": 99}}))
    os.utime(data / "shapes.json", (1, 1))  # older than the .beton files, other content: written again
    write_betons(data)
    assert capsys.readouterr().out.count(".beton: ") == 2


@pytest.mark.slow
def test_ctrl_c_stops_the_running_stage_at_a_checkpoint_with_one_line_and_exit_130(shapes_data: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    out = tmp_path / "t6"
    overrides = [o.replace("train.epochs=1,", "train.epochs=1000,") for o in  # still training when Ctrl-C comes
                 tiny_overrides(shapes_data, out, backbones=["resnet10t"], heads=["baseline"], seeds=[0])]
    assert any("train.epochs=1000," in o for o in overrides)
    with Watched([sys.executable, "-m", "experiments.compare", *overrides]) as child:
        metrics = out / "pretrain" / "resnet10t" / "seed0" / "metrics.jsonl"
        child.wait_for(lambda: metrics.exists() and '"train"' in metrics.read_text(), "the first training steps")
        os.killpg(child.pid, signal.SIGINT)  # Ctrl-C at a terminal: SIGINT to the foreground process group
        done = child.wait()
    err = done.stderr
    assert done.returncode == 130, done.stdout[-3000:] + err[-5000:]
    assert "Traceback" not in done.stdout + err, done.stdout[-3000:] + err[-5000:]
    # the child got the signal once (a second one would mean "stop at once, no checkpoint") and checkpointed
    run_dir = out / "pretrain" / "resnet10t" / "seed0"
    assert f"stopped by SIGINT: a checkpoint is in {run_dir}" in err, err[-5000:]
    assert "interrupted at once" not in err and list(run_dir.glob("checkpoint_*.pt")), err[-5000:]
    # one line from the comparison, naming the run and how to go on; no fine-tune started
    (line,) = [x for x in err.splitlines() if x.startswith("interrupted")]
    assert line.startswith("interrupted by SIGINT: pretrain resnet10t") and "same command again" in line, err
    assert not (out / "finetune").exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sbatch_launcher_runs_the_matrix_with_seeds_and_dependencies(
        slurm_cluster: dict, shapes_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t6"
    overrides = tiny_overrides(shapes_data, out, backbones=["resnet10t"], seeds=[0, 1], pretrain_seeds=(0, 1)) + [
        "figures.vrf_images=1",
        *[f"launch.{s}={{nodes: 1, tasks_per_node: 1, gpus_per_node: 0, cpus_per_task: 1, time: '00:20:00'}}"
          for s in ("pretrain", "finetune", "collect")]]
    env = {**os.environ, **slurm_cluster}
    proc = run_watched([sys.executable, "-m", "experiments.compare", "--launcher", "sbatch", "--wait", *overrides],
                       env=env, progress=files_progress(out))  # the jobs' logs and run directories grow
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = json.loads((out / "jobs.json").read_text())
    for s in (0, 1):
        pre = jobs[str(out / "pretrain" / "resnet10t" / f"seed{s}")]
        for h in HEADS:  # each fine-tune waits for the pretraining of its own seed only
            assert re.search(rf"fine-tune resnet10t \+ {h} \(seed {s}\): job \d+ \(after {pre}\)\n", proc.stdout), \
                proc.stdout
    assert "collect: job" in proc.stdout and "# Table 6" in proc.stdout
    record = json.loads((out / "table6.json").read_text())
    assert record["missing"] == [] and record["slurm_job_id"] == jobs["collect"]
    assert record["segmentation"]["resnet10t+gcn_br"]["n"] == 2 and record["pretrain"]["resnet10t"]["n"] == 2
    assert record["comparisons"][0]["seeds"] == [0, 1] and DIFFERENCE.match(record["comparisons"][0]["text"])
    logs = sorted(p.name for p in (out / "logs").glob("*.out"))
    assert any(n.startswith("lkm-pretrain-resnet10t-s1-") for n in logs)
    assert any(n.startswith("lkm-collect-") for n in logs)
    # everything finished: a second call submits only the collect job
    proc = run_watched([sys.executable, "-m", "experiments.compare", "--launcher", "sbatch", *overrides], env=env)
    assert proc.returncode == 0 and proc.stdout.count("finished before, reused") == 6, proc.stdout + proc.stderr
    collect_id = re.search(r"collect: job (\d+)", proc.stdout).group(1)
    subprocess.run(["scancel", collect_id], capture_output=True)


def test_demo_verdict_compares_every_network_with_chance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from experiments.demo import seeds_note, verdict

    record = {"chance_miou": 12.0, "seeds": [0, 1, 2], "pretrain_seeds": [0],
              "segmentation": {"resnet50+baseline": {"miou": 30.0, "std": {"miou": None}, "n": 1},
                               "resnet50+gcn_br": {"miou": 80.0, "std": {"miou": 1.04}, "n": 3}},
              "comparisons": [{"label": "GCN + BR vs Baseline, ResNet50 backbone",
                               "text": "+50.0 [+45.0, +55.0], significant (GCN + BR better)"}]}
    (tmp_path / "table6.json").write_text(json.dumps(record))
    assert verdict(tmp_path) is True  # the baseline head may stay low; every GCN + BR network must learn
    out = capsys.readouterr().out
    assert "resnet50+gcn_br" in out and "80.0% ± 1.0 (n=3, 6.7x chance)" in out and "learned" in out
    assert "NOT above chance" in out and "+50.0 [+45.0, +55.0], significant (GCN + BR better)" in out
    assert "pretrained with seed(s) [0] only" in seeds_note(record) and "not seeded" in seeds_note(record)
    record["segmentation"]["resnet50+gcn_br"]["miou"] = 25.0  # above chance, but not by 2x
    (tmp_path / "table6.json").write_text(json.dumps(record))
    assert verdict(tmp_path) is False
    record["segmentation"]["resnet50+gcn_br"] = None  # not finished
    (tmp_path / "table6.json").write_text(json.dumps(record))
    assert verdict(tmp_path) is False and "not finished" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# evaluate.crf: scores with the dense CRF beside the plain ones, never mixed
# ---------------------------------------------------------------------------------------------
def _fake_score(run, crf: bool, tp: int) -> Path:
    """A score file as segmentation.evaluate writes it, for run.final (with CRF or without), 2 images x 2 classes
    of tp true positives, 2 false positives and 2 false negatives each: mIoU tp / (tp + 4)."""
    import numpy as np

    from experiments.compare.collect import eval_json, eval_settings

    ev = EvaluateConfig(boundary_width=2, crf=True)
    path = eval_json(run, ev, crf)
    record = {"checkpoint": str(run.final), "weights_sha256": file_sha256(run.final), **eval_settings(run, ev, crf)
              .to_json(), "miou": tp / (tp + 4), "pixel_acc": 0.9, "boundary_acc": 0.5, "internal_acc": 0.95,
              "images": 2}
    if crf:
        record.update(crf_seconds_per_image=0.02, crf_cpu_seconds_per_image=0.02, crf_workers=2)
    path.write_text(json.dumps(record))
    np.savez(path.with_suffix(".per_image.npz"), names=np.array(["a", "b"]),
             tp_fp_fn=np.array([[[tp, 2, 2], [tp, 2, 2]]] * 2), band=np.ones((2, 4), np.int64))
    return path


def test_crf_scores_have_their_own_files_records_and_reuse(tmp_path: Path) -> None:
    from experiments.compare.collect import crf_variants, eval_json, finetune_record, score_problem

    cfg = _tiny_config(tmp_path)
    cfg.evaluate = EvaluateConfig(boundary_width=2, crf=True)
    run = next(r for r in plan(cfg) if r.kind == "finetune")
    run.dir.mkdir(parents=True)
    run.final.write_bytes(b"weights")
    assert crf_variants(cfg.evaluate) == (False, True) and crf_variants(EvaluateConfig()) == (False,)
    plain, crf = eval_json(run, cfg.evaluate), eval_json(run, cfg.evaluate, crf=True)
    assert plain.name == SCORE and crf.name == SCORE.replace(".json", "_crf.json")  # never the same file
    _fake_score(run, crf=False, tp=10)
    assert score_problem(run, cfg.evaluate) is None
    assert score_problem(run, cfg.evaluate, crf=True) == "no score yet with CRF"
    assert finetune_record(run, cfg.evaluate, crf=True) is None
    _fake_score(run, crf=True, tp=20)
    rec, rec_crf = finetune_record(run, cfg.evaluate), finetune_record(run, cfg.evaluate, crf=True)
    assert rec["miou"] == round(100 * 10 / 14, 2) and rec["crf"] is None and rec["source"] == str(plain)
    assert rec_crf["miou"] == round(100 * 20 / 24, 2) and rec_crf["source"] == str(crf)
    assert rec_crf["crf_seconds_per_image"] == 0.02
    assert rec_crf["crf"] == {"iters": 10, "bi_w": 4.0, "bi_xy_std": 67.0, "bi_rgb_std": 3.0, "pos_w": 3.0,
                              "pos_xy_std": 3.0}  # DeepLab's defaults
    # a CRF score under other CRF parameters is not reused; nor is a plain score passed off as a CRF one
    record = json.loads(crf.read_text())
    crf.write_text(json.dumps({**record, "crf": {**record["crf"], "bi_w": 5.0}}))
    assert "other settings (crf)" in score_problem(run, cfg.evaluate, crf=True)
    crf.write_text(json.dumps({**record, "crf": None}))
    assert "other settings (crf)" in score_problem(run, cfg.evaluate, crf=True)


def test_evaluate_crf_without_pydensecrf_is_refused_before_anything_runs(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.config import ConfigError

    cfg = _tiny_config(tmp_path)
    cfg.evaluate.crf = True
    cfg.validate()  # installed here (the crf extra)
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ConfigError, match=r"evaluate\.crf: .*pip install 'pydensecrf2>=1\.1'"):
        cfg.validate()
    cfg.evaluate.crf = False
    cfg.validate()


def test_evaluate_runs_scores_each_finetune_with_and_without_crf(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import segmentation.evaluate

    collect = importlib.import_module("experiments.compare.collect")  # the module, not the function of that name
    cfg = _tiny_config(tmp_path)
    cfg.evaluate = EvaluateConfig(boundary_width=2, crf=True)
    run = next(r for r in plan(cfg) if r.kind == "finetune")
    run.dir.mkdir(parents=True)
    run.final.write_bytes(b"weights")
    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        calls.append(argv)
        _fake_score(run, crf="--crf" in argv, tp=10)
        return 0

    monkeypatch.setattr(segmentation.evaluate, "main", fake_main)
    done = collect.evaluate_runs([run], cfg.evaluate)
    assert len(calls) == 2 and "--crf" not in calls[0]
    crf_argv = " ".join(calls[1])
    assert ("--crf --crf-iters 10 --crf-bi-w 4 --crf-bi-xy-std 67 --crf-bi-rgb-std 3 --crf-pos-w 3 --crf-pos-xy-std 3"
            in crf_argv) and str(run.dir / "predictions_crf") in crf_argv  # Figure 6 keeps the network's PNGs
    assert done == {str(run.dir): run.dir / SCORE, f"{run.dir}+crf": run.dir / SCORE.replace(".json", "_crf.json")}
    collect.evaluate_runs([run], cfg.evaluate)  # both current: nothing evaluated again
    assert len(calls) == 2
    cfg.evaluate.crf = False
    collect.evaluate_runs([run], cfg.evaluate)
    assert len(calls) == 2


def test_gather_keeps_crf_cells_and_comparisons_apart_from_the_plain_ones(tmp_path: Path) -> None:
    from experiments.compare.collect import gather

    cfg = _tiny_config(tmp_path)
    cfg.evaluate = EvaluateConfig(boundary_width=2, crf=True)
    cfg.stats.replicates = 50
    runs = plan(cfg)
    for r in runs:
        if r.kind == "finetune":
            r.dir.mkdir(parents=True)
            r.final.write_bytes(r.name.encode())
            gcn = r.backbone == "resnet50_gcn"
            _fake_score(r, crf=False, tp=10 + gcn)
            _fake_score(r, crf=True, tp=30 + 5 * gcn)
    result = gather(cfg, runs, score=False)
    assert result["crf"] is True and result["evaluation"]["segmentation"]["crf"] is None
    assert result["evaluation"]["segmentation_crf"]["crf"]["iters"] == 10
    for key, gcn in (("resnet10t+gcn_br", 0), ("resnet50_gcn+baseline", 1)):  # each cell from its own counts
        assert result["segmentation"][key]["miou"] == round(100 * (10 + gcn) / (14 + gcn), 2)
        assert result["segmentation_crf"][key]["miou"] == round(100 * (30 + 5 * gcn) / (34 + 5 * gcn), 2)
        assert result["segmentation"][key]["runs"]["0"]["crf"] is None
        assert result["segmentation_crf"][key]["runs"]["0"]["crf"]["bi_w"] == 4.0
    plain = {(c["a"], c["b"]): c for c in result["comparisons"]}
    crf = {(c["a"], c["b"]): c for c in result["comparisons_crf"]}
    assert plain.keys() == crf.keys() and not any(c["crf"] for c in plain.values())
    assert all(c["crf"] for c in crf.values())
    label = ("resnet10t+gcn_br", "resnet50_gcn+gcn_br")
    # each from its own counts: plain tp 10 vs 11, CRF tp 30 vs 35 (IoU tp / (tp + 4) per class)
    assert plain[label]["estimate"] == pytest.approx(100 * (11 / 15 - 10 / 14), abs=0.01)
    assert crf[label]["estimate"] == pytest.approx(100 * (35 / 39 - 30 / 34), abs=0.01)
    cfg.evaluate.crf = False  # not asked for: no CRF keys at all
    result = gather(cfg, runs, score=False)
    assert result["crf"] is False and "segmentation_crf" not in result and "comparisons_crf" not in result


def test_table_markdown_shows_crf_rows_and_comparisons_apart_without_paper_figures() -> None:
    from segmentation.crf import CRFParams

    def cells(miou: float) -> dict:
        return {"resnet50+baseline": _cell(miou, 0.5, 2, boundary_acc=40.0, internal_acc=90.0),
                "resnet50+gcn_br": _cell(miou + 5, None, 1, boundary_acc=45.0, internal_acc=91.0),
                "resnet50_gcn+baseline": None, "resnet50_gcn+gcn_br": None}

    crf_cells = cells(63.0)
    crf_cells["resnet50+baseline"]["runs"] = {"0": {"crf_seconds_per_image": 0.05},
                                              "1": {"crf_seconds_per_image": 0.07}}
    comparison = {"label": "GCN + BR vs Baseline, ResNet50 backbone", "estimate": 5.0, "seeds": [0], "images": 100,
                  "paper": 6.6, "p_holm": 0.01, "units": 1}
    record = {
        "backbones": ["resnet50", "resnet50_gcn"], "heads": ["baseline", "gcn_br"], "seeds": [0, 1],
        "pretrain_seeds": [0], "pretrain": {"resnet50": None, "resnet50_gcn": None}, "crf": True,
        "segmentation": cells(60.0), "segmentation_crf": crf_cells,
        "comparisons": [{**comparison, "text": "+5.0 [+1.0, +9.0], significant (GCN + BR better)", "crf": False}],
        "comparisons_crf": [{**comparison, "text": "+5.0 [+2.0, +8.0], significant (GCN + BR better)", "crf": True}],
        "setting": {"paper": True, "top_k": 5},
        "evaluation": {"segmentation": {"scales": [0.5, 1.0], "flip": True, "crf": None},
                       "segmentation_crf": {"scales": [0.5, 1.0], "flip": True, "crf": vars(CRFParams())}},
        "stats": {"confidence": 0.95, "replicates": 2000, "seed": 0}, "chance_miou": None, "missing": [],
    }
    md = table_markdown(record)
    rows = _md_rows(md)
    assert rows["Seg. score, Baseline (mIoU %)"] == ["60.0 ± 0.5 (n=2)", "65.7", "–", "71.2"]
    assert rows["Seg. score, Baseline + CRF (mIoU %)"] == ["63.0 ± 0.5 (n=2)", "", "–", ""]  # Table 6 has no CRF
    assert rows["Seg. score, GCN + BR + CRF (mIoU %)"][0] == "68.0 (n=1)"
    assert rows["GCN + BR + CRF: boundary / internal acc. (%)"][0] == "45.0 / 91.0"
    assert ("| GCN + BR vs Baseline, ResNet50 backbone | +5.0 [+1.0, +9.0], significant (GCN + BR better) | 0.01 | 1 "
            "| 100 | +6.6 |") in md
    assert ("| GCN + BR vs Baseline, ResNet50 backbone, both + CRF | +5.0 [+2.0, +8.0], significant (GCN + BR "
            "better) | 0.01 | 1 | 100 |  |") in md
    assert "segmentation.evaluate --crf; iters 10, bi_w 4, bi_xy_std 67, bi_rgb_std 3, pos_w 3, pos_xy_std 3" in md
    assert "60 ms of CRF per image on average" in md
    record["crf"] = False  # collected without evaluate.crf: no CRF row, whatever else the record holds
    md = table_markdown(record)
    assert "+ CRF" not in md and "both + CRF" not in md


def test_stage_curves_put_every_run_side_by_side_and_skip_what_has_no_records(tmp_path: Path) -> None:
    from experiments.compare.collect import draw_stage_curves
    from experiments.compare.plan import Run

    runs = []
    for seed in (0, 1):
        d = tmp_path / f"ft{seed}"
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "train", "step": s, "loss": 1.0 / (s + seed + 1)}) + "\n" for s in range(5))
            + json.dumps({"kind": "val", "step": 4, "miou": 0.5 + seed / 10}) + "\n")
        runs.append(Run(kind="finetune", backbone="resnet50", head="gcn_br", seed=seed, dir=d,
                        config=tmp_path / "ft.yaml", overrides=[]))
    runs.append(Run(kind="pretrain", backbone="resnet50", head=None, seed=0, dir=tmp_path / "not_started",
                    config=tmp_path / "pre.yaml", overrides=[]))
    written = draw_stage_curves(runs, tmp_path)
    assert written["curves_pretrain"] is None  # no metrics.jsonl yet: nothing to draw, no empty figure
    assert not (tmp_path / "curves_pretrain.png").exists()
    with Image.open(written["curves_finetune"]) as im:
        assert im.size[0] > 500
    assert draw_stage_curves(runs, tmp_path, skip={r.dir for r in runs[:2]}).get("curves_finetune") is None
