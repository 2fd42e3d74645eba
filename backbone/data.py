"""ffcv loaders for ImageNet pretraining, as ffcv-imagenet builds them, for CUDA and CPU.

The ``.beton`` comes from ``python -m backbone.write_beton`` (fields ``image``, ``label``; class map
in the JSON beside it). Batches are ``(images, labels)``: images normalised with the ImageNet
mean/std, NCHW in channels_last memory format, float16 on CUDA and float32 on CPU; labels int64 of
shape ``(B,)``; both on the requested device. Batches are views into buffers that ffcv reuses:
``.clone()`` anything kept past the next iteration, and finish (or close) every epoch you start.

Sample order (``order="random"``): epoch ``e`` of a loader with seed ``s`` is
``numpy.random.default_rng(s + e).permutation(N)`` on one process, and under ``distributed=True``
torch's ``DistributedSampler(shuffle=True, seed=s, drop_last=False)`` with ``set_epoch(e)`` (a
permutation from ``torch.Generator().manual_seed(s + e)``, padded to a multiple of the world size by
repeating its first samples, rank ``r`` taking every ``world``-th sample from ``r``). The loader
counts epochs itself (``loader.next_epoch`` goes up by one per ``iter()``), so a resumed run calls
``set_epoch(loader, start_epoch)`` once to get the same order as a run that never stopped. With
``order="quasi_random"`` ffcv reshuffles its page table in place each epoch, so the order depends on
the epochs the loader has already produced and a resumed run does not replay it.

Augmentation: the random resized crop and the flip of sample ``i`` in epoch ``e`` are a function of
``(seed, e, i)`` alone (``backbone/augment.py``; ffcv's own draw from numba's unseeded per-thread
generators), whatever the number of threads, the batch size, the rank or where a resumed epoch starts:
the same seed gives the same batches, and a resumed run replays the images of the run it continues.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from backbone.augment import SeededLoader, SeededRandomHorizontalFlip, SeededRandomResizedCropRGBImageDecoder
from backbone.write_beton import read_meta

# ffcv normalises uint8 pixels: timm's ImageNet mean and std in pixel units
IMAGENET_MEAN = np.array(IMAGENET_DEFAULT_MEAN) * 255
IMAGENET_STD = np.array(IMAGENET_DEFAULT_STD) * 255
ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM}


class TorchNormalize(Operation):
    """GPU ``NormalizeImage`` in plain torch, for machines without cupy (ffcv's version needs it).

    Same place in the pipeline and same buffer discipline: the result goes into a buffer ffcv
    allocates per batch slot, so ffcv's stream/event bookkeeping protects it like its own.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, dtype: torch.dtype) -> None:
        super().__init__()
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.dtype = dtype

    def generate_code(self):
        mean, std = self.mean, self.std

        def normalize(images: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
            b, c, h, w = images.shape
            out = result[:b].view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last view of the buffer
            out.copy_(images)
            return out.sub_(mean).div_(std)

        return normalize

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        self.mean = self.mean.to(previous_state.device, self.dtype)
        self.std = self.std.to(previous_state.device, self.dtype)
        return (
            replace(previous_state, dtype=self.dtype),
            AllocationQuery(shape=previous_state.shape, dtype=self.dtype, device=previous_state.device),
        )


def ffcv_gpu_normalize_available() -> bool:
    """ffcv's GPU NormalizeImage imports cupy (its kernel) and pytorch_pfn_extras (its stream): both or neither."""
    try:
        import cupy  # noqa: F401
        import pytorch_pfn_extras  # noqa: F401
    except ImportError:
        return False
    return True


def _gpu_normalize(dtype: torch.dtype) -> Operation:
    if not ffcv_gpu_normalize_available():
        return TorchNormalize(IMAGENET_MEAN, IMAGENET_STD, dtype)
    return NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.dtype(str(dtype).removeprefix("torch.")))


def max_loader_threads() -> int:
    """The most decoding threads a loader may have here (numba's ``NUMBA_NUM_THREADS``, the CPUs by default)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def default_loader_threads(processes_per_node: int = 1) -> int:
    """Decoding threads for one loader: the CPUs this process may use, shared among the node's processes."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus // max(1, processes_per_node), max_loader_threads()))


def image_pipeline(decoder: Operation, device: torch.device, *, flip: Operation | None,
                   dtype: torch.dtype = torch.float16) -> list[Operation]:
    """Decoder -> ``flip`` (if any) -> normalise -> NCHW channels_last tensor on ``device``.

    On CUDA this is ffcv-imagenet's order: uint8 crosses to the GPU (4x fewer bytes than float32)
    and is normalised there. On CPU, normalising after ``ToTensor`` makes the pipeline go compiled
    -> plain -> compiled, which ffcv 1.0.2 cannot schedule (``Loader()`` spins forever), so the
    CPU pipeline normalises in numba first and needs no ``ToDevice`` copy. ``dtype`` is the CUDA
    batches' (float16 under mixed precision, float32 for an fp32 model); CPU batches are float32.
    """
    ops: list[Operation] = [decoder] + ([flip] if flip is not None else [])
    if device.type == "cuda":
        return ops + [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(), _gpu_normalize(dtype)]
    return ops + [NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32), ToTensor(), ToTorchImage()]


def label_pipeline(device: torch.device) -> list[Operation]:
    # Squeeze(1), not Squeeze(): a last batch of one sample must keep its batch dimension.
    ops: list[Operation] = [IntDecoder(), ToTensor(), Squeeze(1)]
    return ops + ([ToDevice(device, non_blocking=True)] if device.type == "cuda" else [])


def _check_common(
    beton: str | Path,
    batch_size: int,
    num_workers: int,
    resolution: int,
    device: torch.device,
    distributed: bool,
) -> torch.device:
    read_meta(beton)
    for name, value in (("batch_size", batch_size), ("num_workers", num_workers), ("resolution", resolution)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, not {value}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device}")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first), or pass distributed=False"
        )
    return device


def make_train_loader(
    beton: str | Path,
    *,
    batch_size: int,
    num_workers: int,
    resolution: int,
    device: torch.device,
    distributed: bool = False,
    seed: int = 0,
    order: str = "random",
    os_cache: bool = True,
    drop_last: bool = True,
    batches_ahead: int = 3,
    dtype: torch.dtype = torch.float16,
) -> Loader:
    """Training loader: random resized crop to ``resolution``, random flip, normalise; ``seed`` picks the
    sample order and the augmentation.

    ``order``: ``"random"`` (default) or ``"quasi_random"`` (reads pages in a shuffled
    page-local order; for datasets larger than RAM with ``os_cache=False``; not available with
    ``distributed``). ``num_workers`` is the number of decoding threads (ffcv also sets
    torch's CPU thread count to it). See the module docstring for how the order follows
    ``seed`` and the epoch.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, not {order!r}")
    if order == "quasi_random" and distributed:
        raise ValueError(
            "order='quasi_random' is not supported by ffcv with distributed=True; use order='random'"
        )
    device = _check_common(beton, batch_size, num_workers, resolution, device, distributed)
    decoder = SeededRandomResizedCropRGBImageDecoder((resolution, resolution), seed=seed)
    flip = SeededRandomHorizontalFlip(seed=seed)
    return SeededLoader(
        str(beton),
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        order=ORDERS[order],
        os_cache=os_cache,
        drop_last=drop_last,
        distributed=distributed,
        seed=seed,
        batches_ahead=batches_ahead,
        pipelines={"image": image_pipeline(decoder, device, flip=flip, dtype=dtype), "label": label_pipeline(device)},
    )


def make_val_loader(
    beton: str | Path,
    *,
    batch_size: int,
    num_workers: int,
    resolution: int = 256,
    device: torch.device,
    distributed: bool = False,
    ratio: float = DEFAULT_CROP_PCT,
    os_cache: bool = True,
    dtype: torch.dtype = torch.float16,
    max_images: int = 0,
) -> Loader:
    """Validation loader: centre crop of ``ratio`` x the short side, resized to ``resolution``; the first
    ``max_images`` only when that is not 0.

    Sequential order, every sample once (last batch may be smaller). Under ``distributed``, rank
    ``r`` of ``w`` takes samples ``r, r + w, r + 2w, ...`` (:func:`val_shard`): every sample on exactly one
    rank, so scores summed over the ranks count each image once. (ffcv's own distributed order pads the
    set to a multiple of the world size by repeating samples, as torch's ``DistributedSampler`` does: right
    for training, a bias for a score.)
    """
    device = _check_common(beton, batch_size, num_workers, resolution, device, distributed)
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], not {ratio}")
    decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=ratio)
    indices = None
    if distributed or max_images:
        from ffcv.reader import Reader

        n = Reader(str(beton)).num_samples
        n = min(n, max_images) if max_images > 0 else n
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
        if n < world:  # ffcv cannot make a loader of no samples
            raise ValueError(f"{beton}: {n} images to evaluate, fewer than the {world} processes evaluating them: "
                             "evaluate on fewer processes")
        indices = val_shard(n, rank, world)
    return SeededLoader(
        str(beton),
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        order=OrderOption.SEQUENTIAL,
        os_cache=os_cache,
        drop_last=False,
        indices=indices,
        pipelines={"image": image_pipeline(decoder, device, flip=None, dtype=dtype), "label": label_pipeline(device)},
    )


def val_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """The samples rank ``rank`` of ``world_size`` evaluates: every ``world_size``-th from ``rank``, no padding (a
    rank may get one sample fewer than another, or none)."""
    return np.arange(rank, num_samples, world_size, dtype=np.uint64)


def _train_decoder(loader: Loader) -> SeededRandomResizedCropRGBImageDecoder:
    decoder = loader.pipeline_specs["image"].decoder
    if not isinstance(decoder, SeededRandomResizedCropRGBImageDecoder):
        raise TypeError(
            f"expected a loader from make_train_loader, whose decoder is a random resized crop, "
            f"got one decoding with {type(decoder).__name__}"
        )
    return decoder


def set_train_resolution(loader: Loader, resolution: int) -> None:
    """Change the crop size of a train loader; applies from the next ``iter(loader)``.

    ffcv sizes its buffers when an epoch starts and the compiled code does not depend on the
    size, so progressive resizing needs no new loader (as in ffcv-imagenet).
    """
    if int(resolution) < 1:
        raise ValueError(f"resolution must be a positive integer, not {resolution}")
    _train_decoder(loader).output_size = (int(resolution), int(resolution))


def train_resolution(loader: Loader) -> int:
    """The crop size the next epoch of a train loader will use."""
    return int(_train_decoder(loader).output_size[0])


def epoch_batches(loader: Loader, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``loader`` from batch ``skip`` on (earlier ones are decoded and dropped: the order
    is replayed, ffcv cannot seek). Leaving the loop early shuts the epoch down (:func:`close_epoch`)."""
    it = iter(loader)
    try:
        for i, batch in enumerate(it):
            if i >= skip:
                yield batch
    finally:
        close_epoch(it)


def close_epoch(it: Any, timeout_s: float = 60.0) -> None:
    """Stop an ffcv epoch that was not read to the end, without reading the rest.

    ffcv's loader thread keeps decoding until its queue (``batches_ahead`` deep) is full, and only then
    notices the stop request; closing its memory context before the thread is out could pull pages
    from under it. So: ask it to stop, wait for the thread, then release the epoch.
    """
    if getattr(it, "closed", True) or not hasattr(it, "terminate_event"):
        return
    it.terminate_event.set()
    it.join(timeout_s)
    if it.is_alive():  # should not happen; leaving the memory mapped is the safe side
        return
    it.close()
    it.closed = True


def set_val_resolution(loader: Loader, resolution: int) -> None:
    """Change the output size of a validation loader (the crop ratio stays); applies from the next epoch."""
    decoder = loader.pipeline_specs["image"].decoder
    if not isinstance(decoder, CenterCropRGBImageDecoder):
        raise TypeError(f"expected a loader from make_val_loader, got one decoding with {type(decoder).__name__}")
    if int(resolution) < 1:
        raise ValueError(f"resolution must be a positive integer, not {resolution}")
    decoder.output_size = (int(resolution), int(resolution))


def val_crop_ratio(loader: Loader) -> float:
    """The crop ratio a validation loader was compiled with (it cannot change afterwards)."""
    return float(loader.pipeline_specs["image"].decoder.ratio)


def set_epoch(loader: Loader, epoch: int) -> None:
    """Make the next ``iter(loader)`` yield epoch ``epoch``'s sample order (for resuming)."""
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, not {epoch}")
    loader.next_epoch = int(epoch)
