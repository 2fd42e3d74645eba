"""Seeded ffcv augmentations: a random resized crop and a horizontal flip drawn from (seed, epoch, sample index).

ffcv 1.0.2's ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from numba's per-thread
generators, which nothing seeds (ffcv issue #392): two runs, or a run and its resumption, crop differently.
Here every random number a sample needs is a pure function of ``(seed, epoch, sample index)``: a SplitMix64
stream keyed by those three (and by which augmentation draws), as ``segmentation.finetune.EpochSampler`` keys
the fine-tune's. The result does not depend on the decoding threads, the batch size, the rank or where an
epoch was resumed, and the crop is torchvision's ``RandomResizedCrop.get_params`` (ffcv's ``get_random_crop``)
with these numbers in place of ``np.random``.

Compiled code only sees what ffcv passes as arguments (numba freezes globals and closure variables), and
ffcv 1.0.2 passes no epoch. So each operation asks, besides its own buffers, for an 8-byte one that
:class:`SeededLoader` fills with the epoch when it starts an epoch, before the decoding thread runs: each
epoch's iterator has its own buffers, so an epoch still decoding cannot see the next one's number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from numba import njit

# Which augmentation draws: the crop's and the flip's numbers of a sample are independent streams.
CROP_STREAM, FLIP_STREAM = 1, 2
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TO_UNIT = 1.0 / (1 << 53)


# The functions below are compiled (numba: uint64 arithmetic wraps) and called from the pipeline's compiled code;
# every constant is a np.uint64, because numba turns uint64 mixed with int64 into float64.
@njit(nogil=True)
def mix64(z: np.uint64) -> np.uint64:
    """SplitMix64's output function (a bijection of 64-bit words with full avalanche)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(nogil=True)
def sample_key(seed: int, epoch: int, index: int, stream: int) -> np.uint64:
    """The key of one sample's stream: a hash chain of seed, stream, epoch and sample index."""
    k = mix64(np.uint64(seed) + _GOLDEN)
    k = mix64(k ^ (np.uint64(stream) * _GOLDEN))
    k = mix64(k ^ (np.uint64(epoch) + _GOLDEN))
    return mix64(k ^ (np.uint64(index) + _GOLDEN))


@njit(nogil=True)
def uniform(key: np.uint64, n: int) -> float:
    """The ``n``-th number in [0, 1) of the stream ``key`` (SplitMix64 seeded with ``key``; 53 bits)."""
    return float(mix64(key + (np.uint64(n) + np.uint64(1)) * _GOLDEN) >> _S11) * _TO_UNIT


@njit(nogil=True)
def seeded_random_crop(height: int, width: int, scale: np.ndarray, ratio: np.ndarray,
                       key: np.uint64) -> tuple[int, int, int, int]:
    """``(top, left, h, w)``: ffcv's ``get_random_crop`` (torchvision's) with the stream ``key``'s numbers."""
    rows, cols = int(height), int(width)
    area = rows * cols
    log_ratio = np.log(ratio)
    for attempt in range(10):
        n = 4 * attempt
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, n))
        aspect_ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(key, n + 1))
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= cols and 0 < h <= rows:
            i = int(uniform(key, n + 2) * (rows - h + 1))
            j = int(uniform(key, n + 3) * (cols - w + 1))
            return i, j, h, w
    in_ratio = cols / rows  # ten misses: the largest central crop within the ratio range
    if in_ratio < ratio.min():
        w = cols
        h = int(round(w / ratio.min()))
    elif in_ratio > ratio.max():
        h = rows
        w = int(round(h * ratio.max()))
    else:
        w = cols
        h = rows
    return (rows - h) // 2, (cols - w) // 2, h, w


def _epoch_query() -> AllocationQuery:
    return AllocationQuery((1,), np.dtype("<i8"))


class _EpochSeeded:
    """What :class:`SeededLoader` needs of an operation: its seed, and that the epoch buffer comes last."""

    seed: int
    loader_attached: bool = False

    def _check_attached(self) -> None:
        if not self.loader_attached:
            raise TypeError(f"{type(self).__name__} needs backbone.augment.SeededLoader: ffcv's Loader does not "
                            "tell the operation the epoch, so its random numbers would come from an unset buffer")


class SeededRandomResizedCropRGBImageDecoder(_EpochSeeded, RandomResizedCropRGBImageDecoder):
    """ffcv's ``RandomResizedCropRGBImageDecoder`` (same scale/ratio defaults, decode and resize), its crop drawn
    from ``(seed, epoch, sample index)``."""

    def __init__(self, output_size: tuple[int, int], seed: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (0.75, 4 / 3)) -> None:
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = int(seed)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        self._check_attached()
        state, (destination, temp) = super().declare_state_and_memory(previous_state)
        return state, (destination, temp, _epoch_query())

    def generate_code(self) -> Callable:
        # ffcv's ResizedCropRGBImageDecoder.generate_code, the crop drawn from the sample's stream
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_c, key_c = seeded_random_crop, sample_key
        scale, ratio = np.array(self.scale, dtype=np.float64), np.array(self.ratio, dtype=np.float64)
        seed, stream = self.seed, CROP_STREAM

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, epoch_buffer = my_storage
            epoch = epoch_buffer[0, 0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    selected_size = 3 * height * width
                    temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = crop_c(height, width, scale, ratio, key_c(seed, epoch, source_ix, stream))
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededRandomHorizontalFlip(_EpochSeeded, Operation):
    """ffcv's ``RandomHorizontalFlip`` (HWC arrays), each sample flipped with ``flip_prob`` by its own stream."""

    def __init__(self, seed: int, flip_prob: float = 0.5) -> None:
        super().__init__()
        self.seed = int(seed)
        self.flip_prob = float(flip_prob)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        key_c, uniform_c = sample_key, uniform
        seed, stream, flip_prob = self.seed, FLIP_STREAM, self.flip_prob

        def flip(images, memory, indices):
            dst, epoch_buffer = memory
            epoch = epoch_buffer[0, 0]
            for i in my_range(images.shape[0]):
                if uniform_c(key_c(seed, epoch, indices[i], stream), 0) < flip_prob:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True  # ffcv passes the batch's sample indices as a third argument
        return flip

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        self._check_attached()
        return (replace(previous_state, jit_mode=True),
                (AllocationQuery(previous_state.shape, previous_state.dtype), _epoch_query()))


class _SeededEpochIterator(EpochIterator):
    """ffcv's epoch iterator, which writes the epoch into the seeded operations' buffers before its thread starts."""

    def __init__(self, loader: SeededLoader, order: Sequence[int], epoch: int) -> None:
        self.epoch = epoch
        super().__init__(loader, order)  # allocates this epoch's buffers, then calls start()

    def start(self) -> None:
        for node_id in self.loader.seeded_node_ids:
            self.memory_allocations["operation"][node_id][-1][...] = self.epoch
        super().start()

    def run(self) -> None:
        # CUDA's current device is per thread and starts at GPU 0 in a new one: where a process sees several GPUs
        # (--gpus-per-node without --gpus-per-task), every rank's thread would open a context on GPU 0 (about 0.5 GB
        # each) and put its work there. The only GPU-specific line; the rest is ffcv's own thread.
        device = self.loader.device
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        super().run()


class SeededLoader(Loader):
    """ffcv's ``Loader`` that tells its seeded operations (:class:`SeededRandomResizedCropRGBImageDecoder`,
    :class:`SeededRandomHorizontalFlip`) which epoch each ``iter()`` serves: the one ``next_epoch`` names, the
    epoch that also picks the sample order; and whose decoding thread works on ``device`` (the validation loader,
    with nothing seeded, is one for that)."""

    def __init__(self, fname: str, *, pipelines: dict[str, Sequence[Operation] | PipelineSpec],
                 device: torch.device | None = None, **kwargs: Any) -> None:
        self.device = None if device is None else torch.device(device)
        seeded = [op for ops in pipelines.values() for op in _operations(ops) if isinstance(op, _EpochSeeded)]
        for op in seeded:
            op.loader_attached = True
        super().__init__(fname, pipelines=pipelines, **kwargs)
        self.seeded_node_ids = [node.id for op in seeded for node in self.graph.operation_to_node[op]]

    def __iter__(self) -> EpochIterator:
        # ffcv 1.0.2's Loader.__iter__, with an iterator that knows its epoch
        Compiler.set_num_threads(self.num_workers)
        epoch = self.next_epoch
        order = self.next_traversal_order()
        selected_order = order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return _SeededEpochIterator(self, selected_order, epoch)


def _operations(spec: Sequence[Operation] | PipelineSpec | None) -> list[Operation]:
    if spec is None:
        return []
    if isinstance(spec, PipelineSpec):
        return [op for op in (spec.decoder, *spec.transforms) if op is not None]
    return list(spec)
