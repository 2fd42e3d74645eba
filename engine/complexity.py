"""Parameters, MACs and FLOPs of any module, counted by ``torch.utils.flop_counter`` (one MAC = two FLOPs),
and the model FLOPs utilisation (MFU) of a training step against the device's peak.

The counter sees convolutions and matrix products (what Table 11's "MFlops (Conv)" row counts);
BN, ReLU, pooling and additions are not counted.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .batchnorm import local_batchnorm

__all__ = ["macs_by_module", "count_params", "PEAK_BF16_TFLOPS", "PEAK_ENV", "device_peak_flops", "TrainFlops", "mfu"]


def macs_by_module(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs of one forward pass, per module path ('' is the whole model, 'layer3.0' a block, ...)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(input_shape, dtype=param.dtype, device=param.device)
    with FlopCounterMode(display=False, depth=None) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    root = type(model).__name__
    out: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        path = "" if name == root else name.removeprefix(root + ".")
        out[path] = sum(ops.values()) // 2
    return out


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded); works on the meta device too."""
    return sum(p.numel() for p in module.parameters())


# Dense bf16 peak of one device, in TFLOP/s (vendor data sheets, without sparsity), matched against
# torch.cuda.get_device_name() in this order: the first name contained in it wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
)


# The peak of a device the table does not know, in TFLOP/s (e.g. LKM_PEAK_TFLOPS=989 for a new GPU): MFU is then
# reported against it. The tests set it on the CPU to drive the FLOP-counting path every GPU run takes.
PEAK_ENV = "LKM_PEAK_TFLOPS"


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of ``device``: ``$LKM_PEAK_TFLOPS`` when set, else from :data:`PEAK_BF16_TFLOPS`; None
    where unknown (any CPU)."""
    if os.environ.get(PEAK_ENV):
        try:
            tflops = float(os.environ[PEAK_ENV])
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={os.environ[PEAK_ENV]!r} is not a number of TFLOP/s") from None
        return tflops * 1e12 if tflops > 0 else None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


class TrainFlops:
    """FLOPs of one training step (forward and backward) per image, at an input size: counted by
    ``torch.utils.flop_counter`` on a copy of the model on the meta device (no memory, no compute),
    once per size. The copy's SyncBatchNorms compute per-process statistics: under a process group a
    SyncBatchNorm refuses the meta device, and BatchNorm adds no counted FLOPs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._meta: nn.Module | None = None
        self._cache: dict[tuple[int, ...], int] = {}

    def __call__(self, *chw: int) -> int:
        if chw not in self._cache:
            if self._meta is None:
                self._meta = local_batchnorm(copy.deepcopy(self.model)).to("meta").train()
            # two images: BatchNorm in training mode refuses one value per channel (a 1 x 1 last stage)
            x = torch.empty(2, *chw, device="meta")
            with FlopCounterMode(display=False) as counter:
                self._meta(x).float().sum().backward()
            self._cache[chw] = counter.get_total_flops() // 2
        return self._cache[chw]


def mfu(flops_per_image: float, images_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: the share of the device's peak the training step's model FLOPs reach."""
    if not peak_flops:
        return None
    return flops_per_image * images_per_s / peak_flops
