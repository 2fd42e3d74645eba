"""BatchNorm over all processes: torch's SyncBatchNorm on GPUs, the same statistics on CPUs (gloo).

The fine-tune's recipe normalises with the statistics of the whole global batch (``model.sync_bn``), which torch
computes with CUDA-only kernels (``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``): on a CPU its
forward raises as soon as a process group exists, and DDP refuses a CPU model holding one. For the devices torch's
kernels do not cover, :func:`convert_sync_batchnorm` puts :class:`CPUSyncBatchNorm` in place instead: the same
statistics from an all-reduce of per-channel sums (a differentiable one, so the backward pass sums the statistics'
gradients over the processes as torch's kernels do). A CPU run under gloo therefore trains the recipe's BatchNorm,
and the tests drive the conversion, DDP and FLOP-counting paths that a GPU cluster takes; only torch's CUDA kernels
stay GPU-only.

:func:`local_batchnorm` turns every synchronised BatchNorm back into a per-process one (what FLOP counting on the
meta device needs: a SyncBatchNorm refuses any device but a GPU there, and BatchNorm's FLOPs are not counted anyway).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CPUSyncBatchNorm", "SYNCED", "convert_sync_batchnorm", "local_batchnorm"]

TORCH_SYNC_DEVICES = ("cuda", "hpu", "xpu")  # where torch's own SyncBatchNorm runs


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient of a sum is summed over them too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm's statistics (over every process of the group) on devices torch's kernels do not cover.

    Not a subclass of ``nn.SyncBatchNorm``: DDP refuses those on a CPU model. Evaluation, and training without a
    process group, are plain BatchNorm.
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_available() and dist.is_initialized():
            return self._global_batch_norm(input)
        return super().forward(input)

    def _global_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode BatchNorm with the mean and variance of every process's batch together."""
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        # in float64: E[x^2] - E[x]^2 over a large global batch would lose digits in float32
        x64 = x.double()
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count]),
                                    self.process_group or dist.group.WORLD)
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp(min=0)  # biased: what normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var))
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (x64 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


SYNCED = (nn.SyncBatchNorm, CPUSyncBatchNorm)  # what a converted model's BatchNorm layers are


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised over the processes, for a model that will run on ``device``:
    torch's SyncBatchNorm where its kernels run, else :class:`CPUSyncBatchNorm` (the same weights, running
    statistics and settings either way: torch's conversion, then the class swapped for ours, which holds the same
    state)."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if torch.device(device).type not in TORCH_SYNC_DEVICES:
        for m in converted.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = CPUSyncBatchNorm
    return converted


class _LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A synchronised BatchNorm's state with plain, per-process BatchNorm (any input rank, as SyncBatchNorm's)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def local_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with each synchronised BatchNorm (torch's or ours) computing per-process statistics, in place."""
    for m in module.modules():
        if isinstance(m, SYNCED):
            m.__class__ = _LocalBatchNorm
    return module
