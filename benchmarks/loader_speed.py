"""Training-loader throughput: ffcv (.beton) vs torchvision ImageFolder + DataLoader, same images.

    python benchmarks/loader_speed.py [--images 512] [--workers 2] [--resolution 160] [--batch-size 64]

Generates a few hundred JPEGs of 200-500 px (ImageNet-like sizes) in a temporary folder, writes
them to a .beton with the writer's defaults (as ImageNet would be written), then times, on the
CPU, in one run and with the same resolution, batch size and worker count:
  * torchvision: ImageFolder + RandomResizedCrop/flip/ToImage/ToDtype/Normalize (transforms.v2)
    through a torch DataLoader (persistent workers);
  * ffcv: backbone.data.make_train_loader (random resized crop, flip, normalise, float32);
  * the raw decode limit: decoding the same JPEG files plus the crop/resize, no loader, one core
    (libjpeg-turbo via OpenCV, and PIL), scaled by the worker count.
Images/s is the median over several epochs after a warm-up epoch (ffcv compiles its pipeline in
the first one), the two loaders alternating epoch by epoch. ffcv can beat the decode limit: with
the writer's defaults half of the images are stored as raw pixels and need no decoding at all.
Ends with one headline line; exits 0 whatever the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from backbone.data import IMAGENET_MEAN, IMAGENET_STD, make_train_loader  # noqa: E402
from backbone.write_beton import WriterSettings, write_beton  # noqa: E402

TARGET = 3.0


def make_jpegs(root: Path, n: int, classes: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields plus texture), 200-500 px per side, quality 90."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(200, 501, size=2))
        small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img = np.clip(img + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        path = root / f"n{i % classes:08d}" / f"img_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def epoch_rate(loader) -> float:
    """Images/s of one full epoch."""
    start, n = time.perf_counter(), 0
    for _images, labels in loader:
        n += len(labels)
    return n / (time.perf_counter() - start)


def torchvision_loader(root: Path, args) -> DataLoader:
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(args.resolution, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=(IMAGENET_MEAN / 255).tolist(), std=(IMAGENET_STD / 255).tolist()),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=True,
    )


def decode_limit(paths: list[Path], resolution: int, repeats: int) -> dict[str, float]:
    """Images/s of decode + random-resized-crop-like crop/resize on one core, no loader."""
    rng = np.random.default_rng(0)
    blobs = [np.frombuffer(p.read_bytes(), np.uint8) for p in paths]
    out = {}
    cv2.setNumThreads(1)
    start = time.perf_counter()
    for _ in range(repeats):
        for blob in blobs:
            img = cv2.imdecode(blob, cv2.IMREAD_COLOR)
            h, w = img.shape[:2]
            c = int(min(h, w) * rng.uniform(0.3, 1.0))
            cv2.resize(img[:c, :c], (resolution, resolution), interpolation=cv2.INTER_AREA)
    out["cv2"] = repeats * len(blobs) / (time.perf_counter() - start)
    crop = v2.RandomResizedCrop(resolution, antialias=True)
    start = time.perf_counter()
    for _ in range(repeats):
        for p in paths:
            with Image.open(p) as im:
                crop(im.convert("RGB"))
    out["pil"] = repeats * len(paths) / (time.perf_counter() - start)
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--images", type=int, default=512, help="generated JPEGs")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="loader workers (ffcv: decoding threads)")
    p.add_argument("--resolution", type=int, default=160, help="training crop size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per loader, after one warm-up epoch")
    p.add_argument("--max-resolution", type=int, default=500,
                   help="writer setting (500: the writer default; ffcv-imagenet's rn50 configs train on 400)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="writer setting (0.5: the writer default; ffcv-imagenet's rn50 configs use 0.10)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="loader_speed_") as tmp:
        root = Path(tmp) / "train"
        t0 = time.perf_counter()
        paths = make_jpegs(root, args.images, args.classes)
        jpeg_mib = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"generated {len(paths)} JPEGs (200-500 px, {jpeg_mib:.1f} MiB) in {time.perf_counter() - t0:.1f} s"
        )
        # The writer forks: run it before any loader exists (see ../shared/notes/ffcv.md).
        settings = WriterSettings(max_resolution=args.max_resolution,
                                  compress_probability=args.compress_probability)
        meta = write_beton(root, Path(tmp) / "train.beton", settings, num_workers=args.workers)
        print(f"wrote the .beton (max_resolution {settings.max_resolution}, compress_probability "
              f"{settings.compress_probability}): {meta['bytes'] / 2**20:.1f} MiB in {meta['seconds']:.1f} s")

        tv = torchvision_loader(root, args)
        epoch_rate(tv)  # warm-up: starts the persistent workers (forked before any ffcv thread exists)
        ffcv = make_train_loader(
            Path(tmp) / "train.beton",
            batch_size=args.batch_size,
            num_workers=args.workers,
            resolution=args.resolution,
            device=torch.device("cpu"),
        )
        t0 = time.perf_counter()
        epoch_rate(ffcv)  # warm-up: numba compiles the pipeline
        compile_s = time.perf_counter() - t0
        # Alternate the two loaders epoch by epoch, so a change in machine load hits both alike.
        rates = {"tv": [], "ffcv": []}
        for _ in range(args.epochs):
            rates["tv"].append(epoch_rate(tv))
            rates["ffcv"].append(epoch_rate(ffcv))
        tv_rate, ffcv_rate = (statistics.median(rates[k]) for k in ("tv", "ffcv"))
        del tv
        limit = decode_limit(paths, args.resolution, repeats=1)

    ratio = ffcv_rate / tv_rate
    rows = [
        (f"torchvision ImageFolder + DataLoader ({args.workers} workers)", tv_rate),
        (f"ffcv train loader ({args.workers} threads)", ffcv_rate),
        ("decode + crop, OpenCV/libjpeg-turbo, 1 core (no loader)", limit["cv2"]),
        ("decode + crop, PIL + v2.RandomResizedCrop, 1 core (no loader)", limit["pil"]),
        (f"  x {args.workers} cores: OpenCV decode limit", limit["cv2"] * args.workers),
    ]
    print(
        f"\n{args.images} images, {args.resolution} px crops, batch {args.batch_size}, "
        f"median of {args.epochs} epochs after a warm-up (ffcv warm-up incl. compile: {compile_s:.1f} s)\n"
    )
    width = max(len(r[0]) for r in rows)
    print(f"| {'pipeline':<{width}} | {'images/s':>9} | {'vs torchvision':>14} |")
    print(f"|{'-' * (width + 2)}|{'-' * 11}|{'-' * 16}|")
    for name, rate in rows:
        print(f"| {name:<{width}} | {rate:>9.0f} | {rate / tv_rate:>13.2f}x |")
    print(f"\nffcv train loader vs torchvision: {ratio:.2f}x (target >= {TARGET:g}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
