"""ResNet50-GCN ("Large Kernel Matters", Peng et al.) for timm, and its ImageNet pretraining.

Importing this package registers ``resnet50_gcn`` with timm's model registry.
"""
from . import models as _models  # noqa: F401  (registers resnet50_gcn with timm)
from .gcn_block import GCNBlock, gcn_block, matched_branch_width
from .weights import WeightsMismatchError, load_weights, read_state_dict

__all__ = ["GCNBlock", "gcn_block", "matched_branch_width", "WeightsMismatchError", "load_weights",
           "read_state_dict"]
