"""Reading this project's checkpoints and loading them into a model with errors a person can act on.

Formats read (all through ``torch.load(weights_only=True)``; a file this project wrote is checked against the
content digest it carries, ``engine.checkpoint.seal``):

* ``final.pth`` written by pretraining: ``{'state_dict', 'model_name', 'pretrained_cfg', 'num_classes',
  'format': 'lkm-weights-v1'}``;
* a full training checkpoint: ``{'model', 'model_ema' (optional), 'optimizer', ..., 'model_name',
  'format': 'lkm-train-v1'}`` (EMA weights are preferred when present, as timm does);
* a plain state dict (e.g. ``torch.save(model.state_dict(), path)``).

timm's own ``load_state_dict`` picks ``state_dict_ema``/``model_ema``, then ``state_dict``, then
``model``, so the same files also load through ``timm.create_model(..., checkpoint_path=PATH)``.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import CONTENT_KEY, DamagedCheckpointError, verify_content

__all__ = [
    "WeightsMismatchError",
    "read_state_dict",
    "mismatch_report",
    "load_weights",
    "model_name_of",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_STATE_KEYS = ("model", "model_ema", "state_dict", "state_dict_ema", "optimizer", "scaler", "rng", CONTENT_KEY)
_SHOW = 8  # keys listed per kind of mismatch; the rest are counted


class WeightsMismatchError(RuntimeError):
    """A checkpoint does not fit the model (another architecture, another class count, ...)."""


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def read_state_dict(path: str | Path, *, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, meta)`` from any format above; ``meta`` holds e.g. ``model_name``."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint: give the final.pth (or checkpoint_*.pt) in it")
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (give the path of a final.pth, a training checkpoint or a state dict)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a pickle of arbitrary objects: torch's advice is to trust it; we don't
        if not zipfile.is_zipfile(path):  # not torch.save's archive at all (text, random bytes, another format)
            raise WeightsMismatchError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (a torch.save "
                                       "archive), or it is truncated") from None
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise WeightsMismatchError(
            f"cannot read checkpoint {path}: it holds Python objects besides tensors and plain values "
            f"({found.group(1) if found else 'unknown'}), which torch.load(weights_only=True) refused to run. Save "
            "the weights alone, e.g. torch.save(model.state_dict(), path)") from None
    except Exception as e:  # truncated file, not a torch file
        raise WeightsMismatchError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint, or it is "
                                   f"truncated ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, Mapping):
        raise WeightsMismatchError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    try:
        verify_content(ckpt, path)  # files this project wrote carry their content's digest
    except DamagedCheckpointError as e:
        raise WeightsMismatchError(str(e)) from None
    meta: dict = {}
    keys = ("model_ema", "state_dict_ema", "state_dict", "model") if use_ema else ("state_dict", "model")
    for key in keys:
        if isinstance(ckpt.get(key), Mapping):
            # everything but the weights and the training state: names, formats, model_kwargs, provenance
            meta = {k: v for k, v in ckpt.items() if k not in _STATE_KEYS}
            meta["weights_key"] = key
            ckpt = ckpt[key]
            break
    state_dict = {_strip_wrappers(k): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise WeightsMismatchError(f"checkpoint {path} holds no tensors (keys: {sorted(ckpt)[:_SHOW]})")
    return state_dict, meta


def model_name_of(model: nn.Module) -> str | None:
    """The timm architecture name a model was built as, if timm recorded it."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {s}" for s in items[:_SHOW])
    more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def mismatch_report(
    model_state: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    optional_prefixes: Iterable[str] = (),
) -> str | None:
    """Describe how ``state_dict`` fails to fit ``model_state``; None when it fits.

    Keys under ``optional_prefixes`` (e.g. the classifier ``fc.``) may be absent on either side
    or differ in shape without counting as a mismatch.
    """
    optional = tuple(optional_prefixes)
    missing = [k for k in model_state if k not in state_dict and not k.startswith(optional)]
    unexpected = [k for k in state_dict if k not in model_state and not k.startswith(optional)]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in state_dict and state_dict[k].shape != v.shape and not k.startswith(optional)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(_listing("missing in the checkpoint", missing))
    if unexpected:
        parts.append(_listing("not in the model", unexpected))
    if shapes:
        parts.append(_listing("shape mismatches", shapes))
    return "\n".join(parts)


def fitting_subset(
    model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` the model has, with the same shape."""
    return {k: v for k, v in state_dict.items() if k in model_state and model_state[k].shape == v.shape}


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    optional_prefixes: Iterable[str] = ("fc.",),
    use_ema: bool = True,
    model_name: str | None = None,
) -> dict:
    """Load a checkpoint into ``model``; raise :class:`WeightsMismatchError` naming file and keys.

    Everything must fit except keys under ``optional_prefixes`` (by default the classifier, so
    ImageNet weights load into a model with another class count or ``features_only=True``);
    those are loaded where they fit. Returns the checkpoint's meta dict.
    """
    state_dict, meta = read_state_dict(path, use_ema=use_ema)
    model_state = model.state_dict()
    report = mismatch_report(model_state, state_dict, optional_prefixes)
    if report is not None:
        have = meta.get("model_name", "unknown (no model_name recorded)")
        want = model_name or model_name_of(model) or type(model).__name__
        raise WeightsMismatchError(
            f"checkpoint {path} does not fit model '{want}' (checkpoint architecture: {have}):\n{report}\n"
            f"Fix: build the model the checkpoint was trained as ('{have}'), or pass a checkpoint of '{want}'."
        )
    model.load_state_dict(fitting_subset(model_state, state_dict), strict=False)
    return meta
