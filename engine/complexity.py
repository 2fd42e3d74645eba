"""Parameters and MACs of any module, counted by ``torch.utils.flop_counter`` (one MAC = two FLOPs).

The counter sees convolutions and matrix products (what Table 11's "MFlops (Conv)" row counts);
BN, ReLU, pooling and additions are not counted.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["macs_by_module", "count_params"]


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
