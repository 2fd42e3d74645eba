"""The plan: one ``Run`` per pretraining and per fine-tune, and the checks made before anything starts.

``plan`` lays out the matrix under ``output`` (pretraining runs first, then the fine-tunes, each after
its backbone's pretraining); ``recipe_drift`` compares a run directory's recorded ``config.yaml`` with
what the plan asks for; ``check_plan`` resolves every stage config, refuses a drifted recipe and
checks the data.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.config import ConfigError, load_config, to_dict
from experiments import ROOT

from .config import CompareConfig

__all__ = ["NOT_RECIPE", "Run", "StageFailed", "plan", "recipe_drift", "check_plan"]

# Keys a launcher sets per job, that only change logging, or paths that move with the output folder:
# not part of a run's recipe.
NOT_RECIPE = {"data.num_workers", "run.log_every_s", "run.check_every_steps", "train.device", "run.dir",
              "model.pretrained"}


class StageFailed(RuntimeError):
    """A stage ended with an error; finished runs stay and are reused on the next call."""


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
        """The stage's command line on this machine (the sbatch scripts run the same entry points)."""
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
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v  # YAML reads tuples back as lists
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


def _check_recipe(run: Run) -> None:
    drift = recipe_drift(run, to_dict(run.stage_config()))
    if drift:
        raise ConfigError(
            f"{run.name}: {run.dir} was started with another recipe ({'; '.join(drift[:6])}"
            f"{'; ...' if len(drift) > 6 else ''}). Move or delete that folder to rerun it, or set "
            "output= to a new folder")


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


def check_plan(runs: Sequence[Run], data: bool = True) -> None:
    """Every stage config resolves, its data is there, and no finished run had another recipe."""
    seen: set[tuple] = set()
    for run in runs:
        _check_recipe(run)
        if not data:
            continue
        if run.kind == "pretrain":
            _check_pretrain_inputs(run)
        else:
            _check_finetune_data(run, seen)
