"""What fine-tuning writes and what evaluation, the figures and the comparison read.

* ``checkpoint_<iteration>.pt``: a training checkpoint (format ``lkm-seg-train-v1``): the network's
  weights, the optimiser, the position in the run, every rank's RNG state, and the run's identity;
* ``final.pth``: the weights at the end (format ``lkm-seg-weights-v1``) with ``model_args`` (the
  ``build_segmentation_model`` keywords that rebuild the network), the data set, its classes and the
  resolved config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbone.weights import WeightsMismatchError, read_state_dict
from engine import checkpoint as ckpt
from segmentation.network import build_segmentation_model

__all__ = ["SEG_TRAIN_FORMAT", "SEG_WEIGHTS_FORMAT", "FinetuneCheckpoint", "FinetuneWeights", "identity",
           "load_model"]

# v2: model_args names the backbone's anti-aliasing; final.pth records the input normalisation and provenance.
SEG_TRAIN_FORMAT = "lkm-seg-train-v2"
SEG_WEIGHTS_FORMAT = "lkm-seg-weights-v2"
READABLE = ("lkm-seg-train-v1", "lkm-seg-weights-v1", SEG_TRAIN_FORMAT, SEG_WEIGHTS_FORMAT)


def identity(dataset: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: flat scalars, which ``engine.checkpoint.peek_checkpoint``
    reads without loading tensors."""
    return {"format": SEG_TRAIN_FORMAT, "dataset": dataset, **model_args}


def _plain(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@dataclass
class FinetuneCheckpoint:
    """A training checkpoint of ``segmentation.finetune``."""

    dataset: str
    model_args: dict[str, Any]  # build_segmentation_model keywords
    classes: list[str]
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int
    epoch: int
    step_in_epoch: int
    total_steps: int
    global_batch: int
    world_size: int
    rng: list[dict[str, Any]]
    last_val: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**identity(self.dataset, self.model_args), **_plain(self)}

    @classmethod
    def load(cls, path: Path, expect: dict[str, Any]) -> FinetuneCheckpoint:
        state = ckpt.load_checkpoint(path, expect)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


@dataclass
class FinetuneWeights:
    """``final.pth`` of a fine-tuning run: the weights and what rebuilds and evaluates the network."""

    dataset: str
    model_args: dict[str, Any]
    classes: list[str]
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    iterations: int
    normalization: list[list[float]]  # (mean, std) of the input, as the backbone was pretrained
    val: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # recipe hash, world size, backbone weights' hash...

    def save(self, path: Path) -> Path:
        """Write atomically; refuses weights with NaN/inf (``engine.checkpoint.NonFiniteWeightsError``)."""
        ckpt.check_finite([("", self.state_dict)], f"final weights {path}")
        record = {**identity(self.dataset, self.model_args), **_plain(self), "format": SEG_WEIGHTS_FORMAT}
        return ckpt.save_atomic(record, path)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a fine-tuning ``final.pth`` or ``checkpoint_*.pt``, and the file's metadata."""
    state_dict, _ = read_state_dict(path)  # checks the file, names it in any error
    full = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = {k: v for k, v in full.items()
            if k not in ("model", "state_dict", "optimizer", "scaler", "rng", ckpt.CONTENT_KEY)}
    if meta.get("format") not in READABLE or "model_args" not in meta:
        raise WeightsMismatchError(
            f"{path} is not a checkpoint of segmentation.finetune (format {meta.get('format', 'unknown')!r}); "
            "give the final.pth or a checkpoint_*.pt of a fine-tuning run directory")
    args = dict(meta["model_args"])
    model = build_segmentation_model(args.pop("backbone"), pretrained=None, **args)
    if meta.get("normalization"):
        mean, std = meta["normalization"]
        model.normalization = (tuple(mean), tuple(std))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise WeightsMismatchError(f"{path}: weights do not fit the network it names ({meta['model_args']}): "
                                   f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, meta
