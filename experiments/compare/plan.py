"""The plan: one ``Run`` per pretraining and per fine-tune and seed, and the checks made before anything starts.

``plan`` lays out the matrix under ``output`` (seed by seed: each seed's pretraining runs, then its
fine-tunes, each after its own backbone and seed); ``recipe_drift`` compares a run directory's record
(``config.yaml``, and ``run.json``'s world size and global batch) with what the plan asks for;
``stale_reason`` tells a fine-tune whose backbone weights are no longer the pretraining's ``final.pth``;
``check_plan`` resolves every stage config, refuses a drifted recipe and checks the data.
"""
from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.config import ConfigError, load_config, to_dict
from engine.provenance import file_sha256, flatten, read_run_record
from experiments import ROOT

from .config import CompareConfig, ResourceConfig

__all__ = ["LAUNCHER_KEYS", "Run", "StageFailed", "local_processes", "plan", "not_recipe", "recipe_drift",
           "stale_reason", "move_aside", "check_plan"]

# Keys the launchers set per job besides the stage's own NOT_RECIPE: the run directory (moves with the
# output folder) and the loader workers (the sbatch scripts derive them from --cpus-per-task).
LAUNCHER_KEYS = ("run.dir", "data.num_workers")


class StageFailed(RuntimeError):
    """A stage ended with an error; finished runs stay and are reused on the next call."""


def local_processes(device: str) -> int:
    """Processes the local launcher starts for a run: one per GPU of this machine when there are two or
    more (torchrun), else one (a single GPU, or the CPU; a run configured for the CPU is one process)."""
    if device == "cpu":
        return 1
    import torch

    n = torch.cuda.device_count()
    return n if n >= 2 else 1


@dataclass
class Run:
    kind: Literal["pretrain", "finetune"]
    backbone: str
    head: str | None
    seed: int
    dir: Path
    config: Path  # the stage's YAML
    overrides: list[str]  # stage overrides, the matrix's keys last (they win)
    after: list[Run] = field(default_factory=list)
    launcher: Literal["local", "sbatch"] = "local"
    resources: ResourceConfig = field(default_factory=ResourceConfig)  # the job's, under sbatch
    _stage: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        what = f"pretrain {self.backbone}" if self.kind == "pretrain" else f"fine-tune {self.backbone} + {self.head}"
        return f"{what} (seed {self.seed})"

    @property
    def network(self) -> str:
        """The table's key: ``backbone`` for a pretraining, ``backbone+head`` for a fine-tune."""
        return self.backbone if self.kind == "pretrain" else f"{self.backbone}+{self.head}"

    @property
    def final(self) -> Path:
        return self.dir / "final.pth"

    @property
    def finished(self) -> bool:
        return self.final.exists()

    @property
    def world_size(self) -> int:
        """The processes this run is planned to train on: nodes x tasks per node of its SLURM job, or what
        the local launcher starts on this machine (:func:`local_processes`)."""
        if self.launcher == "sbatch":
            return self.resources.nodes * self.resources.tasks_per_node
        return local_processes(self.stage_config().train.device)

    def describe_world(self) -> str:
        if self.launcher == "sbatch":
            return (f"sbatch: launch.{self.kind} = {self.resources.nodes} node(s) x {self.resources.tasks_per_node} "
                    "task(s)")
        return f"local launcher: {self.world_size} process(es) on this machine"

    def command(self, python: str = sys.executable) -> list[str]:
        """The stage's command line on this machine: one process, or one per GPU through torchrun (the
        sbatch scripts run the same entry points under srun, one task per GPU)."""
        entry = ["-m", "backbone.train"] if self.kind == "pretrain" else [str(ROOT / "segmentation" / "finetune.py")]
        n = self.world_size if self.launcher == "local" else 1
        launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] if n >= 2 \
            else [python]
        return [*launcher, *entry, "--config", str(self.config), *self.overrides]

    def stage_config(self) -> Any:
        """The resolved config this run trains with (raises ConfigError naming the stage); read once."""
        if self._stage is not None:
            return self._stage
        try:
            self._stage = load_config(stage_class(self.kind), self.config, self.overrides)
        except ConfigError as e:
            raise ConfigError(f"{self.name}: {e}") from e
        return self._stage


def stage_class(kind: str) -> type:
    """The stage's config schema (its ``NOT_RECIPE`` names the keys that cannot change a result)."""
    if kind == "pretrain":
        from backbone.train import PretrainConfig

        return PretrainConfig
    from segmentation.finetune import FinetuneConfig

    return FinetuneConfig


def _stage_config_path(template: str, backbone: str) -> Path:
    path = Path(template.replace("{backbone}", backbone)).resolve()
    if not path.is_file():
        raise ConfigError(f"stage config {path} (from {template!r}) does not exist")
    return path


def plan(cfg: CompareConfig) -> list[Run]:
    """Seed by seed: that seed's pretraining runs, then its fine-tunes, each depending on the pretraining of
    its own backbone and seed (``CompareConfig.backbone_seed``). Pretraining seeds that no fine-tune
    uses come first."""
    out = Path(cfg.output).resolve()
    launch = cfg.launch
    pretrained: dict[tuple[str, int], Run] = {}
    for s in cfg.pretrain_seeds:
        for b in cfg.backbones:
            d = out / "pretrain" / b / f"seed{s}"
            pretrained[b, s] = Run("pretrain", b, None, s, d, _stage_config_path(cfg.pretrain.config, b),
                                   [*cfg.pretrain.overrides, f"model.name={b}", f"train.seed={s}", f"run.dir={d}"],
                                   launcher=launch.launcher, resources=launch.pretrain)
    runs = [r for (b, s), r in pretrained.items() if s not in cfg.seeds]
    for s in cfg.seeds:
        runs += [r for (b, ps), r in pretrained.items() if ps == s]
        for b in cfg.backbones:
            backbone = pretrained[b, cfg.backbone_seed(s)]
            for h in cfg.heads:
                d = out / "finetune" / f"{b}_{h}" / f"seed{s}"
                runs.append(Run("finetune", b, h, s, d, _stage_config_path(cfg.finetune.config, b),
                                [*cfg.finetune.overrides, f"model.backbone={b}", f"model.head={h}",
                                 f"model.pretrained={backbone.final}", "model.init_from=", f"train.seed={s}",
                                 f"run.dir={d}"],
                                after=[backbone], launcher=launch.launcher, resources=launch.finetune))
    return runs


def not_recipe(kind: str) -> set[str]:
    """Keys whose change is no recipe change: the stage's ``NOT_RECIPE`` and the launchers' per-job keys."""
    return set(getattr(stage_class(kind), "NOT_RECIPE", ())) | set(LAUNCHER_KEYS)


def recipe_drift(run: Run, planned: dict[str, Any], world_size: int | None = None) -> list[str]:
    """What differs between the run directory's record and the plan: config keys (``config.yaml``, the
    latest attempt's), and from ``run.json`` the world size and the global batch it trained with.

    ``planned`` is the resolved stage config (nested); ``world_size`` the planned process count (None:
    not checked). An empty list for a directory that records nothing yet.
    """
    recorded_path = run.dir / "config.yaml"
    if not recorded_path.exists():
        return []
    recorded = flatten(yaml.safe_load(recorded_path.read_text()) or {})
    wanted = flatten(planned)
    skip = not_recipe(run.kind)
    drift = [f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(recorded) | set(wanted))
             if k not in skip and recorded.get(k) != wanted.get(k)]
    record = read_run_record(run.dir)
    if world_size is not None and record.get("world_size") not in (None, world_size):
        drift.append(f"world size: {record['world_size']} -> {world_size} processes")
    batch = wanted.get("data.global_batch")
    if (record.get("global_batch") not in (None, batch) and batch is not None
            and not any(d.startswith("data.global_batch:") for d in drift)):
        drift.append(f"global batch: {record['global_batch']} -> {batch}")
    return drift


def stale_reason(run: Run) -> str | None:
    """Why a fine-tune's directory holds training from other backbone weights than its pretraining's
    current ``final.pth`` (compared by content, from ``run.json``'s ``pretrained.sha256``); None when it
    does not, or when nothing has been trained there yet."""
    if run.kind != "finetune" or not run.dir.is_dir():
        return None
    trained = run.finished or any(run.dir.glob("checkpoint_*"))
    if not trained:
        return None
    backbone = run.after[0].final
    started_from = (read_run_record(run.dir).get("pretrained") or {}).get("sha256")
    if started_from is None:
        return f"{run.dir / 'run.json'} does not name the backbone weights it started from"
    if not backbone.exists():
        return f"it started from backbone weights {started_from[:12]}, and {backbone} is not there (being retrained?)"
    now = file_sha256(backbone)
    if now != started_from:
        return f"it started from backbone weights {started_from[:12]}, {backbone} is now {now[:12]}"
    return None


def move_aside(run: Run) -> Path:
    """Rename a stale run directory to ``<dir>.stale-<n>`` (the first free n); nothing is deleted."""
    n = 1
    while (target := run.dir.with_name(f"{run.dir.name}.stale-{n}")).exists():
        n += 1
    run.dir.rename(target)
    run._stage = None
    return target


def _check_recipe(run: Run) -> None:
    drift = recipe_drift(run, to_dict(run.stage_config()), run.world_size)
    if drift:
        raise ConfigError(
            f"{run.name}: {run.dir} was started with another recipe ({'; '.join(drift[:6])}"
            f"{'; ...' if len(drift) > 6 else ''}; the plan: {run.describe_world()}). Move or delete that folder "
            "to rerun it, or set output= to a new folder")


def _check_pretrain_inputs(run: Run) -> None:
    from backbone.train import check_inputs

    try:
        check_inputs(run.stage_config())  # .beton files, model name, checkpoint compatibility
    except ConfigError as e:
        raise ConfigError(f"{run.name}: {e}") from e


def _check_finetune_data(run: Run, seen: set[tuple]) -> None:
    """Both splits of the fine-tune's data set can be listed; each (data set, split, folders) once."""
    from segmentation.datasets import build_samples

    d = run.stage_config().data
    for split in (d.train_split, d.val_split):
        if (key := (d.dataset, split, d.root, d.sbd_root)) not in seen:
            seen.add(key)
            build_samples(d.dataset, split, d.root, d.sbd_root or None)


def check_plan(runs: Sequence[Run], data: bool = True, skip_recipe: Collection[Path] = ()) -> None:
    """Every stage config resolves, its data is there, and no run directory (except those in
    ``skip_recipe``: stale ones, moved aside or left out) had another recipe."""
    seen: set[tuple] = set()
    for run in runs:
        if run.dir not in skip_recipe:
            _check_recipe(run)
        else:
            run.stage_config()
        if not data:
            continue
        if run.kind == "pretrain":
            _check_pretrain_inputs(run)
        else:
            _check_finetune_data(run, seen)
