"""Evaluate a fine-tuned segmentation network: mIoU, per-class IoU, pixel and boundary/internal accuracy.

    python -m segmentation.evaluate --checkpoint runs/seg/voc_stage3/final.pth [--ms] [--flip] \\
        [--window 1024] [--save-png preds/]

Inference on one image: at every scale (1.0 alone, or 0.5-1.75 with ``--ms``) the image is resized,
run through the network (whole, or in overlapping ``--window`` x ``--window`` crops whose score maps
are averaged where they overlap, so a 2048x1024 Cityscapes frame never has to fit in memory at
once), optionally again mirrored (``--flip``), and the class probabilities, resized back to the
label's size, are summed over scales and flips. The prediction is their arg max. Scores are
accumulated over the whole split (``segmentation.metrics``). With ``--save-png`` every prediction
is written as a palette PNG in the data set's colours (VOC colour map / Cityscapes colours) whose
pixel values are the class indices (VOC's submission format).

With ``--crf`` the class probabilities (after scales and flips) go through a dense CRF
(``segmentation.crf``, DeepLab's defaults) at the label's resolution with the unnormalised image as
its guide, in worker processes while the network computes the next images; ``--crf-search`` instead
scores a grid of the CRF's bilateral-kernel settings on the first ``--crf-search-images`` images.

Runs in one process, or sharded over the processes of ``torchrun``/``srun`` like training.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from backbone.weights import WeightsMismatchError
from engine import distributed as distrib
from engine.files import WriteError, json_writer, npz_writer, png_writer, write_file, write_files
from engine.logs import Progress, setup_logging
from engine.loop import autocast
from engine.provenance import code_version, file_sha256
from engine.runner import short_error
from segmentation.artifacts import load_model
from segmentation.crf import (
    CRF_INSTALL,
    DEFAULT_GRID,
    CRFParams,
    CRFPool,
    CRFUnavailableError,
    crf_grid,
    default_workers,
    require_pydensecrf,
)
from segmentation.datasets import DatasetError, SegmentationDataset, build_samples, dataset_info, palette_for
from segmentation.metrics import SegmentationMetrics, format_table
from segmentation.transforms import MEAN, STD, Normalization, eval_transform

__all__ = ["MS_SCALES", "EvalSettings", "score_path", "window_logits", "predict", "predict_probabilities",
           "evaluate_dataset", "crf_search", "format_crf_search", "parse_scales", "main"]

log = logging.getLogger("segmentation.evaluate")

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass(frozen=True)
class EvalSettings:
    """Everything besides the weights that a score depends on."""

    split: str
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: int = 0
    overlap: float = 1 / 3
    max_images: int = 0  # 0: the whole split
    boundary_width: int = 5
    crf: CRFParams | None = None  # dense CRF post-processing, None: without

    def tag(self) -> str:
        """The settings in a file name: only what differs from a plain single-scale pass over the split."""
        scales = "" if self.scales == (1.0,) else "_ms" if self.scales == MS_SCALES else \
            "_s" + "-".join(f"{s:g}" for s in self.scales)
        return (f"{self.split}{scales}{'_flip' if self.flip else ''}"
                + (f"_w{self.window}o{self.overlap:g}" if self.window else "")
                + (f"_n{self.max_images}" if self.max_images else "")
                + (f"_bw{self.boundary_width}" if self.boundary_width != 5 else "")
                + (f"_{self.crf.tag()}" if self.crf is not None else ""))  # a CRF score never replaces a plain one

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "scales": list(self.scales)}  # "crf": null, or the CRF's parameters


def score_path(checkpoint: str | Path, settings: EvalSettings) -> Path:
    """``eval_<checkpoint>_<settings>.json`` beside the checkpoint: other weights or settings, another file."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"eval_{checkpoint.stem}_{settings.tag()}.json"


# ---------------------------------------------------------------------------------------------
# Inference on one image
# ---------------------------------------------------------------------------------------------
def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``length``: evenly spread, first at 0, last flush with the end."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def window_logits(model: nn.Module, x: torch.Tensor, window: int = 0, overlap: float = 1 / 3) -> torch.Tensor:
    """Logits of ``x`` (N x 3 x H x W); with ``window`` > 0 and a bigger image, from overlapping crops.

    Crops are ``window`` pixels square (cut to the image where it is smaller), start ``window x (1 -
    overlap)`` apart at most, and their logits are averaged where they overlap.
    """
    h, w = x.shape[-2:]
    if window <= 0 or (h <= window and w <= window):
        return model(x)
    if not 0 <= overlap < 1:
        raise ValueError(f"window overlap must be in [0, 1), got {overlap}")
    stride = max(1, int(window * (1 - overlap)))
    total = count = None
    for top in _starts(h, window, stride):
        for left in _starts(w, window, stride):
            out = model(x[..., top:top + window, left:left + window]).float()
            if total is None:
                total = x.new_zeros((x.shape[0], out.shape[1], h, w), dtype=torch.float32)
                count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
            total[..., top:top + out.shape[-2], left:left + out.shape[-1]] += out
            count[..., top:top + out.shape[-2], left:left + out.shape[-1]] += 1
    return total / count


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
            window: int = 0, overlap: float = 1 / 3, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class scores (N x C x H x W) of a normalised batch ``x``: probabilities summed over scales and flips.

    With one scale and no flip the raw logits are returned (same arg max, one softmax fewer).
    """
    h, w = x.shape[-2:]
    total = None
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))),
                                            mode="bilinear", align_corners=False)
        views = [xs, torch.flip(xs, dims=[3])] if flip else [xs]
        for k, view in enumerate(views):
            with autocast(x.device, amp_dtype):
                out = window_logits(model, view, window, overlap).float()
            if k == 1:
                out = torch.flip(out, dims=[3])
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            if len(scales) > 1 or flip:
                out = out.softmax(dim=1)
            total = out if total is None else total + out
    return total


def save_prediction(path: Path, pred: np.ndarray, palette: np.ndarray) -> None:
    """Palette PNG: pixel values are the classes, the palette their colours. Written whole or not at all
    (``engine.files``: a full disk raises WriteError and leaves no partial PNG)."""
    im = Image.fromarray(pred.astype(np.uint8))
    im.putpalette(palette.reshape(-1).tolist())
    write_file(path, png_writer(im))


class _EvalImages(torch.utils.data.Dataset):
    """``(index, normalised image, label)`` of some images of a data set, read in loader workers."""

    def __init__(self, dataset: SegmentationDataset, indices: Sequence[int], normalization: Normalization) -> None:
        self.dataset, self.indices, self.to_input = dataset, list(indices), eval_transform(normalization)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        index = self.indices[i]
        image, label = self.to_input(*self.dataset.load(index))
        return index, image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


def _single(batch: list[Any]) -> Any:
    return batch[0]  # images differ in size: one per batch, no stacking


def evaluate_dataset(model: nn.Module, dataset: SegmentationDataset, device: torch.device, *,
                     scales: Sequence[float] = (1.0,), flip: bool = False, window: int = 0,
                     overlap: float = 1 / 3, boundary_width: int = 5, amp_dtype: torch.dtype | None = None,
                     memory_format: torch.memory_format = torch.contiguous_format, max_images: int = 0,
                     save_png: Path | None = None, palette: np.ndarray | None = None,
                     env: distrib.DistEnv | None = None, progress_every_s: float = 30.0,
                     num_workers: int = 2, per_image: bool = True, crf: CRFParams | None = None,
                     crf_workers: int | None = None) -> dict[str, Any]:
    """Scores of ``model`` on ``dataset``: images one by one, decoded by ``num_workers`` loader processes,
    sharded over ranks, counts all-reduced. With ``per_image``, ``scores['per_image']`` holds each image's
    counts (``names``; ``tp_fp_fn``: images x classes x 3; ``band``: images x 4, boundary correct / total,
    internal correct / total), in data set order: what a paired bootstrap over images resamples.

    With ``crf``, every prediction is the dense CRF's on the class probabilities (``crf_workers``
    processes, default: this rank's share of the CPUs; 0: in this process), and ``scores`` add
    ``crf_seconds_per_image`` and ``crf_cpu_seconds_per_image`` (one image's CRF inside a worker, mean
    wall-clock and CPU time) and ``crf_workers``."""
    env = env or distrib.DistEnv()
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(dataset.num_classes, boundary_width, device=device)
    n = min(len(dataset), max_images) if max_images > 0 else len(dataset)
    mine = range(env.rank, n, env.world_size)
    normalization = getattr(model, "normalization", (MEAN, STD))
    counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    nonfinite = 0  # images whose class scores hold NaN/inf: a diverged network, whatever its mIoU says
    images = (_EvalImages if crf is None else _GuidedEvalImages)(dataset, mine, normalization)
    # its own generator: evaluating in the middle of training must not draw from the global RNG
    loader = torch.utils.data.DataLoader(images, batch_size=1, collate_fn=_single,
                                         num_workers=min(num_workers, len(mine)), pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))

    def network_predictions() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        nonlocal nonfinite
        for i, image, label in Progress(loader, len(mine), "evaluate", enabled=env.is_main,
                                        every_s=progress_every_s, logger=log):
            x = image[None].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            scores_map = predict(model, x, scales, flip, window, overlap, amp_dtype)
            nonfinite += int(not bool(torch.isfinite(scores_map).all()))
            yield i, scores_map.argmax(1)[0], label

    crf_stats: dict[str, float] = {}
    if crf is None:
        predictions = network_predictions()
    else:  # the dense CRF's predictions instead (segmentation.crf)
        crf_workers = default_workers(env.local_world_size) if crf_workers is None else crf_workers
        predictions = ((i, torch.from_numpy(crf_preds[0]).long(), label) for i, label, _, crf_preds in _crf_outputs(
            model, loader, len(mine), device, [crf], crf_workers, crf_stats, env=env, memory_format=memory_format,
            progress_every_s=progress_every_s, scales=scales, flip=flip, window=window, overlap=overlap,
            amp_dtype=amp_dtype))
    for i, pred, label in predictions:
        label = label.to(device)
        pred = pred.to(device)
        confusion, band = metrics.update(pred, label)
        if per_image:
            tp = confusion.diag()
            counts[i] = (torch.stack([tp, confusion.sum(0) - tp, confusion.sum(1) - tp], 1).cpu(), band.cpu())
        if save_png is not None:
            name = dataset.samples[i].name
            save_prediction(save_png / f"{name}.png", pred.cpu().numpy(), palette)
    metrics.all_reduce()
    model.train(was_training)
    scores = metrics.compute()
    scores["images"] = n
    if crf is not None:
        nonfinite = int(crf_stats["nonfinite"])
        scores.update(crf_seconds_per_image=crf_stats["seconds"] / max(1, crf_stats["images"]),
                      crf_cpu_seconds_per_image=crf_stats["cpu_seconds"] / max(1, crf_stats["images"]),
                      crf_workers=crf_workers)
    scores["nonfinite_images"] = int(distrib.all_reduce_sum(torch.tensor(nonfinite, device=device)))
    if per_image:
        scores["per_image"] = _gather_per_image(counts, dataset, env)
    return scores


def _gather_per_image(counts: dict[int, tuple[torch.Tensor, torch.Tensor]], dataset: SegmentationDataset,
                      env: distrib.DistEnv) -> dict[str, np.ndarray]:
    """Every rank's per-image counts, in data set order (a collective)."""
    shards: list[Any] = [counts]
    if distrib.is_initialized():
        shards = [None] * env.world_size
        torch.distributed.all_gather_object(shards, counts)
    merged = {i: c for shard in shards for i, c in shard.items()}
    order = sorted(merged)
    return {"names": np.array([dataset.samples[i].name for i in order]),
            "tp_fp_fn": np.stack([merged[i][0].numpy() for i in order]) if order else np.zeros((0, 0, 3), np.int64),
            "band": np.stack([merged[i][1].numpy() for i in order]) if order else np.zeros((0, 4), np.int64)}


# ---------------------------------------------------------------------------------------------
# Dense CRF post-processing (segmentation.crf): probabilities, the pipeline, the parameter search
# ---------------------------------------------------------------------------------------------
def predict_probabilities(model: nn.Module, x: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                          window: int = 0, overlap: float = 1 / 3,
                          amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class probabilities (N x C x H x W, summing to 1 over C) of ``predict``: the softmax of its logits
    for one view, its sum of softmaxes divided by the number of views (scales x flips) otherwise."""
    scores = predict(model, x, scales, flip, window, overlap, amp_dtype)
    if len(scales) == 1 and not flip:
        return scores.softmax(dim=1)
    return scores / (len(scales) * (2 if flip else 1))


class _GuidedEvalImages(_EvalImages):
    """``_EvalImages`` plus the unnormalised image (H x W x 3 uint8), the CRF's guide."""

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, np.ndarray]:
        index = self.indices[i]
        raw, label = self.dataset.load(index)
        image, label = self.to_input(raw, label)
        guide = raw.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().numpy()
        return index, image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor), guide


def _crf_outputs(model: nn.Module, loader: Iterable[Any], total: int, device: torch.device, grid: Sequence[CRFParams],
                 workers: int, stats: dict[str, float], *, env: distrib.DistEnv, memory_format: torch.memory_format,
                 progress_every_s: float, **predict_kw: Any,
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[np.ndarray]]]:
    """``(index, label, network's prediction, the CRF's prediction under each setting of grid)`` per image.

    The network runs here, image after image; each image's probabilities go to the CRF workers at once,
    so the CRF of one image overlaps the network pass of the next. ``stats`` accumulates ``seconds`` and
    ``cpu_seconds`` (the CRF's, per setting, wall-clock and CPU, measured in the workers) and ``images``.
    """
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    progress = Progress(None, total, "evaluate+crf", enabled=env.is_main, every_s=progress_every_s, logger=log)
    submitted = 0

    def probabilities() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for i, image, label, guide in loader:
            x = image[None].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            probs = predict_probabilities(model, x, **predict_kw)[0]
            stats["nonfinite"] += int(not bool(torch.isfinite(probs).all()))
            pending[i] = (label, probs.argmax(0).cpu())
            yield i, guide, probs.cpu().numpy()

    def shown(_: int) -> None:
        nonlocal submitted
        submitted += 1
        progress.update(network=f"{submitted}/{total}")

    stats.setdefault("seconds", 0.0)
    stats.setdefault("cpu_seconds", 0.0)
    stats.setdefault("images", 0)
    stats.setdefault("nonfinite", 0)  # images whose class probabilities hold NaN/inf
    try:
        with CRFPool(grid, workers) as pool:
            for i, crf_preds, (seconds, cpu_seconds) in pool.map(probabilities(), on_submit=shown):
                stats["seconds"] += seconds
                stats["cpu_seconds"] += cpu_seconds
                stats["images"] += 1
                label, net = pending.pop(i)
                progress.advance()
                yield i, label, net, crf_preds
    finally:
        progress.close()


def crf_search(model: nn.Module, dataset: SegmentationDataset, device: torch.device, grid: Sequence[CRFParams], *,
               images: int = 100, scales: Sequence[float] = (1.0,), flip: bool = False, window: int = 0,
               overlap: float = 1 / 3, boundary_width: int = 5, amp_dtype: torch.dtype | None = None,
               memory_format: torch.memory_format = torch.contiguous_format, env: distrib.DistEnv | None = None,
               workers: int | None = None, num_workers: int = 2, progress_every_s: float = 30.0) -> dict[str, Any]:
    """Scores of every CRF setting of ``grid`` on the first ``images`` images of ``dataset`` (DeepLab
    cross-validated its CRF on 100 val images), and of the network alone: ``{"images", "no_crf", "rows",
    "best"}``; a row is a setting's parameters plus its mIoU, pixel, boundary and internal accuracy.
    The network runs once per image; each worker runs the whole grid on an image."""
    if not grid:
        raise ValueError("the CRF search grid is empty")
    env = env or distrib.DistEnv()
    was_training = model.training
    model.eval()
    n = min(len(dataset), images) if images > 0 else len(dataset)
    mine = range(env.rank, n, env.world_size)
    normalization = getattr(model, "normalization", (MEAN, STD))
    loader = torch.utils.data.DataLoader(_GuidedEvalImages(dataset, mine, normalization), batch_size=1,
                                         collate_fn=_single, num_workers=min(num_workers, len(mine)),
                                         pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    plain = SegmentationMetrics(dataset.num_classes, boundary_width, device=device)  # device: NCCL all-reduces
    per_setting = [SegmentationMetrics(dataset.num_classes, boundary_width, device=device) for _ in grid]
    stats: dict[str, float] = {}
    workers = default_workers(env.local_world_size) if workers is None else workers
    for _, label, net, crf_preds in _crf_outputs(
            model, loader, len(mine), device, grid, workers, stats, env=env, memory_format=memory_format,
            progress_every_s=progress_every_s, scales=scales, flip=flip, window=window, overlap=overlap,
            amp_dtype=amp_dtype):
        plain.update(net, label)
        for metrics, pred in zip(per_setting, crf_preds, strict=True):
            metrics.update(torch.from_numpy(pred).long(), label)
    model.train(was_training)

    def summary(metrics: SegmentationMetrics) -> dict[str, Any]:
        metrics.all_reduce()
        s = metrics.compute()
        return {k: s[k] for k in ("miou", "pixel_acc", "boundary_acc", "internal_acc")}

    no_crf = summary(plain)
    rows = [{**params.to_json(), **summary(m)} for params, m in zip(grid, per_setting, strict=True)]
    best = max(range(len(rows)), key=lambda k: rows[k]["miou"])  # the first of equals, in grid order
    return {"images": n, "no_crf": no_crf, "rows": rows, "best": grid[best].to_json(),
            "crf_seconds_per_image": stats["seconds"] / max(1, stats["images"]),
            "crf_cpu_seconds_per_image": stats["cpu_seconds"] / max(1, stats["images"]), "crf_workers": workers}


def format_crf_search(result: dict[str, Any]) -> str:
    """The search's table (one row per setting, the best marked) and the options that select the best."""
    base = result["no_crf"]
    lines = [f"CRF search on {result['images']} images: bilateral kernel weight / spatial / colour width "
             f"(Gaussian kernel w={result['rows'][0]['pos_w']:g}, xy std {result['rows'][0]['pos_xy_std']:g}; "
             f"{result['rows'][0]['iters']} iterations)",
             "",
             "| bi_w | bi_xy_std | bi_rgb_std | mIoU (%) | vs no CRF | boundary acc. (%) | internal acc. (%) |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| no CRF | | | {100 * base['miou']:.2f} | | {100 * base['boundary_acc']:.2f} | "
             f"{100 * base['internal_acc']:.2f} |"]
    best = result["best"]
    for row in result["rows"]:
        mark = " **best**" if all(row[k] == v for k, v in best.items()) else ""
        lines.append(f"| {row['bi_w']:g} | {row['bi_xy_std']:g} | {row['bi_rgb_std']:g} | {100 * row['miou']:.2f}{mark}"
                     f" | {100 * (row['miou'] - base['miou']):+.2f} | {100 * row['boundary_acc']:.2f} | "
                     f"{100 * row['internal_acc']:.2f} |")
    best_row = next(r for r in result["rows"] if all(r[k] == v for k, v in best.items()))
    lines += ["", f"best: {CRFParams(**best).cli()}  (mIoU {100 * best_row['miou']:.2f}% vs "
                  f"{100 * base['miou']:.2f}% without CRF; CRF {1000 * result['crf_seconds_per_image']:.1f} ms "
                  f"per image and setting, {1000 * result['crf_cpu_seconds_per_image']:.1f} ms of CPU)"]
    return "\n".join(lines)


def parse_numbers(text: str) -> tuple[float, ...]:
    """argparse type of a comma-separated list of numbers >= 0 (``--crf-grid-xy-std 30,50,67``)."""
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def add_crf_arguments(p: argparse.ArgumentParser) -> None:
    """``--crf`` and ``--crf-search`` with their parameters (defaults: ``segmentation.crf.CRFParams``)."""
    d = CRFParams()
    g = p.add_argument_group("dense CRF post-processing (needs pydensecrf2: " + CRF_INSTALL + ")")
    g.add_argument("--crf", action="store_true",
                   help="dense CRF on the class probabilities (after --ms/--flip), at label resolution")
    g.add_argument("--crf-iters", type=_bounded(int, 1), default=d.iters,
                   help="mean-field iterations (default: %(default)s)")
    g.add_argument("--crf-bi-w", type=_bounded(float, 0), default=d.bi_w,
                   help="bilateral kernel weight (default: %(default)s)")
    g.add_argument("--crf-bi-xy-std", type=_bounded(float, 0), default=d.bi_xy_std,
                   help="bilateral kernel spatial std, pixels (default: %(default)s)")
    g.add_argument("--crf-bi-rgb-std", type=_bounded(float, 0), default=d.bi_rgb_std,
                   help="bilateral kernel colour std, 0-255 levels (default: %(default)s)")
    g.add_argument("--crf-pos-w", type=_bounded(float, 0), default=d.pos_w,
                   help="Gaussian kernel weight (default: %(default)s)")
    g.add_argument("--crf-pos-xy-std", type=_bounded(float, 0), default=d.pos_xy_std,
                   help="Gaussian kernel spatial std, pixels (default: %(default)s)")
    g.add_argument("--crf-workers", type=_bounded(int, 0), default=None,
                   help="CRF processes (default: the CPUs, shared among the node's ranks; 0: in this process)")
    g.add_argument("--crf-search", action="store_true",
                   help="score a grid of bilateral-kernel settings on the first --crf-search-images images, print "
                        "the table and the best setting, write crf_search_<checkpoint>_<settings>.json (or --out)")
    g.add_argument("--crf-search-images", type=_bounded(int, 0), default=100,
                   help="images of the split the search uses, from the first (DeepLab: 100; default: %(default)s)")
    for key, what in (("bi_w", "weights"), ("bi_xy_std", "spatial stds"), ("bi_rgb_std", "colour stds")):
        g.add_argument(f"--crf-grid-{key[3:].replace('_', '-')}", dest=f"crf_grid_{key}", type=parse_numbers,
                       default=DEFAULT_GRID[key],
                       help=f"search: bilateral {what} (default: {','.join(f'{v:g}' for v in DEFAULT_GRID[key])})")


def crf_from_args(args: argparse.Namespace) -> CRFParams | None:
    """The CRF settings the options ask for (None without --crf / --crf-search); ValueError for bad ones,
    CRFUnavailableError when pydensecrf is missing (checked before any network runs)."""
    if not (args.crf or args.crf_search):
        return None
    if args.crf and args.crf_search:
        raise ValueError("--crf and --crf-search are separate runs: search first, then evaluate with --crf and "
                         "the best setting's options")
    if args.crf_workers is not None and args.crf_workers < 0:
        raise ValueError(f"--crf-workers must be >= 0, got {args.crf_workers}")
    params = CRFParams(args.crf_iters, args.crf_bi_w, args.crf_bi_xy_std, args.crf_bi_rgb_std, args.crf_pos_w,
                       args.crf_pos_xy_std)
    require_pydensecrf()
    return params


def _write_crf_search(args: argparse.Namespace, result: dict[str, Any], settings: EvalSettings, dataset_name: str,
                      grid: Sequence[CRFParams]) -> Path:
    """The search's JSON (``crf_search_<checkpoint>_<settings>.json`` beside the checkpoint, or --out)."""
    checkpoint = Path(args.checkpoint)
    out = args.out or checkpoint.parent / f"crf_search_{checkpoint.stem}_{settings.tag()}.json"
    record = {"checkpoint": str(checkpoint), "weights_sha256": file_sha256(checkpoint), "dataset": dataset_name,
              **settings.to_json(), "grid": {"bi_w": sorted({p.bi_w for p in grid}),
                                             "bi_xy_std": sorted({p.bi_xy_std for p in grid}),
                                             "bi_rgb_std": sorted({p.bi_rgb_std for p in grid})},
              "code_version": code_version(), **result}
    return write_file(out, json_writer(record))


def parse_scales(text: str) -> tuple[float, ...]:
    """argparse type of a comma-separated list of positive scales (``--scales 0.75,1,1.25``)."""
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from None
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive finite numbers, got {text!r}")
    return scales


def _bounded(kind: type, low: float, high: float | None = None, high_open: bool = False) -> Callable[[str], Any]:
    """argparse type: a ``kind`` in [low, high] (or [low, high) with ``high_open``), finite."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or value < low or too_high:
            upper = "" if high is None else f" and {'below' if high_open else 'at most'} {high:g}"
            raise argparse.ArgumentTypeError(f"must be at least {low:g}{upper}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segmentation.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Data set, root and class count come from the checkpoint; --root/--sbd-root/--split override.")
    p.add_argument("--checkpoint", required=True, type=Path, help="final.pth or checkpoint_*.pt of a fine-tuning run")
    p.add_argument("--split", default=None, help="split to score (default: the run's validation split)")
    p.add_argument("--root", default=None, help="data set folder (default: the run's data.root)")
    p.add_argument("--sbd-root", default=None, help="SBD benchmark_RELEASE folder (default: the run's)")
    p.add_argument("--ms", action="store_true", help=f"multi-scale inference over {MS_SCALES}")
    p.add_argument("--scales", type=parse_scales, default=None, help="explicit scales, e.g. 0.75,1,1.25")
    p.add_argument("--flip", action="store_true", help="add horizontally mirrored inputs")
    p.add_argument("--window", type=_bounded(int, 0), default=None,
                   help="sliding-window crop size in pixels (0 = whole image; default: the run's eval.window)")
    p.add_argument("--overlap", type=_bounded(float, 0, 1, high_open=True), default=None,
                   help="window overlap share, in [0, 1) (default: the run's)")
    p.add_argument("--boundary-width", type=_bounded(int, 0), default=5, help="band w in pixels for boundary accuracy")
    p.add_argument("--max-images", type=_bounded(int, 0), default=0, help="score only the first N images (0 = all)")
    p.add_argument("--save-png", type=Path, default=None, help="write colour prediction PNGs to this folder")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON with all figures (default: eval_<checkpoint>_<split>[_ms][_flip]....json beside the "
                        "checkpoint; per-image counts in the .per_image.npz beside it)")
    p.add_argument("--workers", type=_bounded(int, 0), default=2,
                   help="data loader processes decoding images (0: in this one)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    add_crf_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # dense CRF: its settings and its package are checked before any network runs
        crf = crf_from_args(args)
    except (ValueError, CRFUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = distrib.detect_env()
    setup_logging(env.rank)
    try:
        model, meta = load_model(args.checkpoint)
        cfg = meta.get("config", {})
        data, ev = cfg.get("data", {}), cfg.get("eval", {})
        dataset_name = meta["dataset"]
        num_classes, classes = dataset_info(dataset_name)
        split = args.split or data.get("val_split", "val")
        samples = build_samples(dataset_name, split, args.root or data.get("root", ""),
                                args.sbd_root or data.get("sbd_root") or None)
    except (WeightsMismatchError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scales = args.scales or (MS_SCALES if args.ms else (1.0,))
    window = args.window if args.window is not None else int(ev.get("window", 0))
    overlap = args.overlap if args.overlap is not None else float(ev.get("overlap", 1 / 3))
    device = distrib.select_device(env, args.device)
    distrib.init(env, device)
    try:
        on_gpu = device.type == "cuda"
        fmt = torch.channels_last if on_gpu else torch.contiguous_format
        model = model.to(device, memory_format=fmt)
        dataset = SegmentationDataset(samples, num_classes)
        if env.is_main:
            log.info("evaluating %s on %s/%s (%d images), scales %s, flip %s, window %s, CRF %s", args.checkpoint,
                     dataset_name, split, len(dataset), list(scales), args.flip, window or "none",
                     ("search" if args.crf_search else crf) if crf else "none")
        if args.crf_search:
            grid = crf_grid(crf, args.crf_grid_bi_w, args.crf_grid_bi_xy_std, args.crf_grid_bi_rgb_std)
            search = crf_search(model, dataset, device, grid, images=args.crf_search_images, scales=scales,
                                flip=args.flip, window=window, overlap=overlap, boundary_width=args.boundary_width,
                                amp_dtype=torch.bfloat16 if on_gpu else None, memory_format=fmt, env=env,
                                workers=args.crf_workers, num_workers=args.workers)
        else:
            scores = evaluate_dataset(model, dataset, device, scales=scales, flip=args.flip, window=window,
                                      overlap=overlap, boundary_width=args.boundary_width,
                                      amp_dtype=torch.bfloat16 if on_gpu else None, memory_format=fmt,
                                      max_images=args.max_images, save_png=args.save_png,
                                      palette=palette_for(dataset_name), env=env, num_workers=args.workers,
                                      crf=crf, crf_workers=args.crf_workers)
    except (DatasetError, WriteError) as e:  # a data set error raised in a loader worker: its own message
        print(f"error: {short_error(e)}", file=sys.stderr)
        return 2
    finally:
        distrib.teardown()
    try:
        if env.is_main and args.crf_search:
            settings = EvalSettings(split, tuple(scales), args.flip, window, overlap, search["images"],
                                    args.boundary_width)
            out = _write_crf_search(args, search, settings, dataset_name, grid)
            print(format_crf_search(search))
            print(f"{dataset_name}/{split}: CRF search over {len(grid)} settings on {search['images']} images -> {out}")
            return 0
        if env.is_main:
            settings = EvalSettings(split, tuple(scales), args.flip, window, overlap, args.max_images,
                                    args.boundary_width, crf)
            out = args.out or score_path(args.checkpoint, settings)
            per_image = scores.pop("per_image")
            record = {"checkpoint": str(args.checkpoint), "weights_sha256": file_sha256(args.checkpoint),
                      "dataset": dataset_name, **settings.to_json(), "classes": list(classes),
                      "code_version": code_version(), **scores}
            # the counts and the JSON citing them: renamed into place only once both are written
            write_files({out.with_suffix(".per_image.npz"): npz_writer(per_image), out: json_writer(record)})
            print(format_table(scores, classes))
            print(f"{dataset_name}/{split}: mIoU {100 * scores['miou']:.2f}% over {scores['images']} images -> {out}")
            if args.save_png is not None:
                print(f"prediction PNGs: {args.save_png}")
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
