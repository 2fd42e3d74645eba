"""Table 6 end to end: ResNet50 vs ResNet50-GCN, pretrained, fine-tuned, evaluated, tabled and drawn.

    python -m experiments.compare --config configs/table6.yaml                    # run what is missing
    python -m experiments.compare --config configs/table6.yaml launch.launcher=sbatch --wait
    python -m experiments.compare --config configs/table6.yaml --collect          # gather only
    python -m experiments.compare --config configs/table6.yaml --dry-run          # show the plan

The matrix is {backbones} x {heads} (Table 6: resnet50, resnet50_gcn x baseline, gcn_br). Each
backbone is pretrained once (``backbone.train``), each (backbone, head) pair is fine-tuned from that
backbone's ``final.pth`` (``segmentation/finetune.py``), each fine-tune is evaluated
(``segmentation.evaluate``), and the results are collected. Everything lives under ``output``::

    pretrain/<backbone>/            a pretraining run directory (config.yaml, metrics.jsonl, final.pth)
    finetune/<backbone>_<head>/     a fine-tuning run directory, + eval_<split>*.json, predictions/
    table6.md, table6.json          the table (ours beside the paper's) and every figure with its source
    table6.png                      the same as a bar chart
    figure6_<backbone>.png          input | one column per head | ground truth, per image (Figure 6)
    figure3/receptive_field.png     valid receptive field of every fine-tuned network (Figure 3)
    logs/                           SLURM job logs; jobs.json: the job ids submitted per run

Finished runs (a ``final.pth``) are reused, unfinished ones resume from their last checkpoint, and
a run directory whose recorded config differs from the planned one is an error that names the
differing keys (rather than a table mixing two recipes). Launchers: ``local`` runs the stages one
after the other in subprocesses; ``sbatch`` submits one job per run with ``slurm/imagenet_pretrain.sh``
and ``slurm/segmentation_finetune.sh`` (``--dependency=afterok``: a fine-tune starts when its
backbone's pretraining has finished), then a collect job (``--collect``) after all of them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, describe_keys, load_config, to_dict
from engine.logs import read_metrics, setup_logging
from experiments.figures import DISPLAY

log = logging.getLogger("experiments.compare")

ROOT = Path(__file__).resolve().parents[1]

# Peng et al., Table 6 (%): ImageNet top-5 error (224 centre crop of 256), VOC 2012 val mIoU.
PAPER_TABLE6 = {
    "imagenet_top5_error": {"resnet50": 7.7, "resnet50_gcn": 7.9},
    "miou_baseline": {"resnet50": 65.7, "resnet50_gcn": 71.2},
    "miou_gcn_br": {"resnet50": 72.3, "resnet50_gcn": 72.5},
}
# Keys a launcher sets per job, that only change logging, or paths that move with the output folder:
# not part of a run's recipe.
NOT_RECIPE = {"data.num_workers", "run.log_every_s", "run.check_every_steps", "train.device", "run.dir",
              "model.pretrained"}


# ---------------------------------------------------------------------------------------------
# Config schema
# ---------------------------------------------------------------------------------------------
@dataclass
class StageConfig:
    config: str = ""  # the stage's YAML; {backbone} is replaced by the backbone's name
    overrides: list[str] = field(default_factory=list)  # key=value for that stage (data paths, ...)


@dataclass
class EvaluateConfig:
    ms: bool = False  # multi-scale inference (segmentation.evaluate --ms)
    flip: bool = False
    boundary_width: int = 5
    max_images: int = 0  # 0: the whole validation split


@dataclass
class FiguresConfig:
    figure6_images: int = 4  # rows of Figure 6 (the first N validation images)
    vrf_images: int = 4  # images whose valid receptive field is measured (Figure 3)
    vrf_scales: list[float] = field(default_factory=lambda: [1.0, 2.0])  # 2.0: the paper's (B)
    vrf_share: float = 0.9  # share of the gradient mass the VRF area holds


@dataclass
class ResourceConfig:
    nodes: int = 1
    tasks_per_node: int = 8  # one per GPU
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    time: str = "24:00:00"
    mem_gb: int = 0  # 0: the partition's default


@dataclass
class LaunchConfig:
    launcher: Literal["local", "sbatch"] = "local"
    partition: str = ""
    account: str = ""
    qos: str = ""
    sbatch_args: list[str] = field(default_factory=list)  # added to every sbatch call
    pretrain: ResourceConfig = field(default_factory=lambda: ResourceConfig(2, 8, 8, 12, "24:00:00"))
    finetune: ResourceConfig = field(default_factory=lambda: ResourceConfig(1, 8, 8, 8, "12:00:00"))
    collect: ResourceConfig = field(default_factory=lambda: ResourceConfig(1, 1, 1, 8, "02:00:00"))


@dataclass
class CompareConfig:
    output: str = "runs/table6"
    backbones: list[str] = field(default_factory=lambda: ["resnet50", "resnet50_gcn"])
    heads: list[str] = field(default_factory=lambda: ["baseline", "gcn_br"])  # add gcn for Figure 6's GCN column
    pretrain: StageConfig = field(default_factory=lambda: StageConfig("configs/pretrain/{backbone}_16_epochs.yaml"))
    finetune: StageConfig = field(default_factory=lambda: StageConfig("configs/segmentation/voc_stage2.yaml"))
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> None:
        from backbone.models import check_model_name
        from segmentation.heads import HEADS

        if not self.backbones or not self.heads:
            raise ConfigError("backbones and heads must each name at least one entry")
        for b in self.backbones:
            try:
                check_model_name(b)
            except ValueError as e:
                raise ConfigError(f"backbones: {e}") from e
        bad = [h for h in self.heads if h not in HEADS]
        if bad:
            raise ConfigError(f"heads: {bad} are not heads; choose from {', '.join(HEADS)}")
        for key in ("backbones", "heads"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ConfigError(f"{key} lists an entry twice: {values}")
        for key in ("pretrain", "finetune"):
            if not getattr(self, key).config:
                raise ConfigError(f"{key}.config is not set: give the stage's YAML config")


class StageFailed(RuntimeError):
    """A stage ended with an error; finished runs stay and are reused on the next call."""


# ---------------------------------------------------------------------------------------------
# The plan: one Run per pretraining and per fine-tune
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    kind: Literal["pretrain", "finetune"]
    backbone: str
    head: str | None
    dir: Path
    config: Path  # the stage's YAML
    overrides: list[str]  # stage overrides, the matrix's keys last (they win)
    after: list[Run] = field(default_factory=list)
    _stage: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"pretrain {self.backbone}" if self.kind == "pretrain" else f"fine-tune {self.backbone} + {self.head}"

    @property
    def final(self) -> Path:
        return self.dir / "final.pth"

    @property
    def finished(self) -> bool:
        return self.final.exists()

    def command(self, python: str = sys.executable) -> list[str]:
        entry = [python, "-m", "backbone.train"] if self.kind == "pretrain" else \
            [python, str(ROOT / "segmentation" / "finetune.py")]
        return [*entry, "--config", str(self.config), *self.overrides]

    def stage_config(self) -> Any:
        """The resolved config this run trains with (raises ConfigError naming the stage); read once."""
        if self._stage is not None:
            return self._stage
        if self.kind == "pretrain":
            from backbone.train import PretrainConfig as cls
        else:
            from segmentation.finetune import FinetuneConfig as cls
        try:
            self._stage = load_config(cls, self.config, self.overrides)
        except ConfigError as e:
            raise ConfigError(f"{self.name}: {e}") from e
        return self._stage


def _stage_config_path(template: str, backbone: str) -> Path:
    path = Path(template.replace("{backbone}", backbone)).resolve()
    if not path.is_file():
        raise ConfigError(f"stage config {path} (from {template!r}) does not exist")
    return path


def plan(cfg: CompareConfig) -> list[Run]:
    """Pretraining runs first, then the fine-tunes, each depending on its backbone's pretraining."""
    out = Path(cfg.output).resolve()
    runs: list[Run] = []
    for b in cfg.backbones:
        d = out / "pretrain" / b
        runs.append(Run("pretrain", b, None, d, _stage_config_path(cfg.pretrain.config, b),
                        [*cfg.pretrain.overrides, f"model.name={b}", f"run.dir={d}"]))
    pretrained = {r.backbone: r for r in runs}
    for b in cfg.backbones:
        for h in cfg.heads:
            d = out / "finetune" / f"{b}_{h}"
            runs.append(Run("finetune", b, h, d, _stage_config_path(cfg.finetune.config, b),
                            [*cfg.finetune.overrides, f"model.backbone={b}", f"model.head={h}",
                             f"model.pretrained={pretrained[b].final}", "model.init_from=", f"run.dir={d}"],
                            after=[pretrained[b]]))
    return runs


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def recipe_drift(run: Run, planned: dict[str, Any]) -> list[str]:
    """Keys whose value in ``run.dir/config.yaml`` (what the run was started with) differs from the plan."""
    recorded_path = run.dir / "config.yaml"
    if not recorded_path.exists():
        return []
    recorded = _flat(yaml.safe_load(recorded_path.read_text()) or {})
    wanted = _flat(planned)
    return [f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(recorded) | set(wanted))
            if k not in NOT_RECIPE and recorded.get(k) != wanted.get(k)]


def check_plan(runs: Sequence[Run], data: bool = True) -> None:
    """Every stage config resolves, its data is there, and no finished run had another recipe."""
    from segmentation.datasets import build_samples

    seen = set()
    for run in runs:
        stage = run.stage_config()
        drift = recipe_drift(run, to_dict(stage))
        if drift:
            raise ConfigError(
                f"{run.name}: {run.dir} was started with another recipe ({'; '.join(drift[:6])}"
                f"{'; ...' if len(drift) > 6 else ''}). Move or delete that folder to rerun it, or set "
                "output= to a new folder")
        if not data:
            continue
        if run.kind == "pretrain":
            from backbone.train import check_inputs

            try:
                check_inputs(stage)  # .beton files, model name, checkpoint compatibility
            except ConfigError as e:
                raise ConfigError(f"{run.name}: {e}") from e
        else:
            d = stage.data
            for split in (d.train_split, d.val_split):
                if (key := (d.dataset, split, d.root, d.sbd_root)) not in seen:
                    seen.add(key)
                    build_samples(d.dataset, split, d.root, d.sbd_root or None)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def run_local(runs: Sequence[Run]) -> None:
    """Each unfinished run in turn, as a subprocess whose output (progress bars, logs) is shown as is."""
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.name}"
        if run.finished:
            print(f"{head}: finished before, reused ({run.final})", flush=True)
            continue
        print(f"{head} -> {run.dir}" + (" (resuming)" if run.dir.exists() else ""), flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(run.command()).returncode
        if rc != 0 or not run.finished:
            raise StageFailed(f"{run.name} failed (exit {rc}); its log: {run.dir / 'train.log'}. Fix the cause and "
                              "run the same command again: finished runs are reused and this one resumes")
        print(f"{head}: done in {time.monotonic() - t0:.0f} s", flush=True)


def _resources(res: ResourceConfig, launch: LaunchConfig) -> list[str]:
    args = [f"--nodes={res.nodes}", f"--ntasks-per-node={res.tasks_per_node}", f"--gpus-per-node={res.gpus_per_node}",
            f"--cpus-per-task={res.cpus_per_task}", f"--time={res.time}"]
    if res.mem_gb:
        args.append(f"--mem={res.mem_gb}G")
    for key in ("partition", "account", "qos"):
        if getattr(launch, key):
            args.append(f"--{key}={getattr(launch, key)}")
    return args + list(launch.sbatch_args)


def _queued(job_id: str) -> bool:
    """The job is still pending or running (squeue knows it and it has not ended)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    return out in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING")


def _sbatch(args: list[str]) -> str:
    env = {**os.environ, "PYTHON": sys.executable}  # the job scripts run $PYTHON (this venv's)
    proc = subprocess.run(["sbatch", "--parsable", "--kill-on-invalid-dep=yes", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}\n"
                          f"  sbatch {shlex.join(args)}")
    return proc.stdout.strip().split(";")[0]


def submit_sbatch(cfg: CompareConfig, runs: Sequence[Run], collect_argv: Sequence[str], dry_run: bool = False) \
        -> dict[str, str]:
    """One job per unfinished run (fine-tunes after their pretraining), then the collect job after all.

    Jobs still queued from an earlier call for the same run directory are reused, not submitted again.
    Returns {run dir or 'collect': job id}.
    """
    out = Path(cfg.output).resolve()
    logs = out / "logs"
    jobs_file = out / "jobs.json"
    known = json.loads(jobs_file.read_text()) if jobs_file.exists() else {}
    ids: dict[str, str] = {}
    for run in runs:
        key = str(run.dir)
        if run.finished:
            print(f"{run.name}: finished before, reused ({run.final})")
            continue
        if not dry_run and key in known and _queued(known[key]):
            ids[key] = known[key]
            print(f"{run.name}: job {known[key]} still queued, reused")
            continue
        deps = [ids[str(d.dir)] for d in run.after if str(d.dir) in ids]
        res = cfg.launch.pretrain if run.kind == "pretrain" else cfg.launch.finetune
        script = "slurm/imagenet_pretrain.sh" if run.kind == "pretrain" else "slurm/segmentation_finetune.sh"
        job_name = f"lkm-{run.kind}-{run.backbone}" + (f"-{run.head}" if run.head else "")
        args = [f"--job-name={job_name}", f"--output={logs}/%x-%j.out", *_resources(res, cfg.launch),
                *([f"--dependency=afterok:{':'.join(deps)}"] if deps else []), script, str(run.config), *run.overrides]
        ids[key] = "<dry-run>" if dry_run else _sbatch(args)
        print(f"{run.name}: job {ids[key]}" + (f" (after {', '.join(deps)})" if deps else "")
              + (f"\n  sbatch {shlex.join(args)}" if dry_run else ""))
    deps = list(ids.values())
    wrap = f"cd {shlex.quote(str(Path.cwd()))} && {shlex.join([sys.executable, *collect_argv])}"
    args = ["--job-name=lkm-collect", f"--output={logs}/%x-%j.out", *_resources(cfg.launch.collect, cfg.launch),
            *([f"--dependency=afterok:{':'.join(deps)}"] if deps else []), f"--wrap={wrap}"]
    if not dry_run:
        logs.mkdir(parents=True, exist_ok=True)
        ids["collect"] = _sbatch(args)
        jobs_file.write_text(json.dumps({**known, **ids}, indent=1))
    else:
        ids["collect"] = "<dry-run>"
    print(f"collect: job {ids['collect']}" + (f" (after {', '.join(deps)})" if deps else "")
          + (f"\n  sbatch {shlex.join(args)}" if dry_run else f"; logs in {logs}"))
    return ids


def wait_for_jobs(ids: dict[str, str], logs: Path, poll_s: float = 5.0) -> None:
    """Until none of the jobs is queued any more, with a line whenever a job starts or ends."""
    shown = None
    while True:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(ids.values()), "-o", "%i %T %j"], capture_output=True,
                             text=True).stdout.split("\n")
        jobs = [line.split() for line in out if len(line.split()) == 3]
        if not jobs:
            return
        running = [f"{j} ({name}, log {logs / f'{name}-{j}.out'})" for j, state, name in jobs if state == "RUNNING"]
        state = (tuple(running), len(jobs))
        if state != shown:
            print(f"[{time.strftime('%H:%M:%S')}] {len(jobs)} SLURM job(s) left; running: "
                  f"{'; '.join(running) or 'none yet'}", flush=True)
            shown = state
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# Collect: evaluation, table, figures
# ---------------------------------------------------------------------------------------------
def eval_json(run: Run, ev: EvaluateConfig, split: str) -> Path:
    suffix = ("_ms" if ev.ms else "") + ("_flip" if ev.flip else "")
    return run.dir / f"eval_{split}{suffix}.json"


def evaluate_runs(runs: Sequence[Run], ev: EvaluateConfig) -> dict[str, Path]:
    """Evaluate every finished fine-tune without a (newer) score file; {run dir: JSON}."""
    from segmentation.evaluate import main as evaluate_main

    done = {}
    for run in runs:
        if run.kind != "finetune" or not run.finished:
            continue
        split = run.stage_config().data.val_split
        out = eval_json(run, ev, split)
        if not out.exists() or out.stat().st_mtime < run.final.stat().st_mtime:
            print(f"evaluate {run.backbone} + {run.head} -> {out}", flush=True)
            argv = ["--checkpoint", str(run.final), "--out", str(out), "--save-png", str(run.dir / "predictions"),
                    "--boundary-width", str(ev.boundary_width), "--max-images", str(ev.max_images),
                    *(["--ms"] if ev.ms else []), *(["--flip"] if ev.flip else [])]
            # in this process (no second start-up of torch and timm per run); the per-class table goes to a log
            report = out.with_suffix(".txt")
            with report.open("w") as f, contextlib.redirect_stdout(f):
                rc = evaluate_main(argv)
            if rc != 0:
                raise StageFailed(f"evaluating {run.final} failed (exit {rc}); the error is above, the report in "
                                  f"{report}")
        done[str(run.dir)] = out
    return done


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def pretrain_record(run: Run) -> dict[str, Any] | None:
    """The last validation of a finished pretraining run, or None."""
    metrics = run.dir / "metrics.jsonl"
    if not run.finished or not metrics.exists():
        return None
    vals = [r for r in read_metrics(metrics) if r.get("kind") == "val"]
    if not vals:
        return None
    v = vals[-1]
    return {"top5_error": _pct(v["top5_error"]), "top1_error": _pct(1 - v["top1"]), "images": v.get("images"),
            "epoch": v.get("epoch"), "source": f"{metrics} (validation after epoch {v.get('epoch')})"}


def finetune_record(run: Run, ev: EvaluateConfig) -> dict[str, Any] | None:
    if not run.finished:
        return None
    out = eval_json(run, ev, run.stage_config().data.val_split)
    if not out.exists():
        return None
    s = json.loads(out.read_text())
    return {"miou": _pct(s["miou"]), "pixel_acc": _pct(s["pixel_acc"]), "boundary_acc": _pct(s["boundary_acc"]),
            "internal_acc": _pct(s["internal_acc"]), "images": s["images"], "split": s["split"],
            "scales": s["scales"], "flip": s["flip"], "source": str(out)}


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


def gather(cfg: CompareConfig, runs: Sequence[Run]) -> dict[str, Any]:
    """Every figure of the table with where it came from (JSON-able)."""
    pre = {r.backbone: pretrain_record(r) for r in runs if r.kind == "pretrain"}
    seg = {(r.backbone, r.head): finetune_record(r, cfg.evaluate) for r in runs if r.kind == "finetune"}
    finetunes = [r for r in runs if r.kind == "finetune"]
    return {
        "backbones": list(cfg.backbones), "heads": list(cfg.heads),
        "pretrain": pre,
        "segmentation": {f"{b}+{h}": rec for (b, h), rec in seg.items()},
        "chance_miou": chance_miou(finetunes[0]) if finetunes else None,
        "paper": PAPER_TABLE6,
        "missing": [r.name for r in runs if not r.finished],
        "output": str(Path(cfg.output).resolve()),
    }


def _cell(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, dict[str, float | None]]]:
    """(row label, paper key or '', {backbone: value}) in Table 6's order, then our extra rows."""
    bs, heads = result["backbones"], result["heads"]
    pre, seg = result["pretrain"], result["segmentation"]

    def pick(b: str, h: str, key: str) -> float | None:
        rec = seg.get(f"{b}+{h}")
        return rec[key] if rec else None

    rows = [("ImageNet cls top-5 error (%)", "imagenet_top5_error",
             {b: pre[b]["top5_error"] if pre.get(b) else None for b in bs})]
    for h in heads:
        key = f"miou_{h}" if f"miou_{h}" in PAPER_TABLE6 else ""
        rows.append((f"Seg. score, {DISPLAY.get(h, h)} (mIoU %)", key, {b: pick(b, h, "miou") for b in bs}))
    rows.append(("ImageNet cls top-1 error (%)", "", {b: pre[b]["top1_error"] if pre.get(b) else None for b in bs}))
    for h in heads:
        rows.append((f"{DISPLAY.get(h, h)}: boundary / internal acc. (%)", "",
                     {b: (pick(b, h, "boundary_acc"), pick(b, h, "internal_acc")) for b in bs}))
    return rows


def table_markdown(result: dict[str, Any]) -> str:
    bs = result["backbones"]
    header = "| |" + "".join(f" {DISPLAY.get(b, b)} | paper |" for b in bs)
    lines = ["# Table 6: ResNet50 vs ResNet50-GCN", "", header, "|---|" + "---:|---:|" * len(bs)]
    for label, key, values in table_rows(result):
        cells = []
        for b in bs:
            v = values[b]
            ours = f"{_cell(v[0])} / {_cell(v[1])}" if isinstance(v, tuple) else _cell(v)
            paper = PAPER_TABLE6.get(key, {}).get(b) if key else None
            cells.append(f" {ours} | {'' if paper is None else paper} |")
        lines.append(f"| {label} |" + "".join(cells))
    lines += ["", "Ours: ImageNet top-5 error of the last validation of each pretraining run (centre crop 224/256, "
              "flip-averaged); mIoU over the fine-tunes' validation split ("
              + ("multi-scale" if any((r or {}).get("scales", [1]) != [1.0] for r in result["segmentation"].values())
                 else "single scale") + "). Paper: Peng et al., Table 6 (ImageNet; PASCAL VOC 2012 val)."]
    if result.get("chance_miou") is not None:
        lines.append(f"Chance (background everywhere) on the same split: mIoU {result['chance_miou']:.1f}%.")
    if result["missing"]:
        lines.append("Not finished yet (shown as –): " + ", ".join(result["missing"]) + ".")
    lines.append("Every figure's source file is in table6.json.")
    return "\n".join(lines) + "\n"


def collect(cfg: CompareConfig, runs: Sequence[Run]) -> dict[str, Any]:
    """Evaluate what needs it, then write table6.md/.json/.png and the figures; returns the JSON record."""
    import torch

    from experiments import figures

    threads = torch.get_num_threads()
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    evaluate_runs(runs, cfg.evaluate)
    result = gather(cfg, runs)
    torch.set_num_threads(threads)  # importing ffcv (the pretraining checks) sets it to 1
    written = {"table": out / "table6.md", "json": out / "table6.json"}
    written["table"].write_text(table_markdown(result))
    written["chart"] = figures.table_chart(result, out / "table6.png")
    finished = [r for r in runs if r.kind == "finetune" and r.finished]
    for b in cfg.backbones:
        mine = [r for r in finished if r.backbone == b]
        if mine:
            grid = out / f"figure6_{b}.png"
            written[f"figure6_{b}"] = figures.prediction_grid(mine, grid, cfg.figures.figure6_images)
    if finished and cfg.figures.vrf_images > 0:
        written["figure3"] = figures.receptive_field_figure(finished, out / "figure3", cfg.figures)
    result["files"] = {k: str(v) for k, v in written.items() if v is not None}
    written["json"].write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:3]),
        epilog="config keys (section.key=default):\n" + describe_keys(CompareConfig))
    p.add_argument("--config", type=Path, default=None, help="YAML config (configs/table6.yaml, configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. launch.launcher=sbatch")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: evaluate finished fine-tunes that have no score yet, write the table/figures")
    p.add_argument("--launcher", choices=("local", "sbatch"), default=None, help="shorthand for launch.launcher=")
    p.add_argument("--wait", action="store_true", help="sbatch: wait for the jobs, then print the table")
    p.add_argument("--dry-run", action="store_true", help="print the plan (commands or sbatch lines), run nothing")
    p.add_argument("--no-check", action="store_true",
                   help="skip the data checks on this machine (paths only visible on the cluster's nodes)")
    return p


def print_summary(result: dict[str, Any]) -> None:
    print(Path(result["files"]["table"]).read_text())
    print("files:")
    for key, path in result["files"].items():
        print(f"  {key:<22} {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"launch.launcher={args.launcher}"] if args.launcher else [])
    setup_logging()
    try:
        cfg = load_config(CompareConfig, args.config, overrides)
        runs = plan(cfg)
        check_plan(runs, data=not (args.no_check or args.collect))
        if args.dry_run and cfg.launch.launcher == "local":
            for run in runs:
                state = "finished, reused" if run.finished else "to run"
                print(f"{run.name} ({state}):\n  {shlex.join(run.command())}")
            return 0
        if not args.collect and cfg.launch.launcher == "sbatch":
            config = [] if args.config is None else ["--config", str(args.config.resolve())]
            collect_argv = ["-m", "experiments.compare", *config, "--collect", *overrides]
            ids = submit_sbatch(cfg, runs, collect_argv, dry_run=args.dry_run)
            if args.dry_run:
                return 0
            if not args.wait:
                print(f"the table appears in {Path(cfg.output).resolve() / 'table6.md'} when job {ids['collect']} "
                      "ends; or run again with --collect at any time")
                return 0
            started = time.time()
            wait_for_jobs(ids, Path(cfg.output).resolve() / "logs")
            table = Path(cfg.output).resolve() / "table6.md"
            if not table.exists() or table.stat().st_mtime < started:
                raise StageFailed(f"the jobs ended without a new table; see the logs in "
                                  f"{Path(cfg.output).resolve() / 'logs'}")
            print_summary(json.loads((Path(cfg.output).resolve() / "table6.json").read_text()))
            return 0
        if not args.collect:
            run_local(runs)
        print_summary(collect(cfg, runs))
    except (ConfigError, CheckpointError, StageFailed, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
