"""ResNet50-GCN, registered with timm (``import backbone; timm.create_model('resnet50_gcn')``).

The network *is* timm's ``ResNet``: stem, stages (built by timm's ``make_blocks``), head,
``feature_info``, ``forward_intermediates`` and the rest come from timm. Only the block of
res-4 and res-5 differs (Table 11): res-1..res-3 are exactly timm's ``resnet50``, so the
Table 6 comparison changes nothing but the two large-kernel stages.

=========  ==================================  =====================================
stage      resnet50                            resnet50_gcn
=========  ==================================  =====================================
res-2      Bottleneck 64 -> 256, x3            same
res-3      Bottleneck 128 -> 512, x4           same
res-4      Bottleneck 256 -> 1024, x6          GCN k=5, branch width 85 -> 1024, x6
res-5      Bottleneck 512 -> 2048, x3          GCN k=7, branch width 128 -> 2048, x3
=========  ==================================  =====================================
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from engine.config import ConfigError

from .antialias import AUTO, BlurConv2d, apply_blurpool, blurred_convs, check_anti_aliasing
from .gcn_block import gcn_block
from .weights import WeightsMismatchError, load_weights, mismatch_report, model_name_of, read_state_dict

__all__ = ["ResNetGCN", "resnet50_gcn", "GCN_STAGES", "TESTED_FAMILIES", "check_model_name", "check_input_sizes",
           "create_backbone", "load_features_from"]

# (kernel size, branch width) of res-4 and res-5, Table 11.
GCN_STAGES = ((5, 85), (7, 128))


# Families pretrained, fine-tuned from their final.pth and collected by the comparison in the tests
# (tests/test_backbone_families.py); the README lists them.
TESTED_FAMILIES = ("resnet", "convnext", "efficientnet", "regnet")


def check_model_name(name: str, what: str = "model", key: str = "") -> None:
    """Unless timm knows ``name``: a ConfigError (a ValueError) naming it, ``what`` it is, the config ``key``
    that set it, and the closest timm names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ConfigError(f"unknown {what} '{name}'{f' ({key})' if key else ''}. Give a timm model name (e.g. "
                          f"resnet50 or resnet50_gcn); the fine-tune needs one with feature maps at strides 4 to 32, "
                          f"and the families tested end to end are {', '.join(TESTED_FAMILIES)}. Close names: "
                          f"{', '.join(close) or 'none'}")


def check_input_sizes(name: str, sizes: Iterable[int], key: str, **kwargs) -> None:
    """Refuse, as a ConfigError naming ``key`` and the reason, a model that cannot classify square images of
    every size in ``sizes`` (built as :func:`create_backbone` builds it, on the meta device: no memory, no
    compute). A ViT with a fixed input size passes: :func:`create_backbone` makes its size dynamic."""
    check_model_name(name, "model", key)
    with torch.device("meta"):
        model = create_backbone(name, **kwargs).eval()
        for size in sorted(set(sizes)):
            try:
                model(torch.empty(2, 3, size, size))
            except Exception as e:  # noqa: BLE001 - shape asserts, too-small maps: whatever the model says
                raise ConfigError(f"{key}={name} cannot take {size} x {size} px images, which this run feeds it "
                                  f"({type(e).__name__}: {e}); pick another model or other resolutions") from None


def create_backbone(name: str, *, anti_aliasing: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, anti-aliased as asked (``backbone.antialias``): how every
    backbone of this project is built, ResNet50 and ResNet50-GCN alike (``features_only`` models too).

    Models built for one input size that timm can make size-agnostic (ViTs: ``dynamic_img_size``) are built
    so, unless ``dynamic_img_size`` is given: pretraining feeds them the ramp's resolutions."""
    check_anti_aliasing(anti_aliasing)
    if "dynamic_img_size" not in kwargs and _has_fixed_size(name, kwargs):
        kwargs["dynamic_img_size"] = True
    model = timm.create_model(name, **kwargs)
    if isinstance(model, ResNetGCN):
        model.anti_aliasing_request = anti_aliasing  # explicit: weights of another construction are refused
    if anti_aliasing == "blurpool":
        apply_blurpool(model)
    else:
        model.anti_aliasing = None
    return model


def _has_fixed_size(name: str, kwargs: dict) -> bool:
    """Whether timm builds ``name`` with a ``dynamic_img_size`` switch that is off (a probe on the meta device)."""
    if name in _FIXED_SIZE:
        return _FIXED_SIZE[name]
    builds_only = ("pretrained", "pretrained_cfg_overlay", "checkpoint_path", "features_only", "out_indices",
                   "feature_cls")  # the classifier itself is probed: its answer holds for any wrapper of it
    probe = {k: v for k, v in kwargs.items() if k not in builds_only}
    with torch.device("meta"):
        _FIXED_SIZE[name] = getattr(timm.create_model(name, **probe), "dynamic_img_size", None) is False
    return _FIXED_SIZE[name]


_FIXED_SIZE: dict[str, bool] = {}


def load_features_from(features: nn.Module, model: nn.Module, source: str) -> None:
    """Load the weights of ``model`` (a classifier, e.g. rebuilt from a ``final.pth``) into ``features``, timm's
    ``features_only`` wrapper of the same architecture, blurring the convs ``model`` has blurred.

    timm's wrappers flatten the module names of most families (ConvNeXt's ``stages.0`` is ``stages_0`` in
    ``FeatureListNet``; ``FeatureGetterNet`` prefixes ``model.``; ResNet's and EfficientNet's keep them), so
    every name of ``features`` is matched to the one name of ``model`` it can be (same tensor shape); a name
    that matches none or several is a WeightsMismatchError naming ``source``."""
    state = model.state_dict()
    blurred = set(blurred_convs(state))
    convs = [n for n, m in features.named_modules() if type(m) is nn.Conv2d]
    to_blur = [n for n in convs if set(_unflattened(n)) & blurred]
    if to_blur:
        apply_blurpool(features, only=to_blur)
    mapped, unplaced = {}, []
    for key, value in features.state_dict().items():
        hits = [k for k in _unflattened(key) if k in state and state[k].shape == value.shape]
        if len(hits) == 1:
            mapped[key] = state[hits[0]]
        else:
            unplaced.append(key)
    if unplaced:
        raise WeightsMismatchError(
            f"{source}: the weights of '{model_name_of(model) or type(model).__name__}' do not fit timm's "
            f"features_only wrapper of it; no single trained tensor for {unplaced[:5]}"
            f"{f' and {len(unplaced) - 5} more' if len(unplaced) > 5 else ''}")
    features.load_state_dict(mapped)
    features.anti_aliasing = "blurpool" if blurred else None


def _unflattened(name: str) -> list[str]:
    """The names a module or tensor of a timm feature wrapper can have in the model it wraps: its own, without
    ``model.``, and with one ``_`` of its first component read as the ``.`` timm flattened."""
    names = [name, name.removeprefix("model.")] if name.startswith("model.") else [name]
    head, dot, rest = name.partition(".")
    names += [f"{head[:i]}.{head[i + 1:]}{dot}{rest}" for i, c in enumerate(head) if c == "_"]
    return names


class ResNetGCN(ResNet):
    """timm's ResNet with anti-aliasing as a constructor argument and weight loading that rebuilds the
    trained network and names the file and the keys that do not fit.

    timm calls :meth:`load_pretrained` for ``pretrained=True`` with a ``file`` in the pretrained
    cfg (``custom_load=True`` below), so ``pretrained_cfg_overlay=dict(file=PATH)`` loads this
    project's ``final.pth``, a training checkpoint or a plain state dict; ``checkpoint_path=PATH`` ends
    in :meth:`load_state_dict`. Both follow the weights' anti-aliasing (the blur filters are in the state
    dict, ``backbone.antialias``) unless ``anti_aliasing`` was asked for explicitly, and then a
    conflict is an error rather than a silently different network.
    """

    def __init__(self, *args, anti_aliasing: str | None = AUTO, **kwargs) -> None:
        if anti_aliasing == "none":  # timm.create_model drops None-valued arguments: "none" asks for none
            anti_aliasing = None
        check_anti_aliasing(anti_aliasing, allow_auto=True)
        super().__init__(*args, **kwargs)
        self.anti_aliasing_request = anti_aliasing
        self.anti_aliasing = None
        if anti_aliasing not in (AUTO, None):
            apply_blurpool(self)

    def load_pretrained(self, checkpoint_path: str | Path, prefix: str = "") -> None:
        # The classifier is optional: ImageNet weights load into a model with num_classes != 1000.
        state_dict, _ = read_state_dict(checkpoint_path)
        try:
            self.follow_anti_aliasing(state_dict, str(checkpoint_path))
        except ValueError:  # blurred convs this network does not have: another architecture, which load_weights
            pass  # then refuses, naming the file, both architectures and the keys
        load_weights(self, checkpoint_path, optional_prefixes=("fc.",), model_name=self._arch_name())

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        # timm's checkpoint_path= path ends here; give a readable summary instead of torch's wall of keys.
        self.follow_anti_aliasing(state_dict, "the state dict")
        if strict:
            report = mismatch_report(self.state_dict(), state_dict)
            if report is not None:
                raise WeightsMismatchError(
                    f"state dict does not fit model '{self._arch_name()}' (a checkpoint of another "
                    f"architecture?):\n{report}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def follow_anti_aliasing(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Blur the convs the weights were trained blurred, if the model was built without a request;
        raise WeightsMismatchError when an explicit request contradicts the weights."""
        want, have = blurred_convs(state_dict), sorted(n for n, m in self.named_modules() if isinstance(m, BlurConv2d))
        if want == have:
            return
        if self.anti_aliasing_request == AUTO and not have:
            apply_blurpool(self, only=want)
            return
        trained = f"with anti-aliasing (BlurPool before {len(want)} strided convs)" if want else "without anti-aliasing"
        raise WeightsMismatchError(
            f"{source} was trained {trained}, but the model was built with anti_aliasing="
            f"{self.anti_aliasing_request!r}. Build it with anti_aliasing={'blurpool' if want else None!r}, or "
            "leave anti_aliasing unset to follow the weights.")

    def _arch_name(self) -> str:
        return (getattr(self, "pretrained_cfg", None) or {}).get("architecture", "resnet50_gcn")


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        # Weights come from this project's pretraining, loaded by ResNetGCN.load_pretrained.
        "custom_load": True,
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"resnet50_gcn.untrained": _cfg()})


def _create_resnet_gcn(variant: str, pretrained: bool = False, **kwargs) -> ResNetGCN:
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if overlay.get("file"):
        # timm resets custom_load when a file is given; keep ours, which reads this project's
        # checkpoint formats and names the file in its errors.
        overlay.setdefault("custom_load", True)
        if pretrained and "num_classes" not in kwargs and "num_classes" not in overlay:
            # rebuild the trained classifier rather than a random 1000-class one
            recorded = _recorded_num_classes(overlay["file"])
            if recorded is not None:
                kwargs["num_classes"] = overlay["num_classes"] = recorded
    return build_model_with_cfg(ResNetGCN, variant, pretrained, pretrained_cfg_overlay=overlay, **kwargs)


def _recorded_num_classes(path: str | Path) -> int | None:
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the loader names the file and the problem right after
        return None
    return meta.get("num_classes") if isinstance(meta, Mapping) else None


@register_model
def resnet50_gcn(
    pretrained: bool = False,
    gcn_kernel_sizes: tuple[int, int] = (GCN_STAGES[0][0], GCN_STAGES[1][0]),
    gcn_widths: tuple[int | None, int | None] | None = None,
    gcn_merge: str = "concat",
    **kwargs,
) -> ResNetGCN:
    """ResNet50-GCN (Table 11): res-4 and res-5 bottlenecks replaced by k=5 / k=7 GCN blocks.

    ``gcn_merge='sum'`` sums the two branches (ablation); its branch widths default to the
    cost-matched ones. ``gcn_widths`` overrides the widths (None: Table 11 for concat).
    ``anti_aliasing``: ``'blurpool'`` (the pretraining recipe, ``backbone.antialias``), ``'none'``, or
    ``'auto'`` (default: none, unless loaded weights were trained with it).
    """
    if gcn_widths is None:
        gcn_widths = (GCN_STAGES[0][1], GCN_STAGES[1][1]) if gcn_merge == "concat" else (None, None)
    res4 = gcn_block(gcn_kernel_sizes[0], gcn_widths[0], gcn_merge)
    res5 = gcn_block(gcn_kernel_sizes[1], gcn_widths[1], gcn_merge)
    model_args = dict(block=(Bottleneck, Bottleneck, res4, res5), layers=(3, 4, 6, 3))
    return _create_resnet_gcn("resnet50_gcn", pretrained, **dict(model_args, **kwargs))
