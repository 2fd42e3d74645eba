"""What pretraining writes, as schemas: the training checkpoint and the final weights.

* ``checkpoint_<step>.pt`` (:class:`PretrainCheckpoint`, format ``lkm-train-v1``): the model (and
  its EMA), optimiser, scaler, the position in the run, every rank's RNG state, the resolved config
  and the run's identity (model name, class count, anti-aliasing) that a resume must match.
* ``final.pth`` (:class:`FinalWeights`, format ``lkm-weights-v1``): the weights (the EMA's when
  ``train.ema``), the timm model name and the constructor arguments that rebuild the trained network,
  timm's ``pretrained_cfg`` (input size, crop, normalisation), the class names.

Both are plain dicts on disk, so ``torch.load(weights_only=True)`` reads them and timm's own loaders
(``pretrained_cfg_overlay=dict(file=...)``, ``checkpoint_path=``) find the weights under ``state_dict``
/ ``model_ema`` / ``model``. The trainer writes them through these classes; evaluation, the segmentation
encoder and the comparison read them through :meth:`FinalWeights.load`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine import checkpoint as ckpt

__all__ = ["TRAIN_FORMAT", "WEIGHTS_FORMAT", "PretrainCheckpoint", "FinalWeights"]

TRAIN_FORMAT = "lkm-train-v1"
WEIGHTS_FORMAT = "lkm-weights-v1"


@dataclass
class PretrainCheckpoint:
    """A training checkpoint; :meth:`identity` is what a run must match to resume from it."""

    FORMAT: ClassVar[str] = TRAIN_FORMAT
    IDENTITY: ClassVar[tuple[str, ...]] = ("format", "model_name", "num_classes", "blurpool")

    model_name: str
    num_classes: int
    blurpool: bool
    classes: list[str]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int
    step: int
    step_in_epoch: int
    steps_per_epoch: int
    global_batch: int
    world_size: int
    rng: list[dict[str, Any]]
    config: dict[str, Any]
    model_ema: dict[str, torch.Tensor] | None = None
    format: str = TRAIN_FORMAT

    @classmethod
    def identity(cls, model_name: str, num_classes: int, blurpool: bool) -> dict[str, Any]:
        return {"format": cls.FORMAT, "model_name": model_name, "num_classes": num_classes, "blurpool": blurpool}

    def to_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if state["model_ema"] is None:
            del state["model_ema"]
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PretrainCheckpoint:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})

    @classmethod
    def load(cls, path: Path, expect: dict[str, Any]) -> PretrainCheckpoint:
        return cls.from_dict(ckpt.load_checkpoint(path, expect))


@dataclass
class FinalWeights:
    """``final.pth``: the weights and what rebuilds the trained network."""

    FORMAT: ClassVar[str] = WEIGHTS_FORMAT

    state_dict: dict[str, torch.Tensor]
    model_name: str
    num_classes: int
    pretrained_cfg: dict[str, Any]
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments beyond the name
    classes: list[str] = field(default_factory=list)
    epochs: int = 0
    ema: bool = False
    format: str = WEIGHTS_FORMAT

    def save(self, path: Path) -> Path:
        """Write atomically; refuses weights with NaN/inf (``engine.checkpoint.NonFiniteWeightsError``)."""
        ckpt.check_finite([("", self.state_dict)], f"final weights {path}")
        return ckpt.save_atomic({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> FinalWeights:
        """Read a ``final.pth`` written by pretraining (``backbone.weights`` reads any weights file)."""
        from .weights import WeightsMismatchError

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: give the final.pth of a pretraining run")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated file, not a torch file
            raise WeightsMismatchError(f"cannot read {path}: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            found = data.get("format", "none") if isinstance(data, dict) else type(data).__name__
            raise WeightsMismatchError(f"{path} is not the final.pth of a pretraining run (format {found!r}, "
                                       f"expected {cls.FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
