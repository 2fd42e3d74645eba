"""A small ImageNet-style folder tree (``ROOT/<wnid>/<image>.JPEG``) for tests.

Each class has its own dominant colour and stripe direction, so a tiny model can learn the
labels (the pretraining tests use that), and images mix sizes and aspect ratios. With
``oddities=True`` the tree also holds the files real ImageNet is known for: a grayscale JPEG,
a CMYK JPEG, a PNG saved under a ``.JPEG`` name, and one truncated (unreadable) JPEG.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

# (R, G, B) per class, far apart so channel swaps or label mix-ups are visible.
_PALETTE = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (180, 60, 200), (40, 200, 210)]


def class_names(n: int) -> list[str]:
    """ImageNet-like WordNet ids, already in sorted (= label) order."""
    return [f"n{i + 1:08d}" for i in range(n)]


def synthetic_image(rng: np.random.Generator, label: int, width: int, height: int) -> np.ndarray:
    """Smooth class-coloured stripes plus mild noise: (H, W, 3) uint8.

    Smooth content keeps JPEG error realistic (natural photos compress like this, pure noise
    does not), while the noise makes every image distinct.
    """
    base = np.array(_PALETTE[label % len(_PALETTE)], dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    coord = xx if label % 2 == 0 else yy
    period = 6.0 + 2.0 * (label % 3)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi))
    shade = 0.55 + 0.45 * stripes[..., None]
    img = base * shade + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagefolder(
    root: str | Path,
    *,
    classes: int = 4,
    per_class: int = 60,
    size_range: tuple[int, int] = (32, 96),
    seed: int = 0,
    oddities: bool = True,
    quality: int = 95,
) -> dict:
    """Write the tree and describe it.

    Returns a dict with ``root`` (Path), ``classes`` (sorted names), ``samples`` (list of
    ``(path, label)`` for every *readable* image, in torchvision ``ImageFolder`` order),
    ``oddities`` (name -> path: ``grayscale``, ``cmyk``, ``png_as_jpeg``, ``truncated``; the first
    three are included in ``samples``) and ``bad`` (paths of unreadable files).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = class_names(classes)
    lo, hi = size_range
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            Image.fromarray(synthetic_image(rng, label, w, h)).save(
                folder / f"{name}_{i:05d}.JPEG", quality=quality
            )

    odd: dict[str, Path] = {}
    bad: list[Path] = []
    if oddities:
        w, h = hi, lo + (hi - lo) // 2
        rgb = synthetic_image(rng, 0, w, h)
        # File names sort after the regular ones ("z" > digits), so labels stay contiguous.
        odd["grayscale"] = root / names[0] / f"{names[0]}_zgray.JPEG"
        Image.fromarray(rgb).convert("L").save(odd["grayscale"], quality=quality)
        odd["cmyk"] = root / names[-1] / f"{names[-1]}_zcmyk.JPEG"
        Image.fromarray(synthetic_image(rng, classes - 1, w, h)).convert("CMYK").save(
            odd["cmyk"], quality=quality
        )
        odd["png_as_jpeg"] = root / names[1 % classes] / f"{names[1 % classes]}_zpng.JPEG"
        Image.fromarray(synthetic_image(rng, 1 % classes, w, h)).save(odd["png_as_jpeg"], format="PNG")
        buf = io.BytesIO()
        Image.fromarray(synthetic_image(rng, 0, hi, hi)).save(buf, format="JPEG", quality=quality)
        odd["truncated"] = root / names[0] / f"{names[0]}_ztrunc.JPEG"
        odd["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        bad.append(odd["truncated"])

    samples = [
        (path, label)
        for label, name in enumerate(names)
        for path in sorted((root / name).iterdir())
        if path not in bad
    ]
    return {"root": root, "classes": names, "samples": samples, "oddities": odd, "bad": bad}


def load_rgb(path: str | Path) -> np.ndarray:
    """The reference decode (PIL, converted to RGB), independent of ffcv and OpenCV."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
