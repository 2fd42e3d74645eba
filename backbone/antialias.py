"""Anti-aliasing of strided convolutions, one recipe for every backbone (ffcv-imagenet's BlurPool).

Every ``Conv2d`` with a stride above 1 and at least 16 input channels first low-pass filters its
input with the 3x3 binomial filter ``[1, 2, 1]^T [1, 2, 1] / 16`` (per channel, stride 1, zero
padding), then runs as before, with its own stride: ffcv-imagenet's ``BlurPoolConv2d``. Projection
shortcuts are blurred like the 3x3s, every conv keeps its stride, so the cost barely moves (a
depthwise 3x3 per strided conv) and ResNet50 and ResNet50-GCN are anti-aliased alike. timm's own
``aa_layer`` is not used for the recipe: in a Bottleneck it runs the 3x3 at stride 1 and blurs after
it (4x that conv's MACs) and leaves the projection unblurred, while ``GCNBlock`` blurs once before
both branches -- two different networks under one switch.

The blurred conv (:class:`BlurConv2d`) is a ``Conv2d`` subclass with the same parameter names, plus
the filter as a *persistent* buffer (``<conv>.blur_filter``): a state dict says by itself which convs
were blurred, so weights never load silently into a network built without the blur (strict loading
fails on the extra keys) and a loader can rebuild the exact network from the keys alone
(:func:`blurred_convs`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AUTO", "ANTI_ALIASING", "BlurConv2d", "apply_blurpool", "blurred_convs", "anti_aliasing_of",
           "check_anti_aliasing", "MIN_CHANNELS"]

ANTI_ALIASING = ("blurpool",)  # the values of a model's ``anti_aliasing`` besides None
AUTO = "auto"  # a request that follows the weights: blurred exactly where they were trained blurred
MIN_CHANNELS = 16  # ffcv-imagenet: the stem's 3-channel conv stays as it is
FILTER_KEY = "blur_filter"


def _binomial(channels: int, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    filt = (k[:, None] * k[None, :]) / 16.0
    return filt.to(device=device, dtype=dtype or torch.float32).expand(channels, 1, 3, 3).clone()


class BlurConv2d(nn.Conv2d):
    """A strided ``Conv2d`` that blurs its input first (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer(FILTER_KEY, _binomial(self.in_channels, self.weight.device, self.weight.dtype))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> BlurConv2d:
        """The same conv (its very parameters, shared) with the blur in front."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # parameters, buffers, hooks, hyper-parameters
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new.register_buffer(FILTER_KEY, _binomial(conv.in_channels, conv.weight.device, conv.weight.dtype))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), stride=1, padding=1, groups=self.in_channels)
        return self._conv_forward(blurred, self.weight, self.bias)


def _eligible(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and max(module.stride) > 1 and module.in_channels >= MIN_CHANNELS)


def apply_blurpool(model: nn.Module, only: Iterable[str] | None = None) -> list[str]:
    """Blur before every strided conv with >= 16 input channels (or exactly the convs named in ``only``);
    in place. Returns the names of the blurred convs and marks the model ``anti_aliasing='blurpool'``."""
    names = set(only) if only is not None else None
    done = []
    for name, module in list(model.named_modules()):
        if (names is None and _eligible(module)) or (names is not None and name in names
                                                      and type(module) is nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, BlurConv2d.from_conv(module))
            done.append(name)
    if names is not None and set(done) != names:
        missing = sorted(names - set(done))
        raise ValueError(f"cannot blur {missing[:5]}: no plain Conv2d of that name in the model")
    model.anti_aliasing = "blurpool"
    return done


def blurred_convs(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The convs a state dict says were blurred (those with a ``<conv>.blur_filter`` entry)."""
    suffix = "." + FILTER_KEY
    return sorted(k[: -len(suffix)] for k in state_dict if k.endswith(suffix))


def check_anti_aliasing(value: str | None, allow_auto: bool = False) -> None:
    allowed = [None, *ANTI_ALIASING, *([AUTO] if allow_auto else [])]
    if value not in allowed:
        raise ValueError(f"anti_aliasing must be one of {allowed}, not {value!r}")


def anti_aliasing_of(model: nn.Module) -> str | None:
    """'blurpool' when the model has blurred convs, else None."""
    return "blurpool" if any(isinstance(m, BlurConv2d) for m in model.modules()) else None
