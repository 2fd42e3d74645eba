"""The receptive-field tool's command line, ``python -m experiments.receptive_field``.

Models from fine-tuning checkpoints (``--checkpoint``) or built fresh (``--model BACKBONE:HEAD``),
images from a data set split or files, then ``report.receptive_field_report`` and the summary.
Errors in the input exit with code 2 and one ``error:`` line.
"""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.imaging import load_image_file, split_images
from segmentation.datasets import DatasetError
from segmentation.evaluate import parse_scales

from .measure import DEFAULT_SHARE, ImageItem, Point, Target, check_point
from .report import format_summary, receptive_field_report

__all__ = ["UsageError", "build_parser", "main"]

log = logging.getLogger("experiments.receptive_field")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def _parse_point(text: str) -> Point:
    parts = text.replace(" ", "").split(",")
    try:
        r, c = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"point must be ROW,COL (two integers, input pixels), got {text!r}") from None
    if r < 0 or c < 0:
        raise argparse.ArgumentTypeError(f"point must be ROW,COL with both >= 0, got {text!r}")
    return r, c


def _parse_share(text: str) -> float:
    try:
        share = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"share must be a number in (0, 1], got {text!r}") from None
    if not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"share must be in (0, 1], got {text!r}")
    return share


def _parse_model_spec(spec: str) -> tuple[str, str]:
    from segmentation.heads import HEADS

    backbone, sep, head = spec.rpartition(":")
    if not sep or not backbone or not head:
        raise UsageError(f"--model {spec!r}: expected BACKBONE:HEAD, e.g. resnet50:gcn "
                         f"(heads: {', '.join(HEADS)})")
    if head not in HEADS:
        raise UsageError(f"--model {spec!r}: unknown head {head!r}; choose one of {', '.join(HEADS)}")
    return backbone, head


def _unique(label: str, taken: Mapping[str, Any], extra: str = "") -> str:
    if label not in taken:
        return label
    if extra and f"{label} ({extra})" not in taken:
        return f"{label} ({extra})"
    i = 2
    while f"{label} #{i}" in taken:
        i += 1
    return f"{label} #{i}"


def _cli_description() -> str:
    doc = sys.modules[__package__].__doc__ or ""  # the package's docstring is the manual
    examples, _, outputs = doc.split("Run it::", 1)[1].partition("\n\nIt writes")
    return (f"{doc.split(chr(10), 1)[0]}\n\nThe VRF of a location is the smallest set of input pixels holding --share "
            "of |d score / d input|\n(score: a class logit there); its size is reported as % of the image and "
            f"as sqrt(area) px.\n\nexamples:\n{textwrap.indent(textwrap.dedent(examples).strip(), '  ')}"
            f"\n\nIt writes{outputs}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.receptive_field", allow_abbrev=False,
        description=_cli_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --data-root or --image, the images are the validation split of the first checkpoint's "
               "run (its data.root). Errors in the input exit with code 2.")
    m = p.add_argument_group("models (at least one)")
    m.add_argument("--checkpoint", type=Path, action="append", default=[], metavar="PATH",
                   help="final.pth of a fine-tuning run (repeatable); labelled BACKBONE+HEAD")
    m.add_argument("--model", action="append", default=[], metavar="BACKBONE:HEAD",
                   help="a fresh network, e.g. resnet50:gcn or resnet10t:baseline (repeatable); random init "
                        "seeded by --seed, so entries with the same backbone share its weights")
    m.add_argument("--pretrained", default=None, metavar="PATH",
                   help="backbone weights for every --model entry (a checkpoint file or timm[:TAG])")
    m.add_argument("--kernel-size", type=int, default=15, help="k of the gcn/conv/stack heads of --model (15)")
    m.add_argument("--num-classes", type=int, default=21, help="classes of --model networks (21)")
    m.add_argument("--seed", type=int, default=0, help="seed of the --model initialisation (0)")
    d = p.add_argument_group("images")
    d.add_argument("--data-root", default=None, metavar="VOCDEVKIT", help="data set folder (e.g. .../VOCdevkit)")
    d.add_argument("--dataset", default=None, choices=("voc", "cityscapes"),
                   help="data set of --data-root (default: the checkpoint's, else voc)")
    d.add_argument("--split", default=None, help="split of --data-root (default: val)")
    d.add_argument("--images", type=int, default=4, metavar="N", help="use the first N images of the split (4)")
    d.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                   help="an image file, JPEG/PNG (repeatable; no label: the location is the image centre)")
    o = p.add_argument_group("measure and output")
    o.add_argument("--point", type=_parse_point, default=None, metavar="ROW,COL",
                   help="location in input pixels for every image (default: the object's centre, else the "
                        "image centre)")
    o.add_argument("--scales", type=parse_scales, default=(1.0,), metavar="S1,S2",
                   help="input scales, e.g. 1,2 (default 1)")
    o.add_argument("--share", type=_parse_share, default=DEFAULT_SHARE,
                   help="share of the gradient mass the VRF holds (0.9)")
    o.add_argument("--target", default="predicted",
                   help="score to differentiate: predicted (the class predicted at the point), sum, or a class "
                        "index (default: predicted)")
    o.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    o.add_argument("--out", type=Path, default=Path("vrf"), metavar="DIR", help="output folder (default: vrf/)")
    return p


def _load_models(args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, Any] | None]:
    """Models by label, and the first checkpoint's metadata (None without checkpoints)."""
    from segmentation.artifacts import load_model
    from segmentation.network import build_segmentation_model

    specs = [_parse_model_spec(s) for s in args.model]  # check every spec before building anything
    if not specs and not args.checkpoint:
        raise UsageError("no model: give --checkpoint PATH (a fine-tuning final.pth) and/or --model BACKBONE:HEAD")
    for path in args.checkpoint:
        if not path.is_file():
            raise UsageError(f"checkpoint {path} does not exist; give the final.pth of a fine-tuning run")
    models: dict[str, nn.Module] = {}
    first_meta = None
    for path in args.checkpoint:
        log.info("loading %s", path)
        model, meta = load_model(path)
        first_meta = first_meta if first_meta is not None else meta
        margs = meta.get("model_args", {})
        label = f"{margs.get('backbone', '?')}+{margs.get('head', '?')}"
        models[_unique(label, models, path.parent.name)] = model
    init = "random" if args.pretrained is None else "pretrained backbone"
    for backbone, head in specs:
        torch.manual_seed(args.seed)
        log.info("building %s:%s (%s init, k=%d)", backbone, head, init, args.kernel_size)
        model = build_segmentation_model(backbone, head, num_classes=args.num_classes, kernel_size=args.kernel_size,
                                         pretrained=args.pretrained)
        models[_unique(f"{backbone}+{head} [{init}]", models)] = model
    return models, first_meta


def _load_images(args: argparse.Namespace, meta: dict[str, Any] | None) -> tuple[list[ImageItem], list[str]]:
    images: list[ImageItem] = []
    names: list[str] = []
    cfg = (meta or {}).get("config", {})
    data = cfg.get("data", {}) if isinstance(cfg, Mapping) else {}
    root, split = args.data_root, args.split or "val"
    if root is None and not args.image and meta is not None:  # the first checkpoint's own validation images
        root, split = data.get("root") or None, args.split or data.get("val_split") or "val"
        if root is None:
            raise UsageError("the checkpoint's run names no data.root; give --data-root VOCDEVKIT or --image PATH")
        log.info("images from the checkpoint's data set: %s (%s)", root, split)
    if root is not None:
        dataset = args.dataset or (meta or {}).get("dataset") or "voc"
        if not Path(root).exists():
            raise UsageError(f"data root {root} does not exist; give --data-root the {dataset} folder "
                             "(e.g. .../VOCdevkit)")
        found, found_names = split_images(root, split, args.images, dataset, data.get("sbd_root") or None)
        images += found
        names += found_names
    for path in args.image:
        if not path.is_file():
            raise UsageError(f"image {path} does not exist; give --image the path of a JPEG or PNG file")
        images.append(load_image_file(path))
        names.append(path.stem)
    if not images:
        raise UsageError("no images: give --data-root VOCDEVKIT (with --split, --images N) or --image PATH")
    return images, names


def main(argv: Sequence[str] | None = None) -> int:
    from backbone.weights import WeightsMismatchError
    from engine.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    target: Target = args.target
    if target not in ("predicted", "sum"):
        try:
            target = int(target)
        except ValueError:
            print(f"error: --target must be predicted, sum or a class index, got {args.target!r}", file=sys.stderr)
            return 2
    try:
        models, meta = _load_models(args)
        images, names = _load_images(args, meta)
        if args.point is not None:
            for (x, _), name in zip(images, names, strict=True):
                check_point(args.point, (int(x.shape[-2]), int(x.shape[-1])), f"--point for image {name}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but torch sees no GPU; use --device cpu or auto")
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        record = receptive_field_report(models, images, args.out, args.scales, args.share, device,
                                        points=args.point, target=target, names=names)
    except (UsageError, DatasetError, WeightsMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(record))
    print(f"figure: {record['figure']}")
    print(f"json:   {record['json']}")
    return 0
