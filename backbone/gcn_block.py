"""The GCN residual block of ResNet50-GCN (Peng et al., Figure 5 B and Table 11).

A bottleneck (1x1 -> 3x3 -> 1x1) is replaced by two separable large-kernel branches,
``1xk -> kx1`` and ``kx1 -> 1xk`` (each conv followed by BN and ReLU), merged, then a 1x1 conv +
BN expands to the stage width; the residual is added and a ReLU closes the block.

Choices the paper leaves open, and why we made them:

* **Merge by concatenation** (default). It is the reading under which Table 11's branch widths
  are exactly the ones that match the bottleneck's cost. Per output position, a non-first
  bottleneck of ``planes`` p costs ``4p*p + 9p*p + p*4p = 17p^2`` MACs. A concat GCN block of
  branch width c costs ``2*(4p*k*c + k*c^2)`` for the branches plus ``2c*4p`` for the 1x1,
  i.e. ``8p(k+1)c + 2k c^2``:

  - res-4 (p=256, k=5): ``12288c + 10c^2 = 1,114,112`` -> c = 84.8, Table 11 says 85 (+0.2 %);
  - res-5 (p=512, k=7): ``32768c + 14c^2 = 4,456,448`` -> c = 128.9, Table 11 says 128 (-0.7 %).

  Summation (``merge='sum'``) is kept for ablation; its 1x1 then reads c channels, so the
  matched width is larger (see :func:`matched_branch_width`).
* **Stride on the first conv of each branch** in a stage's first block, so the large kernels
  never run at the higher resolution (with BlurPool, the input is blurred and subsampled once
  before both branches, for the same reason).
* The shortcut is timm's: identity, or a 1x1 stride-2 projection + BN built by timm's
  ``make_blocks``; this block only consumes it.

Speed on CPU in channels_last (the trainers' memory format). oneDNN's channels_last kernels for the
branches' *first* convs (1xk and kx1 reading all 1024 / 2048 input channels, stride 1) run 10-35 %
slower than its NCHW ones, and those two convs are most of the block's work
(``benchmarks/gcn_block_profile.py``). In a stride-1 block on a CPU channels_last input, both are
therefore computed as one matrix product of the (N*H*W, C) view of the input with the two convs'
taps stacked (``k`` taps x 2 convs x c rows), whose column blocks are then summed, shifted along W
(branch A) or H (branch B): the same convolution, with the same weights and the same zero padding
(:func:`separable_pair`). Parameters, state dict, NCHW, GPU, strided blocks, TorchScript and FX
tracing keep the plain convs.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import create_attn
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = ["GCNBlock", "gcn_block", "matched_branch_width", "bottleneck_macs_per_pixel", "gcn_macs_per_pixel",
           "separable_pair"]


def bottleneck_macs_per_pixel(planes: int) -> int:
    """MACs per output position of a non-first ResNet bottleneck (1x1, 3x3, 1x1; expansion 4)."""
    return 4 * planes * planes + 9 * planes * planes + planes * 4 * planes


def gcn_macs_per_pixel(planes: int, kernel_size: int, width: int, merge: str = "concat") -> int:
    """MACs per output position of a non-first GCN block (convolutions only)."""
    inplanes = outplanes = 4 * planes
    branches = 2 * (inplanes * kernel_size * width + kernel_size * width * width)
    merged = 2 * width if merge == "concat" else width
    return branches + merged * outplanes


def matched_branch_width(planes: int, kernel_size: int, merge: str = "concat") -> int:
    """Branch width c whose GCN block costs what the bottleneck it replaces costs (rounded).

    Solves ``2k c^2 + b c = 17 p^2`` with ``b = 8pk + 8p`` (concat) or ``8pk + 4p`` (sum).
    """
    a = 2 * kernel_size
    b = 8 * planes * kernel_size + (8 if merge == "concat" else 4) * planes
    c = bottleneck_macs_per_pixel(planes)
    return round((-b + math.sqrt(b * b + 4 * a * c)) / (2 * a))


def _shifted_sum(y: torch.Tensor, dim: int, dilation: int) -> torch.Tensor:
    """sum_j y[..., i + j*d - p, ..., j, :] over the taps j (dim -2 of ``y``), zero outside: a 'same' conv's
    taps along spatial ``dim`` (1 = H, 2 = W) of an (N, H, W, k, c) tensor of per-tap products."""
    k = y.shape[-2]
    size = y.shape[dim]
    centre = (k - 1) // 2
    out = y.select(-2, centre).clone()
    for j in range(k):
        s = (j - centre) * dilation  # output i reads input i + s
        lo, hi = max(0, -s), min(size, size - s)
        if j == centre or lo >= hi:
            continue
        out.narrow(dim, lo, hi - lo).add_(y.select(-2, j).narrow(dim, lo + s, hi - lo))
    return out


def separable_pair(x: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, dilation: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv2d(x, w_a)`` (1xk) and ``conv2d(x, w_b)`` (kx1), stride 1, 'same' zero padding, no bias, as one
    matrix product: per-tap products of every position, then the taps summed with their shifts.

    The fast form of the GCN branches' first convs for channels_last CPU tensors (see the module
    docstring); any layout works. Returns both outputs in channels_last.
    """
    n, c, h, w = x.shape
    o, k = w_a.shape[0], w_a.shape[3]
    # rows (conv, tap, out channel) x input channels
    taps = torch.stack([w_a.reshape(o, c, k).permute(2, 0, 1), w_b.reshape(o, c, k).permute(2, 0, 1)])
    y = torch.matmul(x.permute(0, 2, 3, 1).reshape(n * h * w, c), taps.reshape(2 * k * o, c).t())
    y = y.view(n, h, w, 2, k, o)
    a = _shifted_sum(y.select(3, 0), 2, dilation)  # 1xk: taps along W
    b = _shifted_sum(y.select(3, 1), 1, dilation)  # kx1: taps along H
    return a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)


def _use_separable_pair(x: torch.Tensor) -> bool:
    """The matrix-product form pays on CPU channels_last inputs (not under FX tracing: a plain conv there)."""
    if is_fx_symbolic_tracing():
        return False
    return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


class _ConvNormAct(nn.Sequential):
    """conv -> norm -> act, with 'same' padding for a (kh, kw) kernel."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: tuple[int, int],
        stride: int,
        dilation: int,
        norm_layer: type[nn.Module],
        act_layer: type[nn.Module],
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        padding = tuple(dilation * (k - 1) // 2 for k in kernel_size)
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False, **dd
        )
        self.bn = norm_layer(out_chs, **dd)
        self.act = act_layer(inplace=True)


class GCNBlock(nn.Module):
    """Residual GCN block; a drop-in for timm's ``Bottleneck`` in ``timm.models.resnet.ResNet``.

    It takes every keyword argument timm's ``make_blocks`` passes to a block (``cardinality``,
    ``base_width``, ``reduce_first``, ``dilation``, ``first_dilation``, ``aa_layer``, ``drop_block``,
    ``drop_path``, ``device``, ``dtype``, ...), so it is built by timm's stage machinery. Per-stage
    settings (``kernel_size``, ``width``, ``merge``) are bound with :func:`gcn_block`.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        cardinality: int = 1,
        base_width: int = 64,
        reduce_first: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        attn_layer: type[nn.Module] | None = None,
        aa_layer: type[nn.Module] | None = None,
        drop_block: type[nn.Module] | None = None,
        drop_path: nn.Module | None = None,
        kernel_size: int = 7,
        width: int | None = None,
        merge: str = "concat",
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if cardinality != 1 or base_width != 64 or reduce_first != 1:
            raise ValueError("GCNBlock has no grouped/widened variant (cardinality=1, base_width=64 only)")
        if merge not in ("concat", "sum"):
            raise ValueError(f"merge must be 'concat' or 'sum', got {merge!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so 'same' padding is symmetric, got {kernel_size}")
        width = width or matched_branch_width(planes, kernel_size, merge)
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and stride == 2
        if use_aa:
            # Blur and subsample once, before both branches: the large kernels stay at low resolution.
            self.aa = aa_layer(channels=inplanes, stride=stride, **dd)
            stride = 1
        else:
            self.aa = nn.Identity()

        cna = partial(_ConvNormAct, norm_layer=norm_layer, act_layer=act_layer, **dd)
        k = kernel_size
        # Branch A: 1xk then kx1; branch B: kx1 then 1xk. The stride sits on each first conv.
        self.branch_a = nn.Sequential(
            cna(inplanes, width, (1, k), stride, first_dilation), cna(width, width, (k, 1), 1, dilation)
        )
        self.branch_b = nn.Sequential(
            cna(inplanes, width, (k, 1), stride, first_dilation), cna(width, width, (1, k), 1, dilation)
        )
        self.concat = merge == "concat"
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        merged = 2 * width if self.concat else width
        self.conv = nn.Conv2d(merged, outplanes, kernel_size=1, bias=False, **dd)
        self.bn = norm_layer(outplanes, **dd)
        self.se = create_attn(attn_layer, outplanes, **dd)
        self.act = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path
        self.kernel_size = kernel_size
        self.width = width
        # stride-1 branch entries may take the matrix-product form (separable_pair) on CPU channels_last
        self.pair_dilation = first_dilation
        self.pair_form = stride == 1

    def zero_init_last(self) -> None:
        """Zero the last BN's scale so each block starts as identity (timm's ``zero_init_last``)."""
        if getattr(self.bn, "weight", None) is not None:
            nn.init.zeros_(self.bn.weight)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # TorchScript skips the body of a bare ``if not torch.jit.is_scripting()``: the script keeps the plain convs
        if not torch.jit.is_scripting():
            if self.pair_form and _use_separable_pair(x):
                return self._pair_branches(x)
        return self.branch_a(x), self.branch_b(x)

    def _pair_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a1, b1 = self.branch_a[0], self.branch_b[0]
        a, b = separable_pair(x, a1.conv.weight, b1.conv.weight, self.pair_dilation)
        return self.branch_a[1](a1.act(a1.bn(a))), self.branch_b[1](b1.act(b1.bn(b)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.aa(x)
        a, b = self._branches(x)
        x = torch.cat([a, b], dim=1) if self.concat else a + b
        x = self.drop_block(x)
        x = self.bn(self.conv(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act(x)


def gcn_block(kernel_size: int, width: int | None = None, merge: str = "concat") -> partial:
    """A GCNBlock constructor with per-stage settings bound, usable as one entry of ResNet's ``block``.

    timm reads ``block.expansion`` from the stage's block function, so the partial carries it.
    """
    fn = partial(GCNBlock, kernel_size=kernel_size, width=width, merge=merge)
    fn.expansion = GCNBlock.expansion
    return fn
