"""The whole segmentation network of Peng et al., Figure 2 A, over any timm ``features_only`` backbone.

::

    res-2 ─ head ─ BR ───────────────────────────────────── + ─ BR ─ up ─ BR ─ up ─ BR ─► logits
    res-3 ─ head ─ BR ───────────────────── + ─ BR ─ up ──┘            (stride 4 -> 2 -> 1)
    res-4 ─ head ─ BR ───── + ─ BR ─ up ──┘
    res-5 ─ head ─ BR ─ up ┘

``head`` is a GCN (or an ablation score map, ``segmentation.heads``), ``BR`` a Boundary Refinement
block (nine in all; :class:`torch.nn.Identity` when BR is off) and ``up`` a x2 ``ConvTranspose2d``
initialised as bilinear upsampling. Everything after the backbone runs on ``num_classes``
channels, which is why the whole decoder is cheap next to the backbone.

Inputs of any size work: the image is zero-padded at the bottom/right to a multiple of the
backbone's output stride (zero is the mean pixel after normalisation) and the logits are
cropped back, so the output always has the input's height and width.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from backbone.antialias import AUTO, anti_aliasing_of
from backbone.artifacts import load_backbone
from backbone.models import check_model_name, create_backbone, load_features_from
from engine.config import ConfigError
from segmentation.transforms import MEAN, STD

from .heads import HEADS, BoundaryRefinement, bilinear_deconv, make_score_head

__all__ = ["GCNSegmentationNet", "build_segmentation_model", "check_backbone", "stage_indices", "TIMM_PREFIX"]

_log = logging.getLogger(__name__)

# Figure 2 reads res-2..res-5: feature maps at strides 4, 8, 16 and 32.
STAGE_REDUCTIONS = (4, 8, 16, 32)
# ``pretrained="timm"`` / ``"timm:TAG"`` / ``"timm:ARCH.TAG"`` asks timm for its published weights.
TIMM_PREFIX = "timm"


class GCNSegmentationNet(nn.Module):
    """Figure 2 A: score maps on four backbone stages, fused top-down, refined and upsampled to the input."""

    def __init__(
        self,
        encoder: nn.Module,
        channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int = 21,
        head: str = "gcn_br",
        kernel_size: int = 15,
        br: bool = True,
        stack_channels: int | None = None,
    ) -> None:
        super().__init__()
        if len(channels) != len(reductions) or len(channels) < 2:
            raise ValueError(f"need channels and strides of >= 2 stages, got {channels}, {reductions}")
        doubling = all(b == 2 * a for a, b in zip(reductions, reductions[1:], strict=False))
        if not doubling or reductions[0] & (reductions[0] - 1):
            raise ValueError(f"stage strides must be powers of two doubling stage to stage, got {reductions}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")

        def refine() -> nn.Module:
            return BoundaryRefinement(num_classes) if br else nn.Identity()

        self.encoder = encoder
        self.num_classes = num_classes
        self.head_name = head
        self.kernel_size = kernel_size
        self.br = br
        self.output_stride = reductions[-1]
        n = len(channels)
        self.heads = nn.ModuleList(
            make_score_head(head, c, num_classes, kernel_size, stack_channels=stack_channels)
            for c in channels
        )
        self.head_refine = nn.ModuleList(refine() for _ in range(n))
        # up[i] brings the fused map of stage i+1 to stage i's resolution.
        self.up = nn.ModuleList(bilinear_deconv(num_classes) for _ in range(n - 1))
        self.fuse_refine = nn.ModuleList(refine() for _ in range(n - 1))
        # From the finest stage (stride 4 for res-2) to the input resolution, x2 at a time.
        final_steps = int(math.log2(reductions[0]))
        self.final_up = nn.ModuleList(bilinear_deconv(num_classes) for _ in range(final_steps))
        self.final_refine = nn.ModuleList(refine() for _ in range(final_steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.output_stride, (-w) % self.output_stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.encoder(x)
        stages = zip(features, self.heads, self.head_refine, strict=False)
        scores = [refine(head(f)) for f, head, refine in stages]
        y = scores[-1]
        for i in range(len(scores) - 2, -1, -1):
            y = self.fuse_refine[i](self.up[i](y) + scores[i])
        for up, refine in zip(self.final_up, self.final_refine, strict=False):
            y = refine(up(y))
        return y[..., :h, :w]


def stage_indices(backbone: str, reductions: Sequence[int] = STAGE_REDUCTIONS, **kwargs) -> tuple[int, ...]:
    """timm ``out_indices`` of the (last) feature map at each stride in ``reductions``.

    Reads the backbone's ``feature_info`` from a model built on the meta device, which costs no memory.
    """
    with torch.device("meta"):
        probe = timm.create_model(backbone, features_only=True, **kwargs)
    have = probe.feature_info.reduction()
    indices = probe.feature_info.out_indices
    picked = []
    for r in reductions:
        at = [idx for idx, red in zip(indices, have, strict=True) if red == r]
        if not at:
            raise ValueError(
                f"backbone {backbone!r} gives feature maps at strides {tuple(have)}; the GCN network needs strides "
                f"{tuple(reductions)} (res-2..res-5). Pick a backbone with that pyramid (ResNet, ConvNeXt, "
                "EfficientNet, RegNet...; a plain ViT has stride 16 only)"
            )
        picked.append(at[-1])
    return tuple(picked)


def check_backbone(name: str, key: str = "", what: str = "backbone", **kwargs) -> None:
    """Refuse up front, as a ConfigError naming ``key`` and the reason, a backbone this network cannot use: one
    timm does not know, or one without feature maps at strides 4, 8, 16 and 32 (a plain ViT has stride 16
    only). Builds nothing but a meta-device probe."""
    check_model_name(name, what, key)
    try:
        stage_indices(name, **kwargs)
    except ValueError as e:
        raise ConfigError(f"{key + ': ' if key else ''}{e}") from None


def _timm_weights_name(backbone: str, spec: str) -> str:
    """``timm`` / ``timm:TAG`` / ``timm:ARCH.TAG`` -> the timm model name with its pretrained tag."""
    _, _, rest = spec.partition(":")
    if not rest:
        return backbone
    arch, dot, tag = rest.partition(".")
    if not dot:  # "timm:TAG"
        arch, tag = backbone, rest
    if arch != backbone:
        raise ValueError(
            f"pretrained weights {spec!r} are for architecture {arch!r}, but the backbone is {backbone!r}; "
            f"use --backbone {arch} or pretrained='timm:{backbone}.TAG'"
        )
    name = f"{arch}.{tag}"
    known = timm.list_pretrained(f"{arch}.*")
    if name not in known:
        listed = ", ".join(known[:12]) or "none"
        raise ValueError(f"timm has no pretrained weights {name!r}; known for {arch}: {listed}")
    return name


def _is_timm_spec(pretrained: str) -> bool:
    return pretrained == TIMM_PREFIX or pretrained.startswith(TIMM_PREFIX + ":")


def _create_encoder(
    backbone: str, pretrained: str | Path | None, out_indices: tuple[int, ...], anti_aliasing: str | None,
    backbone_kwargs: dict,
) -> tuple[nn.Module, dict]:
    """The ``features_only`` backbone with its weights, and the checkpoint's meta dict ({} if none).

    A checkpoint file rebuilds the network it was trained as (``backbone.artifacts.load_backbone``:
    its anti-aliasing and constructor arguments); a contradicting request is an error.
    """
    features = dict(features_only=True, out_indices=out_indices, **backbone_kwargs)
    if pretrained is None:
        return create_backbone(backbone, anti_aliasing=None if anti_aliasing == AUTO else anti_aliasing,
                               **features), {}
    if isinstance(pretrained, str) and _is_timm_spec(pretrained):
        name = _timm_weights_name(backbone, pretrained)
        if anti_aliasing not in (AUTO, None):
            raise ValueError(f"timm's weights {name!r} were not trained with anti_aliasing={anti_aliasing!r}")
        try:
            return create_backbone(name, pretrained=True, **features), {"model_name": name}
        except OSError as e:  # no network, no Hugging Face cache entry, proxy refusing...
            raise RuntimeError(
                f"could not fetch timm's pretrained weights {name!r} ({type(e).__name__}: {e}). "
                f"Fix: run once where huggingface.co is reachable (the weights are then cached in "
                f"~/.cache/huggingface), or pass a local checkpoint file as pretrained."
            ) from e
    # The classifier the file was trained as, with its weights (load_backbone checks the architecture, the
    # anti-aliasing and the constructor arguments), then its weights moved into timm's feature wrapper of the
    # same network, whose module names timm flattens for most families (as timm's own
    # pretrained_cfg_overlay=dict(file=...) route loads the full model before wrapping it).
    model, meta = load_backbone(pretrained, name=backbone, anti_aliasing=anti_aliasing, **backbone_kwargs)
    trained = {k: v for k, v in (meta.get("model_kwargs") or {}).items() if k != "anti_aliasing"}
    encoder = create_backbone(backbone, anti_aliasing=None, **{**trained, **features})
    load_features_from(encoder, model, str(pretrained))
    _log.info("backbone %s: loaded weights from %s", backbone, pretrained)
    return encoder, meta


def build_segmentation_model(
    backbone: str,
    head: str = "gcn_br",
    num_classes: int = 21,
    kernel_size: int = 15,
    pretrained: str | Path | None = None,
    br: bool | None = None,
    *,
    stack_channels: int | None = None,
    anti_aliasing: str | None = AUTO,
    **backbone_kwargs,
) -> GCNSegmentationNet:
    """The Figure 2 network on timm backbone ``backbone`` (e.g. ``resnet50``, ``resnet50_gcn``).

    Args:
        head: score-map module, one of ``baseline``, ``conv``, ``stack``, ``gcn``, ``gcn_br``.
        num_classes: output channels (21 for PASCAL VOC).
        kernel_size: k of the GCN / conv / stack heads (the paper's final model: 15).
        pretrained: None (random init); a checkpoint path (``final.pth`` of our pretraining, a full
            training checkpoint, or a plain state dict); or ``"timm"`` / ``"timm:TAG"`` /
            ``"timm:ARCH.TAG"`` for timm's published weights (needs the network or a cached copy).
        br: Boundary Refinement blocks on or off; None means on exactly for ``head="gcn_br"``.
        stack_channels: m of the ``stack`` head (default: each stage's own channel count).
        anti_aliasing: the backbone's (``backbone.antialias``): ``'auto'`` follows the pretrained weights
            (none for random init), ``'blurpool'`` or None ask for it (a contradiction with the weights is
            an error).
        backbone_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate=0.1``).

    Raises ValueError for an unknown backbone/head or a bad k, FileNotFoundError for a missing
    checkpoint, ``backbone.weights.WeightsMismatchError`` for a checkpoint of another architecture.
    """
    check_backbone(backbone, **backbone_kwargs)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if br is None:
        br = head == "gcn_br"
    elif head == "gcn_br" and not br:
        raise ValueError("head='gcn_br' with br=False is a contradiction; use head='gcn' for GCN without BR")
    with torch.device("meta"):  # a bad k or m fails here, before the backbone is built
        make_score_head(head, 1, num_classes, kernel_size, stack_channels=stack_channels)
    out_indices = stage_indices(backbone, **backbone_kwargs)
    encoder, meta = _create_encoder(backbone, pretrained, out_indices, anti_aliasing, backbone_kwargs)
    info = encoder.feature_info
    model = GCNSegmentationNet(
        encoder,
        info.channels(),
        info.reduction(),
        num_classes=num_classes,
        head=head,
        kernel_size=kernel_size,
        br=br,
        stack_channels=stack_channels,
    )
    model.backbone_name = backbone
    model.anti_aliasing = anti_aliasing_of(encoder)
    # the input normalisation the backbone was trained with (its pretrained_cfg), for the transforms
    trained = meta.get("pretrained_cfg") or getattr(encoder, "pretrained_cfg", None) or {}
    model.normalization = (tuple(trained.get("mean", MEAN)), tuple(trained.get("std", STD)))
    model.pretrained_meta = meta
    return model

