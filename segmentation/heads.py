"""Score-map modules of the segmentation network (Peng et al., Figure 2 B/C, Tables 2-5).

Each module maps one backbone stage (``in_chs`` channels) to a score map with ``num_classes``
channels at the same resolution; the network (``segmentation.network``) puts one on each of
res-2..res-5. The kinds, selected by name through :func:`make_score_head`:

========  ==========================================================  ============
name      module                                                      paper
========  ==========================================================  ============
baseline  1x1 conv                                                    Tables 5, 6
conv      one kxk conv                                                Table 2
stack     (k-1)/2 3x3 convs, in -> m -> ... -> m -> classes           Tables 3, 4
gcn       (kx1 -> 1xk) + (1xk -> kx1), summed                         Figure 2 B
========  ==========================================================  ============

None of them has BN or ReLU: the paper says so for GCN ("no nonlinearity after convolution
layers"), and the ablations compare against it as the "equivalent" linear alternatives. No
bias by default, which is how the paper counts parameters (Tables 2 and 4); the residual
branch of the Boundary Refinement block that follows carries the biases.

The stack structure is fixed by Table 4: at k=7 (three 3x3 convs, receptive field 7) on res-5
(2048 channels, 21 classes) ``2048->m, m->m, m->21`` gives 75,884,544 / 28,505,088 / 4,307,310
parameters for m = 2048 / 1024 / 210, i.e. the table's 75885K / 28505K / 4307K.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "HEADS",
    "GCN",
    "BoundaryRefinement",
    "ConvScore",
    "ConvStack",
    "make_score_head",
    "bilinear_deconv",
]

HEADS = ("baseline", "conv", "stack", "gcn", "gcn_br")


def _check_kernel(kernel_size: int, what: str, minimum: int = 1) -> None:
    if kernel_size < minimum or kernel_size % 2 == 0:
        raise ValueError(
            f"{what} needs an odd kernel size >= {minimum} (so the score map keeps the feature's size), "
            f"got {kernel_size}"
        )


class GCN(nn.Module):
    """Global Convolutional Network module (Figure 2 B): ``conv_1xk(conv_kx1(x)) + conv_kx1(conv_1xk(x))``.

    The kxk receptive field is reached with ``2k(in + out) * out`` weights instead of ``k^2 * in * out``.
    """

    def __init__(self, in_chs: int, num_classes: int, kernel_size: int = 15, bias: bool = False) -> None:
        super().__init__()
        _check_kernel(kernel_size, "GCN")
        k, p = kernel_size, kernel_size // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_chs, num_classes, (k, 1), padding=(p, 0), bias=bias),
            nn.Conv2d(num_classes, num_classes, (1, k), padding=(0, p), bias=bias),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_chs, num_classes, (1, k), padding=(0, p), bias=bias),
            nn.Conv2d(num_classes, num_classes, (k, 1), padding=(p, 0), bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefinement(nn.Module):
    """Boundary Refinement block (Figure 2 C): ``x + conv3x3(relu(conv3x3(x)))``, no BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class ConvScore(nn.Conv2d):
    """A single kxk conv score map: k=1 is the paper's baseline, k>1 the "trivial" large kernel (Table 2)."""

    def __init__(self, in_chs: int, num_classes: int, kernel_size: int = 1, bias: bool = False) -> None:
        _check_kernel(kernel_size, "conv score map")
        super().__init__(in_chs, num_classes, kernel_size, padding=kernel_size // 2, bias=bias)


class ConvStack(nn.Sequential):
    """(k-1)/2 stacked 3x3 convs reaching a kxk receptive field: ``in -> m -> ... -> m -> classes``.

    ``mid_chs`` (the paper's m) defaults to ``in_chs``, Table 3's setting (m=2048 on res-5).
    """

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        kernel_size: int = 15,
        mid_chs: int | None = None,
        bias: bool = False,
    ) -> None:
        _check_kernel(kernel_size, "conv stack", minimum=3)
        mid = in_chs if mid_chs is None else mid_chs
        depth = (kernel_size - 1) // 2
        widths = [in_chs] + [mid] * (depth - 1) + [num_classes]
        pairs = zip(widths, widths[1:], strict=False)
        super().__init__(*(nn.Conv2d(a, b, 3, padding=1, bias=bias) for a, b in pairs))


def make_score_head(
    head: str,
    in_chs: int,
    num_classes: int,
    kernel_size: int = 15,
    *,
    stack_channels: int | None = None,
    bias: bool = False,
) -> nn.Module:
    """The score-map module ``head`` (one of :data:`HEADS`) for a stage with ``in_chs`` channels.

    ``gcn_br`` gives the same module as ``gcn``: the Boundary Refinement blocks belong to the network.
    """
    if head == "baseline":
        return ConvScore(in_chs, num_classes, 1, bias=bias)
    if head == "conv":
        return ConvScore(in_chs, num_classes, kernel_size, bias=bias)
    if head == "stack":
        return ConvStack(in_chs, num_classes, kernel_size, stack_channels, bias=bias)
    if head in ("gcn", "gcn_br"):
        return GCN(in_chs, num_classes, kernel_size, bias=bias)
    raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


def _bilinear_kernel(size: int) -> torch.Tensor:
    # The FCN upsampling filter: a 2-D tent whose stride-f transposed conv is bilinear interpolation.
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    return (filt[:, None] * filt[None, :]).float()


def bilinear_deconv(channels: int, factor: int = 2) -> nn.ConvTranspose2d:
    """Learnable x``factor`` upsampling (``ConvTranspose2d``), initialised as per-channel bilinear.

    Output size is exactly ``factor`` times the input (kernel ``2f``, stride ``f``, padding ``f/2``).
    """
    if factor < 2 or factor & (factor - 1):
        raise ValueError(f"upsampling factor must be a power of two >= 2, got {factor}")
    size = 2 * factor
    deconv = nn.ConvTranspose2d(channels, channels, size, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        deconv.weight.zero_()
        kernel = _bilinear_kernel(size)
        for c in range(channels):
            deconv.weight[c, c] = kernel
    return deconv
