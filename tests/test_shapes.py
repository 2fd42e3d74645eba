"""The embedded shapes data set (``experiments.shapes``): determinism, the ImageNet / VOCdevkit / SBD layouts as
the real readers (``backbone.write_beton``, ``segmentation.datasets``) see them, labels that match the drawing,
the manifest and its no-rewrite rule, and the command line.

One tiny data set (62 files) is written once per module. Most of the run time is the two child processes: the
ffcv writer (it forks, so it runs away from any live ffcv Loader of the test session, and this process need not
import ffcv) and the command line.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from hangs import run_watched
from PIL import Image

from experiments import shapes
from experiments.shapes import SHAPES, ShapesSpec, render_classification, render_segmentation, write_shapes
from segmentation.datasets import IGNORE_INDEX, VOC_CLASSES, SegmentationDataset, build_samples, dataset_info

ROOT = Path(__file__).resolve().parents[1]
TINY = ShapesSpec(seed=0, train_per_class=3, val_per_class=2, voc_train=4, voc_val=3, sbd=6, min_size=40,
                  max_size=48)
TINY_FLAGS = [arg for key, value in asdict(TINY).items() for arg in (f"--{key.replace('_', '-')}", str(value))]
SBD_TRAIN = TINY.sbd * 5 // 6  # the module doc: train.txt holds 5/6 of the SBD images, val.txt the rest
MAT_HEADER_TEXT = 116  # a MAT-file's descriptive header text, where scipy writes the time of writing


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data set, written once through the API."""
    out = tmp_path_factory.mktemp("shapes") / "data"
    write_shapes(out, TINY, progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path; the parts that hold where or when a file was
    written are left out: the absolute paths in shapes.json and the time in a .mat file's header text."""
    out = {}
    for path in _files(root):
        data = path.read_bytes()
        if path.suffix == ".mat":
            assert data.startswith(b"MATLAB 5.0 MAT-file"), path
            data = data[MAT_HEADER_TEXT:]
        elif path.name == "shapes.json":
            data = path.read_text().replace(str(root), "ROOT").encode()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of an H x W x 3 uint8 image."""
    x = image.astype(np.float64) / 255
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi, lo = x.max(-1), x.min(-1)
    span = np.maximum(hi - lo, 1e-9)
    hue = np.where(hi == r, ((g - b) / span) % 6, np.where(hi == g, (b - r) / span + 2, (r - g) / span + 4))
    return 60 * hue, np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-9), 0.0), hi


def _hue_error(hue: np.ndarray, target: float) -> float:
    """Median signed distance (degrees, wrapped to [-180, 180)) of ``hue`` from ``target``."""
    return float(np.median((hue - target + 180) % 360 - 180))


def _contour(mask: np.ndarray) -> np.ndarray:
    """Object pixels (> 0) with a 4-neighbour (inside the image) of another value."""
    other = np.zeros(mask.shape, dtype=bool)
    down = mask[1:] != mask[:-1]
    right = mask[:, 1:] != mask[:, :-1]
    other[1:] |= down
    other[:-1] |= down
    other[:, 1:] |= right
    other[:, :-1] |= right
    return other & (mask > 0)


def _dilate(region: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within Chebyshev distance ``radius`` of ``region``."""
    h, w = region.shape
    padded = np.pad(region, radius)
    out = np.zeros_like(region)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def _same_picture(decoded: np.ndarray, drawn: np.ndarray) -> bool:
    """Whether a decoded JPEG shows ``drawn``: equal sizes, and 4 x 4 block means within a few levels (JPEG
    blurs the per-pixel noise of the textures; another picture is tens of levels away)."""
    if decoded.shape != drawn.shape:
        return False
    h, w = (decoded.shape[0] // 4) * 4, (decoded.shape[1] // 4) * 4

    def blocks(x: np.ndarray) -> np.ndarray:
        return x[:h, :w].astype(np.float64).reshape(h // 4, 4, w // 4, 4, 3).mean((1, 3))

    return float(np.abs(blocks(decoded) - blocks(drawn)).mean()) < 6


def _load_all(samples) -> list[tuple[np.ndarray, np.ndarray]]:
    ds = SegmentationDataset(samples, dataset_info("voc")[0])
    out = []
    for i in range(len(ds)):
        image, mask = ds.load(i)
        out.append((image.permute(1, 2, 0).numpy(), mask.numpy()))
    return out


# ---------------------------------------------------------------------------------------------
# 1. determinism
# ---------------------------------------------------------------------------------------------
def test_same_seed_writes_the_same_bytes_and_another_seed_other_images(written: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_shapes(again, TINY, progress=False)
    reference = _digests(written)
    assert len(reference) == 6 * (3 + 2) + 2 * (4 + 3) + 3 + 2 * 6 + 2 + 1  # images, masks, lists, manifest
    assert _digests(again) == reference

    other = tmp_path / "other"
    write_shapes(other, replace(TINY, seed=1), progress=False)
    digests = _digests(other)
    assert digests.keys() == reference.keys()
    images = [k for k in reference if k.endswith((".JPEG", ".jpg"))]
    assert len(images) == 6 * (3 + 2) + 4 + 3 + 6
    assert [k for k in images if digests[k] == reference[k]] == []  # every image differs
    masks = [k for k in reference if k.endswith((".png", ".mat"))]
    assert sum(digests[k] != reference[k] for k in masks) >= len(masks) - 1


def test_renderers_depend_only_on_the_generator() -> None:
    for seed in range(3):
        a, b = (render_segmentation(np.random.default_rng(seed), TINY) for _ in range(2))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        c, d = (render_classification(np.random.default_rng(seed), 2, TINY) for _ in range(2))
        assert np.array_equal(c, d)
    assert not np.array_equal(render_classification(np.random.default_rng(0), 2, TINY),
                              render_classification(np.random.default_rng(1), 2, TINY))


# ---------------------------------------------------------------------------------------------
# 2. ImageNet layout and the ffcv writer
# ---------------------------------------------------------------------------------------------
def test_imagenet_layout(written: Path) -> None:
    for split, per_class in (("train", TINY.train_per_class), ("val", TINY.val_per_class)):
        root = written / "imagenet" / split
        assert sorted(p.name for p in root.iterdir()) == sorted(SHAPES)
        for name in SHAPES:
            files = sorted((root / name).iterdir())
            assert [p.name for p in files] == [f"{name}_{i:05d}.JPEG" for i in range(per_class)]
            for path in files:
                with Image.open(path) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
                    w, h = im.size
                    im.load()
                assert TINY.min_size <= w <= TINY.max_size and TINY.min_size <= h <= TINY.max_size, (path, im.size)


@pytest.mark.slow
def test_write_beton_reads_the_train_folder(written: Path, tmp_path: Path) -> None:
    """``write_beton`` forks (and imports ffcv and numba, seconds): it runs in a child, which also reads the
    JSON beside the .beton back with ``read_meta`` and prints it."""
    beton = tmp_path / "train.beton"
    code = ("import json, sys\n"
            "from backbone.data import read_meta\n"
            "from backbone.write_beton import WriterSettings, write_beton\n"
            "write_beton(sys.argv[1], sys.argv[2], WriterSettings(max_resolution=64), num_workers=1)\n"
            "print('META ' + json.dumps(read_meta(sys.argv[2])))\n")
    proc = run_watched([sys.executable, "-c", code, str(written / "imagenet" / "train"), str(beton)], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads(next(line[5:] for line in proc.stdout.splitlines() if line.startswith("META ")))
    assert meta["num_classes"] == len(SHAPES) == 6
    assert sorted(meta["classes"]) == sorted(SHAPES)
    assert meta["num_images"] == 6 * TINY.train_per_class
    assert meta["class_counts"] == [TINY.train_per_class] * 6
    assert meta["skipped"] == []
    assert beton.stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# 3. VOCdevkit / SBD through the real loaders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_samples(written: Path) -> dict[str, list]:
    voc, sbd = written / "VOCdevkit", written / "benchmark_RELEASE"
    return {
        "train": build_samples("voc", "train", voc),
        "val": build_samples("voc", "val", voc),
        "train_aug": build_samples("voc", "train_aug", voc, sbd),
        "sbd_train": build_samples("voc", "sbd_train", voc, sbd),
        "sbd_val": build_samples("voc", "sbd_val", voc, sbd),
    }


def test_segmentation_split_sizes(seg_samples: dict[str, list]) -> None:
    sizes = {k: len(v) for k, v in seg_samples.items()}
    assert sizes == {"train": TINY.voc_train, "val": TINY.voc_val, "sbd_train": SBD_TRAIN,
                     "sbd_val": TINY.sbd - SBD_TRAIN, "train_aug": TINY.voc_train + TINY.sbd}
    voc_names = {s.name for s in seg_samples["train"] + seg_samples["val"]}
    sbd_names = {s.name for s in seg_samples["sbd_train"] + seg_samples["sbd_val"]}
    assert len(voc_names) == TINY.voc_train + TINY.voc_val and len(sbd_names) == TINY.sbd
    assert voc_names.isdisjoint(sbd_names)
    train_aug = {s.name for s in seg_samples["train_aug"]}
    assert train_aug == {s.name for s in seg_samples["train"]} | sbd_names
    assert train_aug.isdisjoint(s.name for s in seg_samples["val"])
    assert {s.label_format for s in seg_samples["train_aug"]} == {"png", "sbd_mat"}


def _check_values(mask: np.ndarray, void: bool) -> None:
    values = set(np.unique(mask).tolist())
    assert values <= set(range(7)) | ({IGNORE_INDEX} if void else set()), values
    assert ((mask >= 1) & (mask <= 6)).any(), "no object pixel"


def test_voc_masks_have_a_void_band_exactly_on_object_contours(seg_samples: dict[str, list]) -> None:
    samples = seg_samples["train"] + seg_samples["val"]
    assert [s.name for s in samples] == [f"2008_{i:06d}" for i in range(TINY.voc_train + TINY.voc_val)]
    for index, (image, mask) in enumerate(_load_all(samples)):
        _check_values(mask, void=True)
        void = mask == IGNORE_INDEX
        assert void.any()
        # every contour is covered: no two 4-neighbours outside the band hold different values
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            assert not ((a != b) & (a != IGNORE_INDEX) & (b != IGNORE_INDEX)).any()
        # the band is thin: one pixel per object contour, two where objects touch
        assert not (void & ~_dilate(~void, 2)).any()
        assert void.mean() < 0.3
        # and exactly the contours of the drawn objects: the scene again (same generator), without the band
        drawn_image, drawn = render_segmentation(shapes._rng(TINY, "voc", index), TINY, void_band=False)
        contour = _contour(drawn)
        assert np.array_equal(void, contour)  # so every void pixel is an object pixel touching another value
        assert np.array_equal(mask[~void], drawn[~void])
        assert _same_picture(image, drawn_image)


def test_sbd_masks_have_no_void(seg_samples: dict[str, list]) -> None:
    samples = seg_samples["sbd_train"] + seg_samples["sbd_val"]
    assert [s.name for s in samples] == [f"2011_{i:06d}" for i in range(TINY.sbd)]
    for index, (image, mask) in enumerate(_load_all(samples)):
        _check_values(mask, void=False)
        drawn_image, drawn = render_segmentation(shapes._rng(TINY, "sbd", index), TINY, void_band=False)
        assert np.array_equal(mask, drawn)
        assert _same_picture(image, drawn_image)


def test_voc_labels_win_in_train_aug(seg_samples: dict[str, list]) -> None:
    voc_train = {s.name for s in seg_samples["train"]}
    for s in seg_samples["train_aug"]:
        assert s.label_format == ("png" if s.name in voc_train else "sbd_mat"), s


# ---------------------------------------------------------------------------------------------
# 4. labels and class hints follow the drawing
# ---------------------------------------------------------------------------------------------
def test_segmentation_labels_cover_the_drawn_shapes() -> None:
    """Objects are vivid, the background muted: labelled object pixels are more saturated than background ones
    in every image, and each labelled region has its class's hue (class c: (c - 1) * 60 degrees)."""
    seen, hue_ok, regions = set(), 0, 0
    for seed in range(30):
        image, mask = render_segmentation(np.random.default_rng([4, seed]), TINY)
        hue, sat, _ = _hsv(image)
        objects = (mask >= 1) & (mask <= 6)
        assert sat[objects].mean() > sat[mask == 0].mean() + 0.05, seed
        assert (sat[objects] > 0.5).mean() > 0.8, seed
        for c in (int(v) for v in np.unique(mask[objects])):
            pixels = (mask == c) & (sat > 0.4)
            if pixels.sum() < 10:
                continue
            seen.add(c)
            regions += 1
            hue_ok += abs(_hue_error(hue[pixels], (c - 1) * 60)) <= 30
    assert seen == set(range(1, 7))
    assert regions >= 40 and hue_ok >= 0.9 * regions, (hue_ok, regions)


def test_classification_hue_tracks_the_class() -> None:
    """The class hint: the most saturated pixels of an image of class c have a hue of about c * 60 degrees."""
    per_class = []
    for c in range(len(SHAPES)):
        ok = 0
        for i in range(10):
            image = render_classification(np.random.default_rng([5, c, i]), c, TINY)
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert TINY.min_size <= min(image.shape[:2]) and max(image.shape[:2]) <= TINY.max_size
            hue, sat, val = _hsv(image)
            vivid = (sat > 0.5) & (val > 0.35)
            ok += vivid.sum() >= 10 and abs(_hue_error(hue[vivid], c * 60)) <= 30
        per_class.append(ok)
    assert min(per_class) >= 8 and sum(per_class) >= 56, per_class


# ---------------------------------------------------------------------------------------------
# 5. manifest and rewrites
# ---------------------------------------------------------------------------------------------
def test_manifest(written: Path) -> None:
    manifest = json.loads((written / "shapes.json").read_text())
    assert manifest["spec"] == asdict(TINY)
    assert manifest["classes"] == list(SHAPES) == ["circle", "square", "triangle", "star", "ring", "cross"]
    assert manifest["voc_ids"] == {"circle": 1, "square": 2, "triangle": 3, "star": 4, "ring": 5, "cross": 6}
    assert manifest["voc_names"] == {name: VOC_CLASSES[i + 1] for i, name in enumerate(SHAPES)}
    assert Path(manifest["imagenet"]["train"]) == written / "imagenet" / "train"
    assert Path(manifest["imagenet"]["val"]) == written / "imagenet" / "val"
    assert Path(manifest["vocdevkit"]) == written / "VOCdevkit"
    assert Path(manifest["sbd"]) == written / "benchmark_RELEASE"
    assert write_shapes(written, TINY, progress=False) == manifest  # what it returns is what the file holds


def test_same_spec_is_not_rewritten_another_spec_is(tmp_path: Path) -> None:
    out = tmp_path / "data"
    write_shapes(out, TINY, progress=False)
    old = 1_000_000_000  # stamp every file with an old time: any rewrite moves it
    for path in _files(out):
        os.utime(path, (old, old))
    before = _digests(out)
    write_shapes(out, TINY, progress=False)
    assert {p for p in _files(out) if p.stat().st_mtime != old} == set()
    assert _digests(out) == before

    smaller = replace(TINY, seed=1, train_per_class=2)
    write_shapes(out, smaller, progress=False)
    assert json.loads((out / "shapes.json").read_text())["spec"] == asdict(smaller)
    after = _digests(out)
    for name in SHAPES:  # the folder is what an ImageFolder scan reads: no image of the earlier spec is left
        assert sorted(p.name for p in (out / "imagenet" / "train" / name).iterdir()) == \
            [f"{name}_{i:05d}.JPEG" for i in range(2)]
        assert after[f"imagenet/train/{name}/{name}_00000.JPEG"] != before[f"imagenet/train/{name}/{name}_00000.JPEG"]
    assert all(p.stat().st_mtime != old for p in _files(out))  # nothing of the earlier spec is left unwritten


def test_interrupted_rewrite_is_not_taken_for_the_earlier_data_set(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    write_shapes(out, TINY, progress=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shapes, "write_sbd", broken)
    with pytest.raises(OSError, match="disk full"):
        write_shapes(out, replace(TINY, seed=1), progress=False)  # ImageNet and VOC parts rewritten, SBD not
    monkeypatch.undo()
    # half of the tree now holds seed 1: asking for seed 0 again must write it again, not trust the old manifest
    write_shapes(out, TINY, progress=False)
    reference = tmp_path / "reference"
    write_shapes(reference, TINY, progress=False)
    assert _digests(out) == _digests(reference)


# ---------------------------------------------------------------------------------------------
# 6. command line
# ---------------------------------------------------------------------------------------------
def test_import_does_not_pull_in_timm() -> None:
    """The data set is drawn with numpy and PIL: writing it must not wait for timm (or the models) to load."""
    code = "import experiments.shapes, sys; assert 'timm' not in sys.modules, 'timm imported'"
    proc = run_watched([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_writes_the_data_set_and_prints_where(written: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = run_watched([sys.executable, "-m", "experiments.shapes", "--out", str(out), *TINY_FLAGS], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in (out / "imagenet" / "train", out / "imagenet" / "val", out / "VOCdevkit", out / "benchmark_RELEASE"):
        assert str(path) in proc.stdout, (path, proc.stdout)
    assert "1 = circle" in proc.stdout and "6 = cross" in proc.stdout
    assert _digests(out) == _digests(written)  # the command line writes what the API does


@pytest.mark.parametrize(("flags", "named"), [
    (["--max-size", "10"], "--max-size"),
    (["--min-size", "16", "--max-size", "20"], "--min-size"),
    (["--voc-val", "0"], "--voc-val"),
    (["--train-per-class", "0"], "--train-per-class"),
    (["--sbd", "5"], "--sbd"),
    (["--seed", "-1"], "--seed"),
])
def test_cli_rejects_bad_flags(flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        shapes.main(["--out", str(out), *TINY_FLAGS, *flags])
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert named in err and flags[-1] in err, err
    assert not out.exists()  # checked before anything is written
