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

Runs in one process, or sharded over the processes of ``torchrun``/``srun`` like training.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
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
from engine.logs import Progress, setup_logging
from engine.loop import autocast
from engine.provenance import code_version, file_sha256
from segmentation.artifacts import load_model
from segmentation.datasets import DatasetError, SegmentationDataset, build_samples, dataset_info, palette_for
from segmentation.metrics import SegmentationMetrics, format_table
from segmentation.transforms import MEAN, STD, Normalization, eval_transform

__all__ = ["MS_SCALES", "window_logits", "predict", "evaluate_dataset", "parse_scales", "main"]

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

    def tag(self) -> str:
        """The settings in a file name: only what differs from a plain single-scale pass over the split."""
        scales = "" if self.scales == (1.0,) else "_ms" if self.scales == MS_SCALES else \
            "_s" + "-".join(f"{s:g}" for s in self.scales)
        return (f"{self.split}{scales}{'_flip' if self.flip else ''}"
                + (f"_w{self.window}o{self.overlap:g}" if self.window else "")
                + (f"_n{self.max_images}" if self.max_images else "")
                + (f"_bw{self.boundary_width}" if self.boundary_width != 5 else ""))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "scales": list(self.scales)}


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
    """Palette PNG: pixel values are the classes, the palette their colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pred.astype(np.uint8))
    im.putpalette(palette.reshape(-1).tolist())
    im.save(path)


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
                     num_workers: int = 2, per_image: bool = True) -> dict[str, Any]:
    """Scores of ``model`` on ``dataset``: images one by one, decoded by ``num_workers`` loader processes,
    sharded over ranks, counts all-reduced. With ``per_image``, ``scores['per_image']`` holds each image's
    counts (``names``; ``tp_fp_fn``: images x classes x 3; ``band``: images x 4, boundary correct / total,
    internal correct / total), in data set order: what a paired bootstrap over images resamples."""
    env = env or distrib.DistEnv()
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(dataset.num_classes, boundary_width, device=device)
    n = min(len(dataset), max_images) if max_images > 0 else len(dataset)
    mine = range(env.rank, n, env.world_size)
    normalization = getattr(model, "normalization", (MEAN, STD))
    counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    nonfinite = 0  # images whose class scores hold NaN/inf: a diverged network, whatever its mIoU says
    # its own generator: evaluating in the middle of training must not draw from the global RNG
    loader = torch.utils.data.DataLoader(_EvalImages(dataset, mine, normalization), batch_size=1, collate_fn=_single,
                                         num_workers=min(num_workers, len(mine)), pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    for i, image, label in Progress(loader, len(mine), "evaluate", enabled=env.is_main, every_s=progress_every_s,
                                    logger=log):
        x = image[None].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        scores_map = predict(model, x, scales, flip, window, overlap, amp_dtype)
        nonfinite += int(not bool(torch.isfinite(scores_map).all()))
        pred = scores_map.argmax(1)[0]
        label = label.to(device)
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
            log.info("evaluating %s on %s/%s (%d images), scales %s, flip %s, window %s", args.checkpoint,
                     dataset_name, split, len(dataset), list(scales), args.flip, window or "none")
        scores = evaluate_dataset(model, dataset, device, scales=scales, flip=args.flip, window=window,
                                  overlap=overlap, boundary_width=args.boundary_width,
                                  amp_dtype=torch.bfloat16 if on_gpu else None, memory_format=fmt,
                                  max_images=args.max_images, save_png=args.save_png,
                                  palette=palette_for(dataset_name), env=env, num_workers=args.workers)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distrib.teardown()
    if env.is_main:
        settings = EvalSettings(split, tuple(scales), args.flip, window, overlap, args.max_images, args.boundary_width)
        out = args.out or score_path(args.checkpoint, settings)
        per_image = scores.pop("per_image")
        record = {"checkpoint": str(args.checkpoint), "weights_sha256": file_sha256(args.checkpoint),
                  "dataset": dataset_name, **settings.to_json(), "classes": list(classes),
                  "code_version": code_version(), **scores}
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out.with_suffix(".per_image.npz"), **per_image)
        out.write_text(json.dumps(record, indent=1))
        print(format_table(scores, classes))
        print(f"{dataset_name}/{split}: mIoU {100 * scores['miou']:.2f}% over {scores['images']} images -> {out}")
        if args.save_png is not None:
            print(f"prediction PNGs: {args.save_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
