"""Dense CRF post-processing: mean-field inference in a fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011).

The paper's best VOC and Cityscapes rows (Table 7: Stage-3-MS 80.4 -> Stage-3-MS-CRF 81.0; Table 9:
77.2 -> 77.4) add DeepLab's dense CRF [its reference 7] after multi-scale testing. The energy of a
labelling x of an image I with class probabilities P is

    E(x) = sum_i -log P_i(x_i)
           + sum_{i<j} [x_i != x_j] * ( bi_w  * exp(-|p_i - p_j|^2 / 2 bi_xy_std^2 - |I_i - I_j|^2 / 2 bi_rgb_std^2)
                                      + pos_w * exp(-|p_i - p_j|^2 / 2 pos_xy_std^2) )

(p: pixel position, I: RGB colour; Potts compatibility): a bilateral *appearance* kernel, which
favours one label for nearby pixels of similar colour, and a Gaussian *smoothness* kernel, which
removes small isolated regions. ``iters`` mean-field steps approximate its marginals; the prediction is
their arg max. Widths are in pixels and colour levels (0-255) *at the resolution the CRF runs at*: the
label's, with the unnormalised uint8 RGB image as the guide.

Defaults (``CRFParams()``) are DeepLab v2's for PASCAL VOC (Chen et al., TPAMI 2018, Sec. 4.1: w2 = 3,
sigma_gamma = 3 fixed, 10 mean-field iterations, w1 / sigma_alpha / sigma_beta cross-validated on 100
val images over w1 in [3:6], sigma_alpha in [30:10:100], sigma_beta in [3:6]; the values the released
VOC ResNet-101 model uses, bi_w = 4, bi_xy_std = 67, bi_rgb_std = 3, as in kazuto1011/deeplab-pytorch's
configs/voc12.yaml). They were tuned on ~500 px images: see ``--crf-search`` in ``segmentation.evaluate``.

The inference itself is ``pydensecrf2`` (the maintained fork of Lucas Beyer's pydensecrf, Kraehenbuehl's
own C++ permutohedral-lattice code): an optional dependency, ``pip install 'pydensecrf2>=1.1'`` or the
project's ``crf`` extra. This module imports neither torch nor the network, so the worker processes of
``CRFPool`` start in a fraction of a second.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

__all__ = ["CRF_PACKAGE", "CRF_INSTALL", "CRFUnavailableError", "CRFParams", "DEFAULT_GRID", "require_pydensecrf",
           "dense_crf", "crf_labels", "crf_grid", "default_workers", "CRFPool"]

CRF_PACKAGE = "pydensecrf2>=1.1"
CRF_INSTALL = f"pip install '{CRF_PACKAGE}'   (or: pip install -e '.[crf]')"

# -log(p) of a probability 0 is infinite; clip as pydensecrf's unary_from_softmax does (its 1e-5: 11.5 nats).
_MIN_PROB = 1e-8
# A softmax (or a mean of softmaxes) in float32 sums to 1 within ~1e-6 per pixel; logits are far off.
_SUM_TOLERANCE = 1e-3

K = TypeVar("K")
_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class CRFUnavailableError(ImportError):
    """pydensecrf (the ``pydensecrf2`` distribution) cannot be imported."""


@dataclass(frozen=True)
class CRFParams:
    """The dense CRF's settings: mean-field iterations, bilateral (appearance) and Gaussian (smoothness) kernels."""

    iters: int = 10
    bi_w: float = 4.0          # w1: weight of the bilateral kernel
    bi_xy_std: float = 67.0    # sigma_alpha: its spatial width, pixels
    bi_rgb_std: float = 3.0    # sigma_beta: its colour width, 0-255 levels
    pos_w: float = 3.0         # w2: weight of the Gaussian kernel
    pos_xy_std: float = 3.0    # sigma_gamma: its spatial width, pixels

    def __post_init__(self) -> None:
        if int(self.iters) != self.iters or self.iters < 1:
            raise ValueError(f"CRF iterations must be a positive integer, got {self.iters}")
        for name in ("bi_w", "pos_w"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"CRF kernel weight {name} must be >= 0, got {getattr(self, name)}")
        for name in ("bi_xy_std", "bi_rgb_std", "pos_xy_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CRF kernel width {name} must be > 0, got {getattr(self, name)}")

    def tag(self) -> str:
        """In a file name: ``crf`` with the defaults, else every value (another setting, another file)."""
        if self == CRFParams():
            return "crf"
        return (f"crf-i{self.iters}-bi{self.bi_w:g}x{self.bi_xy_std:g}r{self.bi_rgb_std:g}"
                f"-pos{self.pos_w:g}x{self.pos_xy_std:g}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def cli(self) -> str:
        """The ``segmentation.evaluate`` options that select this setting."""
        return (f"--crf --crf-iters {self.iters} --crf-bi-w {self.bi_w:g} --crf-bi-xy-std {self.bi_xy_std:g} "
                f"--crf-bi-rgb-std {self.bi_rgb_std:g} --crf-pos-w {self.pos_w:g} --crf-pos-xy-std {self.pos_xy_std:g}")


# --crf-search's default grid over the bilateral kernel: DeepLab v2's coarse ranges (w1 in [3:6],
# sigma_alpha in [30:10:100], sigma_beta in [3:6]), thinned to 3 x 4 x 2 = 24 settings.
DEFAULT_GRID: dict[str, tuple[float, ...]] = {"bi_w": (3, 4, 5), "bi_xy_std": (30, 50, 67, 100), "bi_rgb_std": (3, 5)}


def crf_grid(base: CRFParams, bi_w: Sequence[float] = DEFAULT_GRID["bi_w"],
             bi_xy_std: Sequence[float] = DEFAULT_GRID["bi_xy_std"],
             bi_rgb_std: Sequence[float] = DEFAULT_GRID["bi_rgb_std"]) -> list[CRFParams]:
    """Every combination of the bilateral kernel's weight and widths; iterations and Gaussian kernel from ``base``."""
    return [replace(base, bi_w=float(w), bi_xy_std=float(xy), bi_rgb_std=float(rgb))
            for w in bi_w for xy in bi_xy_std for rgb in bi_rgb_std]


def require_pydensecrf() -> ModuleType:
    """``pydensecrf.densecrf``, or an error that says how to install it."""
    try:
        return importlib.import_module("pydensecrf.densecrf")
    except ImportError as e:
        raise CRFUnavailableError(
            f"dense CRF post-processing (--crf, --crf-search) needs the {CRF_PACKAGE.split('>')[0]} package, "
            f"which is not installed here ({e}). Install it with: {CRF_INSTALL}. It builds a C++/Cython extension "
            "from source: a C++ compiler (g++) is needed.") from e


def _check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"the CRF's guide must be the unnormalised RGB image, H x W x 3 uint8; got shape "
                         f"{image.shape}, {image.dtype}")
    if probs.ndim != 3:
        raise ValueError(f"class probabilities must be C x H x W, got shape {probs.shape}")
    if image.shape[:2] != probs.shape[1:]:
        raise ValueError(f"the image is {image.shape[1]}x{image.shape[0]} but the class probabilities are "
                         f"{probs.shape[2]}x{probs.shape[1]} (width x height): the CRF needs both at the label's "
                         "resolution")
    if probs.shape[0] < 2:
        raise ValueError(f"a CRF needs at least 2 classes, got {probs.shape[0]}")
    sums = probs.sum(0, dtype=np.float64)
    if not np.all(np.abs(sums - 1) <= _SUM_TOLERANCE) or probs.min() < 0:
        raise ValueError(f"the CRF takes class probabilities (>= 0, summing to 1 over classes), got sums "
                         f"{sums.min():.4g}..{sums.max():.4g} and minimum {probs.min():.4g}: logits? apply a softmax")


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field marginals (C x H x W float32) of the dense CRF on class probabilities ``probs`` (C x H x W,
    summing to 1 over classes) with guide ``image`` (H x W x 3 uint8 RGB, the same H x W)."""
    dcrf = require_pydensecrf()
    image, probs = np.asarray(image), np.asarray(probs)
    _check_inputs(image, probs)
    c, h, w = probs.shape
    unary = -np.log(np.clip(probs.reshape(c, h * w), _MIN_PROB, 1.0)).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    # Potts compatibilities with DeepLab's kernel weights; symmetric normalisation is the library's default.
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    # pydensecrf takes the image as a writable C-contiguous buffer: PIL's arrays (np.asarray) are read-only
    guide = np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=guide, compat=params.bi_w)
    return np.asarray(crf.inference(params.iters), dtype=np.float32).reshape(c, h, w)


def crf_labels(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """The CRF's prediction: arg max of its marginals, H x W uint8 (int64 beyond 256 classes)."""
    labels = dense_crf(image, probs, params).argmax(0)
    return labels.astype(np.uint8 if probs.shape[0] <= 256 else np.int64)


def _crf_job(image: np.ndarray, probs: np.ndarray,
             grid: Sequence[CRFParams]) -> tuple[list[np.ndarray], tuple[float, float]]:
    """One image under every setting of ``grid``: the label maps, and the wall-clock and CPU seconds per
    setting in the worker (CPU time too: on a shared machine the wall clock measures the neighbours)."""
    wall, cpu = time.perf_counter(), time.process_time()
    labels = [crf_labels(image, probs, p) for p in grid]
    return labels, ((time.perf_counter() - wall) / len(grid), (time.process_time() - cpu) / len(grid))


def _worker_init() -> None:
    require_pydensecrf()  # fail in the worker's start-up, with the install hint, not on the first image


def default_workers(processes_per_node: int = 1) -> int:
    """CPUs this process may use, shared among the evaluation's processes on the node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, processes_per_node))


class CRFPool:
    """Runs the CRF over images in worker processes while the caller computes the next images' probabilities.

    ``map(items)`` takes ``(key, image, probs)`` and yields ``(key, label maps, (wall, CPU) seconds per
    setting)`` in the order given, at most ``2 x workers`` images in flight (a Cityscapes frame's
    probabilities are 160 MB).
    Workers come from a fork server (spawn where there is none), not from a fork of this process: a
    fork of a process running torch's thread pools and loader workers may deadlock, and the workers need
    only numpy and pydensecrf. ``workers=0`` runs in this process.
    """

    def __init__(self, grid: Sequence[CRFParams], workers: int) -> None:
        require_pydensecrf()  # the error before the network runs, not after
        self.grid, self.workers = list(grid), workers
        self.executor = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(_START_METHOD),
                                             initializer=_worker_init) if workers > 0 else None)

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def map(self, items: Iterable[tuple[K, np.ndarray, np.ndarray]],
            on_submit: Callable[[K], None] | None = None,
            ) -> Iterator[tuple[K, list[np.ndarray], tuple[float, float]]]:
        if self.executor is None:
            for key, image, probs in items:
                if on_submit is not None:
                    on_submit(key)
                yield (key, *_crf_job(image, probs, self.grid))
            return
        pending: deque[tuple[K, Future]] = deque()
        for key, image, probs in items:
            _check_inputs(np.asarray(image), np.asarray(probs))  # a bad pair fails here, naming the sizes
            pending.append((key, self.executor.submit(_crf_job, image, probs, self.grid)))
            if on_submit is not None:
                on_submit(key)
            while len(pending) >= 2 * self.workers:
                done_key, future = pending.popleft()
                yield (done_key, *future.result())
        while pending:
            done_key, future = pending.popleft()
            yield (done_key, *future.result())
