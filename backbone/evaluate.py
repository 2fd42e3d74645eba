"""ImageNet classification scores of a network under a stated protocol: the one home of top-1/top-5.

    python -m backbone.evaluate --weights runs/pretrain/resnet50_gcn/final.pth --data /data/ffcv/val.beton
    python -m backbone.evaluate --weights ... --data ... --resolution 256 --flip      # ffcv-imagenet's protocol

Two protocols are named here. :data:`PAPER` is Table 6's: "top-5 error of 224x224 center-crop on 256x256
image", i.e. the centre 224/256 of the short side, resized to 224, one view. ffcv-imagenet's
(:func:`ffcv_protocol`) validates at ``val_res`` (256) on the same 224/256 crop and averages the logits
of the image and its mirror; pretraining reports it every epoch. The scores of a final evaluation are
written as JSON beside the weights (:func:`record_path`) with the weights' SHA-256, the data's, the
protocol and the code version, so a table can tell whether they belong to the file it cites.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import DEFAULT_CROP_PCT
from torch import nn

from engine import distributed as distrib
from engine.files import WriteError, write_json
from engine.loop import autocast
from engine.provenance import code_version, file_sha256

__all__ = ["Protocol", "PAPER", "ffcv_protocol", "tta_logits", "classification_totals", "evaluate_classifier",
           "record_path", "write_record", "main"]


@dataclass(frozen=True)
class Protocol:
    """How validation images are shown to the network."""

    resolution: int  # the square the centre crop is resized to
    crop_ratio: float = DEFAULT_CROP_PCT  # crop side / short side of the image (224/256)
    flip: bool = False  # average the logits of the image and its mirror

    def describe(self) -> str:
        return (f"centre crop of {self.crop_ratio:g} x the short side, resized to {self.resolution} px"
                + (", logits averaged with the mirrored image" if self.flip else ", one view"))

    @property
    def tag(self) -> str:
        return f"{self.resolution}_crop{self.crop_ratio:g}" + ("_flip" if self.flip else "")


PAPER = Protocol(224)  # Table 6: 224 x 224 centre crop of the 256 x 256 image, no flip


def ffcv_protocol(val_res: int) -> Protocol:
    """ffcv-imagenet's validation: the 224/256 crop at ``val_res`` px with flip averaging."""
    return Protocol(val_res, DEFAULT_CROP_PCT, True)


def tta_logits(model: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """fp32 logits of ``images``; with ``flip``, plus those of their mirror images (summed in fp32: a bf16
    sum can reorder close logits)."""
    logits = model(images).float()
    if flip:
        logits = logits + model(torch.flip(images, dims=[3])).float()
    return logits


def classification_totals(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sums over one batch: ``[top-1 hits, top-k hits, cross-entropy, images]`` (1-D float tensor)."""
    hits = logits.topk(min(k, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                        torch.tensor(labels.numel(), device=labels.device)]).double()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                        *, flip: bool, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy and error, and mean cross-entropy over ``batches`` (summed over ranks)."""
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # top1, top5, loss sum, count
    for images, labels in batches:
        with autocast(device, amp_dtype):
            logits = tta_logits(model, images, flip)
        totals += classification_totals(logits, labels, 5).to(totals)
    distrib.all_reduce_sum(totals)
    top1, top5, loss, n = totals.tolist()
    n = max(n, 1)
    return {"top1": top1 / n, "top5": top5 / n, "top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n,
            "loss": loss / n, "images": int(n)}


def record_path(weights: str | Path, protocol: Protocol) -> Path:
    """Where the scores of ``weights`` under ``protocol`` are kept: ``eval_imagenet_<protocol>.json`` beside them."""
    return Path(weights).parent / f"eval_imagenet_{protocol.tag}.json"


def write_record(weights: str | Path, data: str | Path, protocol: Protocol, scores: dict[str, Any],
                 out: str | Path | None = None) -> Path:
    """The scores with what they are the scores of: weights and data by content hash, protocol, code version.
    Raises ``engine.files.WriteError`` when it cannot be written (the file is then as it was)."""
    from backbone.write_beton import meta_path

    out = Path(out) if out is not None else record_path(weights, protocol)
    record = {**scores, "protocol": {**asdict(protocol), "description": protocol.describe()},
              "weights": {"path": str(Path(weights).resolve()), "sha256": file_sha256(weights)},
              "data": {"path": str(Path(data).resolve()), "meta_sha256": file_sha256(meta_path(data))},
              "code_version": code_version()}
    return write_json(out, record)  # whole or not at all: a full disk raises WriteError, leaves no empty file


def main(argv: Sequence[str] | None = None) -> int:
    from backbone.artifacts import load_backbone
    from backbone.data import default_loader_threads, make_val_loader, max_loader_threads
    from backbone.weights import WeightsMismatchError
    from engine.config import ConfigError
    from engine.logs import setup_logging

    p = argparse.ArgumentParser(prog="python -m backbone.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--weights", required=True, type=Path, help="final.pth (or a checkpoint) of a pretraining run")
    p.add_argument("--data", required=True, type=Path, help="validation .beton (python -m backbone.write_beton)")
    p.add_argument("--resolution", type=int, default=PAPER.resolution, help="side of the resized crop (224)")
    p.add_argument("--crop-ratio", type=float, default=PAPER.crop_ratio, help="crop side / short side (0.875)")
    p.add_argument("--flip", action="store_true", help="average with the mirrored image (ffcv-imagenet's protocol)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None,
                   help="ffcv decoding threads (default: the CPUs this process may use, shared among the "
                        "node's processes)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default: eval_imagenet_<protocol>.json beside --weights)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = p.parse_args(argv)
    env = distrib.detect_env()
    setup_logging(env.rank)
    protocol = Protocol(args.resolution, args.crop_ratio, args.flip)
    workers = default_loader_threads(env.local_world_size) if args.workers is None else args.workers
    if not 1 <= workers <= max_loader_threads():
        print(f"error: --workers {workers}: ffcv decodes with 1 to {max_loader_threads()} threads on this machine "
              f"(numba's NUMBA_NUM_THREADS); pass --workers {max_loader_threads()} or fewer", file=sys.stderr)
        return 2
    try:
        model, _ = load_backbone(args.weights)
        device = distrib.select_device(env, args.device)
        # under torchrun / srun each process scores its own share of the images (each image once), rank 0 writes
        distrib.init(env, device)
        loader = make_val_loader(args.data, batch_size=args.batch_size, num_workers=workers,
                                 resolution=protocol.resolution, ratio=protocol.crop_ratio, device=device,
                                 distributed=env.distributed)
        model = model.to(device, memory_format=torch.channels_last)
        scores = evaluate_classifier(model, loader, device, flip=protocol.flip,
                                     amp_dtype=torch.bfloat16 if device.type == "cuda" else None)
        out = write_record(args.weights, args.data, protocol, scores, args.out) if env.is_main else None
    except (WeightsMismatchError, FileNotFoundError, ValueError, ConfigError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distrib.teardown()
    if env.is_main:
        print(f"{args.weights} on {args.data} ({protocol.describe()}): top-1 error {100 * scores['top1_error']:.2f}%, "
              f"top-5 error {100 * scores['top5_error']:.2f}% over {scores['images']} images"
              + (f" ({env.world_size} processes)" if env.distributed else "") + f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
