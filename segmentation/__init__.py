"""Semantic segmentation with the GCN + Boundary Refinement network of "Large Kernel Matters" (Figure 2).

The network names below load on first use, so ``segmentation.datasets`` and the other data-only
modules do not import timm and the backbone.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "HEADS": "heads",
    "GCN": "heads",
    "BoundaryRefinement": "heads",
    "ConvScore": "heads",
    "ConvStack": "heads",
    "make_score_head": "heads",
    "GCNSegmentationNet": "network",
    "build_segmentation_model": "network",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
