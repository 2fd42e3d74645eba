"""The rehearsal (``python -m experiments.compare --rehearse``): the plan cut short, preempted and resumed, its own
folder, and the table of what ran with the full plan's cost; locally here, on the local SLURM cluster in
test_slurm_rehearsal.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from compare_fixtures import tiny_overrides, write_shapes_data
from hangs import ROOT, run_watched

from engine.config import load_config
from experiments.compare import CompareConfig, plan
from experiments.compare.rehearse import MARKER, planned_images, rehearsal_config, report_markdown, stage_events

REHEARSE = ["rehearse.steps=4", "rehearse.preempt_at=2", "rehearse.images=3"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_shapes_data(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def rehearsed(shapes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("plan") / "t6"
    overrides = tiny_overrides(shapes, out, backbones=["resnet10t"], heads=["baseline", "gcn_br"], seeds=[0, 1],
                               pretrain_seeds=[0, 1]) + REHEARSE
    done = run_watched([sys.executable, "-m", "experiments.compare", "--rehearse", *overrides], cwd=ROOT)
    return {"out": out, "done": done, "overrides": overrides,
            "rehearsal": out.with_name("t6-rehearsal")}


@pytest.mark.slow
def test_rehearsal_runs_every_stage_cut_short_preempted_and_resumed(rehearsed: dict) -> None:
    done = rehearsed["done"]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    r = rehearsed["rehearsal"]
    assert not rehearsed["out"].exists()  # the real output is not touched
    assert (r / MARKER).exists() and (r / "table6.md").read_text().startswith("> **Rehearsal**")
    rep = json.loads((r / "rehearsal.json").read_text())
    assert [s["stage"] for s in rep["stages"]] == ["pretrain resnet10t", "fine-tune resnet10t + baseline",
                                                    "fine-tune resnet10t + gcn_br"]
    for s in rep["stages"]:
        assert s["events"] == "finished; preempted, resumed", s
        assert s["img_per_s_per_process"] > 0 and 0 <= s["data_wait"] <= 1 and s["processes"] == 1
        assert s["planned_runs"] == 2 and s["planned_hours"] > 0  # two seeds of each in the real plan
    assert rep["total_hours"] == pytest.approx(sum(s["planned_hours"] for s in rep["stages"]))
    assert "| pretrain resnet10t | 1 | finished; preempted, resumed |" in done.stdout
    assert "Estimated cost of the full plan" in done.stdout and "process-hours" in done.stdout
    # each stage really was cut: one seed, 4 steps, 3 validation images
    assert sorted(p.name for p in (r / "finetune" / "resnet10t_baseline").iterdir()) == ["seed0"]
    metrics = (r / "pretrain" / "resnet10t" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in metrics if '"train"' in line) == 4
    record = json.loads((r / "table6.json").read_text())
    assert record["segmentation"]["resnet10t+baseline"]["runs"]["0"]["images"] == 3


@pytest.mark.slow
def test_a_real_run_refuses_a_rehearsal_folder(rehearsed: dict, compare_main) -> None:
    if rehearsed["done"].returncode != 0:
        pytest.skip("the rehearsal itself failed (see the test above)")
    overrides = [o for o in rehearsed["overrides"] if not o.startswith(("output=", "rehearse."))]
    proc = compare_main("--dry-run", *overrides, f"output={rehearsed['rehearsal']}")
    assert proc.returncode == 2 and MARKER in proc.stderr and "its own output" in proc.stderr


@pytest.fixture
def compare_main(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    import subprocess

    from experiments.compare import main

    monkeypatch.chdir(ROOT)

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return call


def test_rehearsal_config_cuts_every_stage_and_keeps_the_launch(tmp_path: Path) -> None:
    cfg = load_config(CompareConfig, ROOT / "configs/table6.yaml", [f"output={tmp_path / 'runs'}"])
    r = rehearsal_config(cfg)
    assert Path(r.output) == tmp_path / "runs-rehearsal" and r.seeds == [0] and r.pretrain_seeds == [0]
    assert r.launch == cfg.launch and r.backbones == cfg.backbones and r.heads == cfg.heads
    assert "train.steps_per_epoch=40" in r.pretrain.overrides and "run.preempt_at_step=15" in r.pretrain.overrides
    assert "train.iterations=40" in r.finetune.overrides and "eval.max_images=500" in r.finetune.overrides
    assert r.evaluate.max_images == 500 and cfg.evaluate.max_images == 0  # the real config is left alone
    runs = plan(r)
    assert len(runs) == 6 and all(str(run.dir).startswith(r.output) for run in runs)


def test_planned_images_follow_progressive_resizing_and_the_global_batch(tmp_path: Path) -> None:
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    beton.with_suffix(".json").write_text(json.dumps({"num_images": 1_281_167}))
    cfg = load_config(CompareConfig, ROOT / "configs/table6.yaml",
                      [f"output={tmp_path / 'runs'}", f"pretrain.overrides=[data.train={beton}, data.val={beton}]"])
    pretrain, finetune = plan(cfg)[0], plan(cfg)[2]
    images = planned_images(pretrain)
    per_epoch = 1_281_167 // 4096 * 4096
    # configs/pretrain/resnet50_16_epochs.yaml: 160 px to epoch 11 (start_ramp), 192 from 12 on (the ramp's 176
    # rounds to a multiple of 32), 16 epochs
    assert images == [(per_epoch, 160)] * 12 + [(per_epoch, 192)] * 4
    assert planned_images(finetune) == [(20000 * 64, 512)]  # voc_stage2: 20k iterations of 64 crops of 512 px

    from experiments.compare.rehearse import _hours

    speed = {"img_per_s_per_process": 1000.0, "resolution": 160}
    expected = per_epoch * (12 + 4 * 1.2 ** 2) / 1000 / 3600  # 192 px: 1.44 x the pixels of 160
    assert _hours(images, speed) == pytest.approx(expected)


def test_report_names_what_did_not_happen(tmp_path: Path) -> None:
    from experiments.compare.plan import Run

    run = Run("finetune", "resnet50", "baseline", 0, tmp_path / "r", tmp_path / "c.yaml", [])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "train.log").write_text("... run.preempt_at_step=3: acting as if SLURM's warning signal ...\n")
    assert stage_events(run) == "did not finish; preempted, NOT resumed"
    rep = {"launcher": "sbatch", "steps": 4, "preempt_at": 2, "images": 3, "seed": 0, "output": "o", "real_output":
           "r", "unit": "GPU", "collect": "no table6.json", "total_hours": None,
           "stages": [{"stage": "pretrain resnet50", "processes": 16, "events": "did not finish",
                       "img_per_s_per_process": None, "data_wait": None, "mfu": None, "planned_runs": 3,
                       "planned_hours": None}]}
    md = report_markdown(rep)
    assert "| pretrain resnet50 | 16 | did not finish | – | – | n/a | 3 | – |" in md
    assert "Estimated cost of the full plan: unknown" in md and "GPU-hours" in md
