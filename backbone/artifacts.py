"""What pretraining writes, as schemas: the training checkpoint and the final weights.

* ``checkpoint_<step>.pt`` (:class:`PretrainCheckpoint`, format ``lkm-train-v1``): the model (and
  its EMA), optimiser, scaler, the position in the run, every rank's RNG state, the resolved config
  and the run's identity (model name, class count, anti-aliasing) that a resume must match.
* ``final.pth`` (:class:`FinalWeights`, format ``lkm-weights-v1``): the weights (the EMA's when
  ``train.ema``), the timm model name and the constructor arguments that rebuild the trained network,
  timm's ``pretrained_cfg`` (input size, crop, normalisation), the class names.

Both are plain dicts on disk, sealed with the SHA-256 of their content (``engine.checkpoint.seal``, checked
by every reader of this project), so ``torch.load(weights_only=True)`` reads them and timm's own loaders
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
from torch import nn

from engine import checkpoint as ckpt

from .antialias import AUTO, apply_blurpool, blurred_convs, check_anti_aliasing
from .models import create_backbone
from .weights import WeightsMismatchError, fitting_subset, mismatch_report, read_state_dict

__all__ = ["TRAIN_FORMAT", "WEIGHTS_FORMAT", "PretrainCheckpoint", "FinalWeights", "load_backbone",
           "TRAINING_ONLY_KWARGS"]

# v2: anti-aliasing is ffcv-style BlurPool recorded in the state dict (backbone.antialias), and
# final.pth carries the constructor arguments (model_kwargs) and the run's provenance.
TRAIN_FORMAT = "lkm-train-v2"
WEIGHTS_FORMAT = "lkm-weights-v2"
# Constructor arguments a consumer may set differently from the trained network's: regularisers that
# do nothing in eval mode.
TRAINING_ONLY_KWARGS = ("drop_rate", "drop_path_rate", "drop_block_rate")


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
    provenance: dict[str, Any] = field(default_factory=dict)  # recipe hash, world size, global batch, ...
    format: str = WEIGHTS_FORMAT

    def save(self, path: Path) -> Path:
        """Write atomically; refuses weights with NaN/inf (``engine.checkpoint.NonFiniteWeightsError``)."""
        ckpt.check_finite([("", self.state_dict)], f"final weights {path}")
        return ckpt.save_atomic({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> FinalWeights:
        """Read a ``final.pth`` written by pretraining (``backbone.weights`` reads any weights file)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: give the final.pth of a pretraining run")
        try:
            data = ckpt.read_sealed(path)  # weights_only=True, and the content checked against its digest
        except ckpt.DamagedCheckpointError as e:  # truncated, not a torch file, objects we never write, altered
            raise WeightsMismatchError(str(e)) from None
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            found = data.get("format", "none") if isinstance(data, dict) else type(data).__name__
            raise WeightsMismatchError(f"{path} is not the final.pth of a pretraining run (format {found!r}, "
                                       f"expected {cls.FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "fc")
    names = classifier if isinstance(classifier, tuple | list) else (classifier,)
    return tuple(f"{name}." for name in names)


def load_backbone(path: str | Path, *, name: str | None = None, anti_aliasing: str | None = AUTO,
                  num_classes: int | None = None, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The network a weights file was trained as, with its weights: ``(model, the file's metadata)``.

    Reads a pretraining ``final.pth``, a training checkpoint (EMA weights preferred) or a plain state
    dict. The architecture is the recorded ``model_name`` (``name`` must agree; a plain state dict needs
    it); the constructor arguments are the recorded ``model_kwargs``; the anti-aliasing is read off the
    state dict itself (``backbone.antialias``). A request that contradicts what was trained -- another
    ``anti_aliasing`` than ``'auto'``, or a recorded constructor argument set to another value (except
    :data:`TRAINING_ONLY_KWARGS`) -- is a :class:`WeightsMismatchError`. ``num_classes`` (default: the
    trained one) and ``features_only``/``out_indices`` may differ: the classifier is then not loaded.
    """
    check_anti_aliasing(anti_aliasing, allow_auto=True)
    state_dict, meta = read_state_dict(path)
    recorded = meta.get("model_name")
    if name is None and recorded is None:
        raise WeightsMismatchError(f"{path} does not record its architecture (a plain state dict?): pass the "
                                   "timm model name it was trained as")
    other_architecture = name is not None and recorded is not None and name != recorded
    name = name or recorded
    trained_kwargs = dict(meta.get("model_kwargs") or {})
    if "aa_layer" in trained_kwargs:
        raise WeightsMismatchError(f"{path} was trained with timm's aa_layer (format {meta.get('format')!r}), "
                                   "an anti-aliasing this version no longer builds; retrain it")
    trained_kwargs.pop("anti_aliasing", None)
    blurred = blurred_convs(state_dict)
    trained_aa = "blurpool" if blurred else None
    if anti_aliasing != AUTO and anti_aliasing != trained_aa:
        raise WeightsMismatchError(
            f"{path} was trained {'with' if blurred else 'without'} anti-aliasing (anti_aliasing={trained_aa!r}), "
            f"but anti_aliasing={anti_aliasing!r} was asked for; leave it unset ('auto') to rebuild the trained "
            "network")
    conflicts = [f"{k}={kwargs[k]!r} (trained: {v!r})" for k, v in trained_kwargs.items()
                 if k in kwargs and kwargs[k] != v and k not in TRAINING_ONLY_KWARGS]
    if conflicts:
        raise WeightsMismatchError(f"{path}: the request {', '.join(conflicts)} contradicts the trained network; "
                                   "drop those arguments to rebuild it")
    build = {**trained_kwargs, **kwargs}
    if not build.get("features_only"):
        build["num_classes"] = num_classes if num_classes is not None else meta.get("num_classes", 1000)
    model = create_backbone(name, anti_aliasing=None, **build)
    if blurred:
        present = {n for n, _ in model.named_modules()}
        apply_blurpool(model, only=[b for b in blurred if b in present])  # a features_only model lacks some
    optional = _classifier_prefixes(model)
    report = mismatch_report(model.state_dict(), state_dict, optional)
    if other_architecture or report is not None:
        trained = f"weights of '{recorded}'" if recorded else "weights"
        detail = f":\n{report}" if report else ""
        fix = f"\nFix: use the backbone '{recorded}', or the weights of a '{name}' run." if other_architecture else ""
        raise WeightsMismatchError(f"{path} holds {trained} that do not fit '{name}' built as trained{detail}{fix}")
    model.load_state_dict(fitting_subset(model.state_dict(), state_dict), strict=False)
    return model, meta
