"""The Table 6 runner end to end on a tiny shapes data set: plan, local runs, reuse, collect, errors.

One module-scoped comparison (two backbones x two heads, a few steps each) is run through
``python -m experiments.compare``; the tests read what it wrote. The SLURM launcher's test
(``tests/test_slurm.py``-style, a real local cluster) is at the end.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from experiments.compare import PAPER_TABLE6, CompareConfig, StageConfig, plan, recipe_drift, table_markdown
from experiments.shapes import ShapesSpec, write_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = ShapesSpec(seed=3, train_per_class=8, val_per_class=3, voc_train=6, voc_val=5, sbd=12,
                       min_size=48, max_size=56)
BACKBONES = ["resnet10t", "resnet50_gcn"]
HEADS = ["baseline", "gcn_br"]


def compare(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.compare", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


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


def tiny_overrides(d: dict[str, Path], output: Path, backbones=BACKBONES, heads=HEADS) -> list[str]:
    return [
        f"output={output}", f"backbones=[{', '.join(backbones)}]", f"heads=[{', '.join(heads)}]",
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
    proc = compare(*tiny_overrides(shapes_data, output))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"output": output, "stdout": proc.stdout, "overrides": tiny_overrides(shapes_data, output)}


@pytest.mark.slow
def test_local_run_writes_table_json_chart_and_figures(table: dict) -> None:
    out = table["output"]
    for b in BACKBONES:
        assert (out / "pretrain" / b / "final.pth").exists()
        for h in HEADS:
            run = out / "finetune" / f"{b}_{h}"
            assert (run / "final.pth").exists() and (run / "eval_val.json").exists()
            assert "mIoU" in (run / "eval_val.txt").read_text()  # the evaluator's per-class report
            assert len(list((run / "predictions").glob("*.png"))) == TINY_SPEC.voc_val
    record = json.loads((out / "table6.json").read_text())
    assert record["missing"] == [] and record["backbones"] == BACKBONES
    for b in BACKBONES:  # every figure traces back to the file it came from
        pre = record["pretrain"][b]
        assert 0 <= pre["top5_error"] <= 100 and str(out / "pretrain" / b / "metrics.jsonl") in pre["source"]
        for h in HEADS:
            seg = record["segmentation"][f"{b}+{h}"]
            source = json.loads(Path(seg["source"]).read_text())
            assert seg["miou"] == round(100 * source["miou"], 2) and seg["images"] == TINY_SPEC.voc_val
    assert 0 < record["chance_miou"] < 100
    md = (out / "table6.md").read_text()
    assert "ImageNet cls top-5 error" in md and "Seg. score, GCN + BR" in md
    gcn_row = next(line for line in md.splitlines() if line.startswith("| Seg. score, GCN + BR"))
    ours = record["segmentation"]["resnet10t+gcn_br"]["miou"]
    assert f"| {ours:.1f} |  |" in gcn_row and f"| {PAPER_TABLE6['miou_gcn_br']['resnet50_gcn']} |" in gcn_row
    for key in ("chart", f"figure6_{BACKBONES[0]}", f"figure6_{BACKBONES[1]}", "figure3"):
        with Image.open(record["files"][key]) as im:
            assert im.size[0] > 200 and im.size[1] > 100, key
    vrf = json.loads((out / "figure3" / "receptive_field.json").read_text())
    assert len(vrf["models"]) == len(BACKBONES) * len(HEADS)
    assert "[6/6] fine-tune resnet50_gcn + gcn_br" in table["stdout"] and "table6.md" in table["stdout"]


@pytest.mark.slow
def test_second_call_reuses_finished_runs_and_collect_trains_nothing(table: dict) -> None:
    out = table["output"]
    finals = {p: p.stat().st_mtime_ns for p in out.rglob("final.pth")}
    evals = {p: p.stat().st_mtime_ns for p in out.rglob("eval_val.json")}
    overrides = [*table["overrides"], "figures.vrf_images=0"]  # figures are not what this test is about
    proc = compare(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished before, reused") == len(BACKBONES) * (1 + len(HEADS))
    proc = compare("--collect", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused" not in proc.stdout and "fine-tune" not in proc.stdout.split("# Table 6")[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("final.pth")} == finals
    assert {p: p.stat().st_mtime_ns for p in out.rglob("eval_val.json")} == evals  # scores newer than weights


@pytest.mark.slow
def test_changed_recipe_of_a_finished_run_is_an_error_naming_the_key(table: dict) -> None:
    overrides = [o.replace("train.iterations=4", "train.iterations=4, optim.lr=0.5") for o in table["overrides"]]
    proc = compare(*overrides)
    assert proc.returncode == 2
    assert "another recipe" in proc.stderr and "optim.lr: 0.01 -> 0.5" in proc.stderr and "output=" in proc.stderr


@pytest.mark.slow
def test_collect_on_a_partial_output_marks_what_is_missing(table: dict, tmp_path: Path) -> None:
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(table["output"] / "pretrain", partial / "pretrain")
    shutil.copytree(table["output"] / "finetune" / "resnet10t_gcn_br", partial / "finetune" / "resnet10t_gcn_br")
    overrides = [o if not o.startswith("output=") else f"output={partial}" for o in table["overrides"]]
    overrides = [o if not o.startswith("figures.vrf_images") else "figures.vrf_images=0" for o in overrides]
    proc = compare("--collect", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (partial / "table6.md").read_text()
    assert "Not finished yet" in md and "fine-tune resnet50_gcn + gcn_br" in md
    baseline_row = next(line for line in md.splitlines() if line.startswith("| Seg. score, Baseline"))
    assert baseline_row.count("–") == 2


def test_dry_run_shows_commands_and_sbatch_dependencies(shapes_data: dict[str, Path], tmp_path: Path) -> None:
    overrides = tiny_overrides(shapes_data, tmp_path / "t6")
    proc = compare("--dry-run", *overrides)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("-m backbone.train") == 2 and proc.stdout.count("segmentation/finetune.py") == 4
    assert f"model.pretrained={tmp_path / 't6' / 'pretrain' / 'resnet10t' / 'final.pth'}" in proc.stdout
    proc = compare("--dry-run", "--launcher", "sbatch", "--no-check", *overrides)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("slurm/imagenet_pretrain.sh") == 2 and proc.stdout.count("--dependency=afterok") >= 5
    assert "--gpus-per-node=8" in proc.stdout and "--collect" in proc.stdout
    assert not (tmp_path / "t6").exists()  # a dry run writes nothing


@pytest.mark.parametrize("override, message", [
    ("heads=[baseline, gcnbr]", "are not heads"),
    ("evaluate.flipp=true", "Did you mean 'evaluate.flip'"),
    ("finetune.config=configs/segmentation/nope.yaml", "does not exist"),
    ("backbones=[resnet5O]", "unknown model 'resnet5O'"),
])
def test_bad_config_is_a_clear_error(shapes_data: dict[str, Path], tmp_path: Path, override: str, message: str,
                                    capsys: pytest.CaptureFixture) -> None:
    from experiments.compare import main

    assert main([*tiny_overrides(shapes_data, tmp_path / "t6"), override]) == 2  # stops before any data is read
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t6").exists()


def test_missing_data_names_the_path(tmp_path: Path) -> None:
    proc = compare("--config", "configs/table6.yaml", f"output={tmp_path}")
    assert proc.returncode == 2 and "data.train" in proc.stderr and "does not exist" in proc.stderr


def test_table_markdown_places_ours_beside_the_paper_and_dashes_missing() -> None:
    record = {
        "backbones": ["resnet50", "resnet50_gcn"], "heads": ["baseline", "gcn", "gcn_br"],
        "pretrain": {"resnet50": {"top5_error": 12.34, "top1_error": 30.0}, "resnet50_gcn": None},
        "segmentation": {"resnet50+baseline": {"miou": 60.0, "boundary_acc": 50.0, "internal_acc": 90.0,
                                               "scales": [1.0]},
                         "resnet50+gcn": None, "resnet50+gcn_br": None, "resnet50_gcn+baseline": None,
                         "resnet50_gcn+gcn": None, "resnet50_gcn+gcn_br": None},
        "chance_miou": 11.0, "missing": ["pretrain resnet50_gcn"],
    }
    md = table_markdown(record)
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
             if line.startswith("| ") and "---" not in line}
    assert lines["ImageNet cls top-5 error (%)"] == ["12.3", "7.7", "–", "7.9"]
    assert lines["Seg. score, Baseline (mIoU %)"] == ["60.0", "65.7", "–", "71.2"]
    assert lines["Seg. score, GCN (mIoU %)"] == ["–", "", "–", ""]  # the paper's Table 6 has no GCN row
    assert lines["Baseline: boundary / internal acc. (%)"][0] == "50.0 / 90.0"
    assert "Chance (background everywhere) on the same split: mIoU 11.0%" in md
    assert "Not finished yet (shown as –): pretrain resnet50_gcn." in md


def _tiny_config(output: Path, backbones=BACKBONES) -> CompareConfig:
    return CompareConfig(output=str(output), backbones=list(backbones), heads=list(HEADS),
                         pretrain=StageConfig(str(ROOT / "configs/pretrain/tiny_cpu.yaml")),
                         finetune=StageConfig(str(ROOT / "configs/segmentation/tiny_cpu.yaml")))


def test_recipe_drift_names_changed_keys_and_ignores_per_job_ones(tmp_path: Path) -> None:
    import yaml

    run = next(r for r in plan(_tiny_config(tmp_path)) if r.kind == "finetune")
    planned = {"optim": {"lr": 0.5, "momentum": 0.9}, "run": {"dir": "/elsewhere"}, "data": {"num_workers": 4},
               "model": {"pretrained": "/moved/final.pth", "scales": (1.0, 2.0)}}
    assert recipe_drift(run, planned) == []  # nothing recorded yet: a new run
    run.dir.mkdir(parents=True)
    recorded = {"optim": {"lr": 0.01, "momentum": 0.9}, "run": {"dir": str(run.dir)}, "data": {"num_workers": 0},
                "model": {"pretrained": "/old/final.pth", "scales": [1.0, 2.0]}, "train": {"device": "cpu"}}
    (run.dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert recipe_drift(run, planned) == ["optim.lr: 0.01 -> 0.5"]


def test_sbatch_jobs_depend_on_their_own_backbone_and_queued_jobs_are_reused(
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
    cfg = _tiny_config(tmp_path / "t6")
    runs = plan(cfg)
    ids = submit_sbatch(cfg, runs, ["-m", "experiments.compare", "--collect"])
    by_name = {a[0].removeprefix("--job-name="): a for a in submitted}
    pre = {b: ids[str(tmp_path / "t6" / "pretrain" / b)] for b in BACKBONES}
    for b in BACKBONES:
        assert not any(a.startswith("--dependency") for a in by_name[f"lkm-pretrain-{b}"])
        assert "slurm/imagenet_pretrain.sh" in by_name[f"lkm-pretrain-{b}"]
        for h in HEADS:
            args = by_name[f"lkm-finetune-{b}-{h}"]
            assert f"--dependency=afterok:{pre[b]}" in args and "slurm/segmentation_finetune.sh" in args
            assert "--signal=USR1@300" in args and "--requeue" in args  # checkpoint and requeue on the warning
    collect = by_name["lkm-collect"]
    stage_ids = [ids[str(r.dir)] for r in runs]
    assert f"--dependency=afterok:{':'.join(stage_ids)}" in collect and collect[-1].startswith("--wrap=cd ")
    assert not any(a.startswith(("--signal", "--requeue")) for a in collect)
    assert json.loads((tmp_path / "t6" / "jobs.json").read_text()) == ids

    # a second call: the pretraining of the first backbone is still queued, the rest is not
    queued.add(pre[BACKBONES[0]])
    submitted.clear()
    ids2 = submit_sbatch(cfg, runs, ["-m", "experiments.compare", "--collect"])
    assert ids2[str(runs[0].dir)] == pre[BACKBONES[0]] and f"job {pre[BACKBONES[0]]} still queued, reused" in \
        capsys.readouterr().out
    assert [a[0] for a in submitted].count(f"--job-name=lkm-pretrain-{BACKBONES[0]}") == 0
    ft = next(a for a in submitted if a[0] == f"--job-name=lkm-finetune-{BACKBONES[0]}-{HEADS[0]}")
    assert f"--dependency=afterok:{pre[BACKBONES[0]]}" in ft  # waits for the reused job


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_launcher_runs_the_matrix_with_dependencies(slurm_cluster: dict, shapes_data: dict[str, Path],
                                                           tmp_path: Path) -> None:
    out = tmp_path / "t6"
    overrides = tiny_overrides(shapes_data, out, backbones=["resnet10t"]) + [
        "figures.vrf_images=1",
        *[f"launch.{s}={{nodes: 1, tasks_per_node: 1, gpus_per_node: 0, cpus_per_task: 1, time: '00:20:00'}}"
          for s in ("pretrain", "finetune", "collect")]]
    env = {**os.environ, **slurm_cluster}
    proc = subprocess.run([sys.executable, "-m", "experiments.compare", "--launcher", "sbatch", "--wait",
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = json.loads((out / "jobs.json").read_text())
    pre = jobs[str(out / "pretrain" / "resnet10t")]
    assert re.search(rf"fine-tune resnet10t \+ baseline: job \d+ \(after {pre}\)", proc.stdout), proc.stdout
    assert "collect: job" in proc.stdout and "# Table 6" in proc.stdout
    record = json.loads((out / "table6.json").read_text())
    assert record["missing"] == [] and record["segmentation"]["resnet10t+gcn_br"]["miou"] > 0
    logs = sorted(p.name for p in (out / "logs").glob("*.out"))
    assert any(n.startswith("lkm-pretrain-resnet10t-") for n in logs)
    assert any(n.startswith("lkm-collect-") for n in logs)
    # everything finished: a second call submits only the collect job
    proc = subprocess.run([sys.executable, "-m", "experiments.compare", "--launcher", "sbatch", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("finished before, reused") == 3, proc.stdout + proc.stderr
    collect_id = re.search(r"collect: job (\d+)", proc.stdout).group(1)
    subprocess.run(["scancel", collect_id], capture_output=True)


def test_demo_verdict_compares_every_network_with_chance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from experiments.demo import verdict

    record = {"chance_miou": 12.0, "segmentation": {"resnet50+baseline": {"miou": 30.0},
                                                    "resnet50+gcn_br": {"miou": 80.0}}}
    (tmp_path / "table6.json").write_text(json.dumps(record))
    assert verdict(tmp_path) is True  # the baseline head may stay low; every GCN + BR network must learn
    out = capsys.readouterr().out
    assert "resnet50+gcn_br" in out and "6.7x chance" in out and "learned" in out and "NOT above chance" in out
    record["segmentation"]["resnet50+gcn_br"]["miou"] = 25.0  # above chance, but not by 2x
    (tmp_path / "table6.json").write_text(json.dumps(record))
    assert verdict(tmp_path) is False
    record["segmentation"]["resnet50+gcn_br"] = None  # not finished
    (tmp_path / "table6.json").write_text(json.dumps(record))
    assert verdict(tmp_path) is False and "not finished" in capsys.readouterr().out
