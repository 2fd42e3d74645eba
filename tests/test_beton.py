"""The ImageNet -> ffcv writer and the loaders, on a generated ImageFolder tree.

Cost: numba compiles each ffcv pipeline in every new process (seconds), so this module writes its
.beton files once, builds its few loaders in-process (shared by module fixtures) and starts three
child processes: one that runs all the writes (ffcv's writer forks, which is unsafe next to a live
Loader), and the two ranks of the distributed check, which also guard the CPU pipelines against
ffcv's scheduling hang.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ffcv.reader import Reader
from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage
from hangs import Hung, Watched, run_watched
from imagenet_fixture import REPO_ROOT, load_rgb, make_imagefolder
from torch.utils.data import DistributedSampler

from backbone import write_beton as wb
from backbone.augment import SeededRandomHorizontalFlip, SeededRandomResizedCropRGBImageDecoder
from backbone.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchNormalize,
    image_pipeline,
    label_pipeline,
    make_train_loader,
    make_val_loader,
    read_meta,
    set_epoch,
    set_train_resolution,
    train_resolution,
)

CPU = torch.device("cpu")
RAW_MAX_RES = 64  # the raw .beton is written with this max side, so the larger images get resized
VAL_RES = 40
TRAIN_BATCH = 32
TRAIN_SEED = 7
# Children are watched for progress (hangs.Watched), not timed: a hang fails when nothing moved for a while,
# however slow a busy machine makes a healthy child (~20-60 s of wall time on 2 busy cores, mostly numba
# compiling). ffcv's scheduling hang spins instead, so the loader children also get a budget of CPU seconds,
# about 5x what they use (a busy machine stretches wall time, not CPU time).
RANKS_CPU_BUDGET_S = 300


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    return make_imagefolder(
        tmp_path_factory.mktemp("imagenet") / "train",
        classes=4,
        per_class=60,
        size_range=(32, 96),
        seed=0,
        oddities=True,
    )


@pytest.fixture(scope="module")
def labels(tree) -> np.ndarray:
    return np.array([label for _, label in tree["samples"]])


# One child writes both .beton files (defaults, and raw at a small max side), then runs the writer
# with one image failing inside a writer worker, after the up-front check passed (a file changed
# meanwhile, or the disk filled up).


@pytest.fixture(scope="module")
def betons(tree, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("betons")
    failed_dir = out / "failed"
    failed_dir.mkdir()
    paths = [out / "train.beton", out / "raw.beton", failed_dir / "train.beton"]
    child = run_watched([sys.executable, "-m", "children.scripted_writes", str(tree["root"]), *map(str, paths),
                         str(RAW_MAX_RES)], cwd=REPO_ROOT)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.split("RESULT")[-1])
    assert result["rcs"][:2] == [0, 0], child.stderr
    return {
        "default": paths[0],
        "raw": paths[1],
        "summary": result["summary"],
        "failed_dir": failed_dir,
        "failed_rc": result["rcs"][2],
        "stderr": child.stderr,
    }


# Each rank builds the train and val loaders under a real 2-process gloo group and reports their
# sample orders. Building is where ffcv 1.0.2 spins forever on a pipeline it cannot schedule (the
# GPU order on CPU), so these children, watched with a CPU budget, also guard the CPU pipelines.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(betons, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [
        Watched([sys.executable, "-m", "children.loader_rank", str(betons["default"]), str(out / f"{r}.json")],
                cwd=REPO_ROOT, env={**env, "RANK": str(r)}, stderr=subprocess.STDOUT)
        for r in range(2)
    ]
    logs, timed_out = [], False
    try:
        for p in procs:  # the two ranks wait for each other: either one's progress counts
            p.wait(others=[q for q in procs if q is not p], cpu_budget_s=RANKS_CPU_BUDGET_S)
    except Hung as e:
        timed_out = True
        logs.append(str(e))
    finally:
        for p in procs:
            p.kill()
    logs += [p.output for p in procs]
    return {
        "rcs": [p.proc.returncode for p in procs],
        "timed_out": timed_out,
        "logs": logs,
        "results": [
            json.loads((out / f"{r}.json").read_text()) if (out / f"{r}.json").exists() else None
            for r in range(2)
        ],
    }


@pytest.fixture(scope="module")
def cpu_pipeline_ok(ranks) -> None:
    """In-process loaders only once children showed that building the CPU loaders does not hang."""
    if ranks["timed_out"] or ranks["rcs"] != [0, 0]:
        pytest.fail(
            "building the CPU loaders failed in a child; see test_cpu_pipelines_build_without_hanging"
        )


@pytest.fixture(scope="module")
def train_loader(betons, cpu_pipeline_ok):
    return make_train_loader(
        betons["default"], batch_size=TRAIN_BATCH, num_workers=2, resolution=32, device=CPU, seed=TRAIN_SEED
    )


@pytest.fixture(scope="module")
def raw_val_batches(betons, cpu_pipeline_ok) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(uint8 NHWC images, labels, batch sizes) of the raw .beton through the val loader."""
    return _val_epoch(
        make_val_loader(betons["raw"], batch_size=50, num_workers=2, resolution=VAL_RES, device=CPU)
    )


@pytest.fixture(scope="module")
def default_val_batches(betons, cpu_pipeline_ok) -> tuple[np.ndarray, np.ndarray, list[int]]:
    return _val_epoch(
        make_val_loader(betons["default"], batch_size=64, num_workers=2, resolution=VAL_RES, device=CPU)
    )


def _unnormalise(images: torch.Tensor) -> np.ndarray:
    """Float NCHW (normalised) -> uint8 NHWC."""
    x = images.permute(0, 2, 3, 1).double().numpy() * IMAGENET_STD + IMAGENET_MEAN
    assert x.min() > -0.5 and x.max() < 255.5, "normalisation is not the ImageNet mean/std"
    return np.rint(x).astype(np.uint8)


def _val_epoch(loader) -> tuple[np.ndarray, np.ndarray, list[int]]:
    images, labels, sizes = [], [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        images.append(_unnormalise(x))  # copies: ffcv reuses the batch buffers
        labels.append(y.clone().numpy())
        sizes.append(len(y))
    return np.concatenate(images), np.concatenate(labels), sizes


# --------------------------------------------------------------------------------------------
# writer: the files it writes


def test_writer_summary_and_json(tree, betons):
    meta = read_meta(betons["default"])
    n = len(tree["samples"])
    assert meta["classes"] == tree["classes"]
    assert meta["class_to_idx"] == {name: i for i, name in enumerate(tree["classes"])}
    assert (meta["num_classes"], meta["num_images"]) == (4, n)
    assert meta["writer"]["write_mode"] == "proportion" and meta["writer"]["max_resolution"] == 500
    assert meta["writer"]["compress_probability"] == 0.5 and meta["writer"]["jpeg_quality"] == 90
    [skipped] = meta["skipped"]
    assert skipped["path"] == str(tree["bad"][0].relative_to(tree["root"]))
    assert "truncated" in skipped["error"]
    summary = betons["summary"]
    assert (
        f"{n} images, 4 classes" in summary and "MiB" in summary and "1 unreadable file(s) skipped" in summary
    )


def _stored(beton: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image metadata: mode/width/height per sample, labels) straight from the .beton, no loader."""
    reader = Reader(str(beton))
    names = list(reader.handlers)  # fields are stored as f0, f1, ... in declaration order
    meta = reader.metadata
    return meta[f"f{names.index('image')}"], meta[f"f{names.index('label')}"]


def test_every_label_and_size_exact_in_the_file(tree, betons, labels):
    """One entry per readable image, in ImageFolder order, labels and stored sizes exact."""
    sizes = [_image_size(p) for p, _ in tree["samples"]]
    for key, max_res in (("default", 500), ("raw", RAW_MAX_RES)):
        image, stored_labels = _stored(betons[key])
        np.testing.assert_array_equal(stored_labels, labels)
        expected = np.array([_stored_size(w, h, max_res) for w, h in sizes])
        np.testing.assert_array_equal(image["width"], expected[:, 0])
        np.testing.assert_array_equal(image["height"], expected[:, 1])
    modes = _stored(betons["default"])[0]["mode"]
    assert 0.3 < (modes == 0).mean() < 0.7  # 'proportion' mode: about half stored as JPEG (mode 0)
    assert (_stored(betons["raw"])[0]["mode"] == 1).all()  # raw everywhere


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _stored_size(w: int, h: int, max_res: int) -> tuple[int, int]:
    """ffcv's RGBImageField: the longest side is scaled down to max_resolution, sizes truncated."""
    s = max_res / max(w, h)
    return (int(s * w), int(s * h)) if s < 1 else (w, h)


def _reference(path: Path, max_res: int, res: int, ratio: float = 224 / 256) -> np.ndarray:
    """Independent decode (PIL) -> the writer's resize -> centre crop -> resize, as uint8 HWC."""
    img = load_rgb(path)
    h, w = img.shape[:2]
    sw, sh = _stored_size(w, h, max_res)
    if (sw, sh) != (w, h):
        img = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA)
    c = int(ratio * min(sh, sw))
    top, left = (sh - c) // 2, (sw - c) // 2
    return cv2.resize(img[top : top + c, left : left + c], (res, res), interpolation=cv2.INTER_AREA)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_raw_round_trip_is_lossless(tree, raw_val_batches, labels):
    """Raw mode, no JPEG: the loader's pixels match an independent PIL decode.

    Bound 40 dB: raw storage is lossless and the reference repeats ffcv's geometry (longest side
    scaled with INTER_AREA, centre crop of 224/256 of the short side, INTER_AREA resize), so the
    only legitimate difference is rounding of the normalised floats back to uint8 (at most 1 grey
    level, i.e. >= 48 dB even if every pixel were off by one). A wrong crop offset, a BGR/RGB swap
    or a neighbour's image gives well under 30 dB on these class-coloured images.
    """
    images, got_labels, sizes = raw_val_batches
    np.testing.assert_array_equal(got_labels, labels)  # every label, in order, none dropped
    assert sizes == [50] * (len(labels) // 50) + [len(labels) % 50]
    psnrs = [
        _psnr(images[i], _reference(p, RAW_MAX_RES, VAL_RES)) for i, (p, _) in enumerate(tree["samples"])
    ]
    assert min(psnrs) > 40, f"worst PSNR {min(psnrs):.1f} dB at {tree['samples'][int(np.argmin(psnrs))][0]}"


def test_oddities_are_stored_as_rgb(tree, raw_val_batches):
    images = raw_val_batches[0]
    index = {p: i for i, (p, _) in enumerate(tree["samples"])}
    gray = images[index[tree["oddities"]["grayscale"]]].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    for name in ("cmyk", "png_as_jpeg"):  # colourful and matching PIL's RGB conversion
        i = index[tree["oddities"][name]]
        assert images[i].std(axis=-1).mean() > 10
        assert _psnr(images[i], _reference(tree["oddities"][name], RAW_MAX_RES, VAL_RES)) > 40


def test_default_settings_round_trip(tree, betons, default_val_batches, labels):
    """Default writer (half the images re-encoded as JPEG at quality 90).

    Bound 30 dB for the JPEG-stored half: quality 90 keeps these smooth, mildly noisy images at
    34-40 dB after the downscale (measured: min 34.3, median 37.2), which averages out much of
    the coding noise; swapped channels or another image fall below 20 dB. Raw-stored: 40 dB, as
    in test_raw_round_trip_is_lossless (measured: identical).
    """
    images, got_labels, _ = default_val_batches
    np.testing.assert_array_equal(got_labels, labels)
    modes = _stored(betons["default"])[0]["mode"]
    for i, (p, _) in enumerate(tree["samples"]):
        bound = 30 if modes[i] == 0 else 40
        assert _psnr(images[i], _reference(p, 500, VAL_RES)) > bound, p


# --------------------------------------------------------------------------------------------
# writer: errors, all before any work and leaving nothing behind


def _run_main(args: list[str], capsys) -> tuple[int, str]:
    rc = wb.main(args)
    return rc, capsys.readouterr().err


def test_truncated_file_stops_the_run_and_names_it(tree, tmp_path, capsys):
    out = tmp_path / "train.beton"
    rc, err = _run_main(["--data-dir", str(tree["root"]), "--out", str(out), "--num-workers", "2"], capsys)
    assert rc == 2
    assert str(tree["bad"][0]) in err and "--skip-bad" in err
    assert list(tmp_path.iterdir()) == []  # no .beton, no JSON, no partial file


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_dir", "does not exist"),
        ("file_as_dir", "is not a folder"),
        ("no_classes", "no class folders"),
        ("empty_class", "hold no images"),
        ("bad_suffix", "must end in .beton"),
        ("missing_out_dir", "does not exist; create"),
        ("exists", "already exists; pass --overwrite"),
        ("unwritable", "cannot write to"),
        ("bad_quality", "jpeg_quality must be in [1, 100]"),
        ("bad_probability", "compress_probability must be in [0, 1]"),
    ],
)
def test_writer_errors(case, expected, tree, tmp_path, capsys):
    data, out, extra = tree["root"], tmp_path / "out" / "train.beton", []
    (tmp_path / "out").mkdir()
    if case == "missing_dir":
        data = tmp_path / "nope"
    elif case == "file_as_dir":
        data = tmp_path / "file.txt"
        data.write_text("x")
    elif case == "no_classes":
        data = tmp_path / "flat"
        data.mkdir()
        (data / "img.JPEG").write_bytes(tree["samples"][0][0].read_bytes())
    elif case == "empty_class":
        data = tmp_path / "withempty"
        make_imagefolder(data, classes=3, per_class=2, oddities=False)
        for f in (data / "n00000002").iterdir():
            f.unlink()
        (data / "n00000002" / "notes.txt").write_text("not an image")
    elif case == "bad_suffix":
        out = tmp_path / "out" / "train.ffcv"
    elif case == "missing_out_dir":
        out = tmp_path / "missing" / "train.beton"
    elif case == "exists":
        out.write_bytes(b"precious")
    elif case == "unwritable":
        ro = tmp_path / "out"
        ro.chmod(0o500)
        # root ignores permissions: /proc refuses new files for everyone
        out = ro / "train.beton" if not os.access(ro, os.W_OK) else Path("/proc/lkm_test_train.beton")
    elif case == "bad_quality":
        extra = ["--jpeg-quality", "0"]
    elif case == "bad_probability":
        extra = ["--compress-probability", "1.5"]
    before = sorted((tmp_path / "out").iterdir())
    rc, err = _run_main(["--data-dir", str(data), "--out", str(out), "--num-workers", "2", *extra], capsys)
    (tmp_path / "out").chmod(0o700)
    assert rc == 2 and expected in err, err
    assert sorted((tmp_path / "out").iterdir()) == before  # nothing written, nothing removed
    if case == "exists":
        assert out.read_bytes() == b"precious"
    if case == "empty_class":
        assert "n00000002" in err


class _Listing:
    """What os.scandir returns (an iterator and a context manager), over given entries."""

    def __init__(self, entries):
        self._it = iter(entries)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


def test_scan_orders_classes_and_files_by_name_whatever_the_directory_order(tmp_path, monkeypatch):
    root = tmp_path / "train"
    for cls in ("zebra", "apple", "mango"):  # created out of order
        for name in ("img_2.JPEG", "img_10.JPEG", "img_1.png", "notes.txt"):
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / name).write_bytes(b"")
    (root / "apple" / "sub").mkdir()
    (root / "apple" / "sub" / "img_0.jpg").write_bytes(b"")
    (root / "README").write_text("not a class")
    real_scandir = os.scandir

    def reverse_scandir(path="."):  # a file system that lists in reverse name order (os.walk uses it too)
        with real_scandir(path) as it:
            return _Listing(sorted(it, key=lambda e: e.name, reverse=True))

    monkeypatch.setattr(os, "scandir", reverse_scandir)
    scan = wb.scan_imagefolder(root)
    assert scan.classes == ["apple", "mango", "zebra"]
    assert scan.class_to_idx == {"apple": 0, "mango": 1, "zebra": 2}
    files = ["img_1.png", "img_10.JPEG", "img_2.JPEG"]  # string order, as torchvision's ImageFolder
    expected = [(root / "apple" / f, 0) for f in files] + [(root / "apple" / "sub" / "img_0.jpg", 0)]
    expected += [(root / c / f, i) for i, c in ((1, "mango"), (2, "zebra")) for f in files]
    assert scan.samples == expected


def test_writer_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        wb.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--data-dir",
        "--out",
        "--write-mode",
        "--max-resolution",
        "--compress-probability",
        "--jpeg-quality",
        "--num-workers",
        "--skip-bad",
        "--overwrite",
    ):
        assert option in text


def test_failed_worker_stops_the_run_without_a_finished_looking_file(betons):
    """A worker dying mid-write must not hang ffcv's writer, nor leave a .beton or JSON behind."""
    assert betons["failed_rc"] == 2
    assert "injected read failure" in betons["stderr"] and "a writer worker failed" in betons["stderr"]
    assert list(betons["failed_dir"].iterdir()) == []


def test_page_size_holds_the_largest_image():
    assert wb.page_size_for(100) == 1 << 23
    assert wb.page_size_for(4000 * 3000 * 3) >= 2 * 4000 * 3000 * 3


# --------------------------------------------------------------------------------------------
# loaders: pipelines (inspected, not run)


def _types(ops) -> list[type]:
    return [type(op) for op in ops]


def test_cpu_pipeline_normalises_before_to_tensor():
    """ffcv-imagenet's order hangs on CPU (compiled -> plain -> compiled stages); ours must not use it."""
    ops = image_pipeline(SeededRandomResizedCropRGBImageDecoder((32, 32), seed=0), CPU,
                         flip=SeededRandomHorizontalFlip(seed=0))
    assert _types(ops) == [
        SeededRandomResizedCropRGBImageDecoder,
        SeededRandomHorizontalFlip,
        NormalizeImage,
        ToTensor,
        ToTorchImage,
    ]
    assert ops[2].original_dtype == np.float32
    assert ToDevice not in _types(label_pipeline(CPU))


def test_gpu_pipeline_is_ffcv_imagenets_order():
    cuda = torch.device("cuda", 0)
    ops = image_pipeline(SeededRandomResizedCropRGBImageDecoder((32, 32), seed=0), cuda,
                         flip=SeededRandomHorizontalFlip(seed=0))
    assert _types(ops)[:5] == [
        SeededRandomResizedCropRGBImageDecoder,
        SeededRandomHorizontalFlip,
        ToTensor,
        ToDevice,
        ToTorchImage,
    ]
    assert type(ops[5]) in (NormalizeImage, TorchNormalize)  # ffcv's needs cupy; same place, same output
    assert ops[3].device == cuda and ops[3].non_blocking
    assert ops[4].channels_last
    labels = label_pipeline(cuda)
    assert isinstance(labels[-1], ToDevice) and labels[-1].device == cuda and labels[-1].non_blocking


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_torch_normalize_matches_ffcv_lookup_table(dtype, atol):
    from dataclasses import replace

    from ffcv.pipeline.state import State

    op = TorchNormalize(IMAGENET_MEAN, IMAGENET_STD, dtype)
    state = State(jit_mode=False, device=CPU, dtype=torch.uint8, shape=(3, 5, 7))
    new_state, query = op.declare_state_and_memory(state)
    assert new_state == replace(state, dtype=dtype)
    images = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8).permute(
        0, 3, 1, 2
    )  # as ToTorchImage gives
    buffer = torch.empty((4, *query.shape), dtype=dtype)  # ffcv's slot buffer, larger than the batch
    out = op.generate_code()(images, buffer)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    table = NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32).lookup_table  # (256, 3)
    expected = torch.from_numpy(table[images.permute(0, 2, 3, 1).numpy(), np.arange(3)]).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=atol)


# --------------------------------------------------------------------------------------------
# loaders: the CPU pipeline in a child, and the distributed shards


def test_cpu_pipelines_build_without_hanging(ranks):
    assert not ranks["timed_out"], "building the CPU loaders hung:\n" + "\n".join(ranks["logs"])
    assert ranks["rcs"] == [0, 0], "\n".join(ranks["logs"])


def test_distributed_shards_are_disjoint_and_cover_the_set(ranks, labels):
    n = len(labels)
    per_rank = -(-n // 2)  # DistributedSampler pads to a multiple of the world size by repeating samples
    results = ranks["results"]
    # validation: every image on exactly one rank (no padding: a score must count each image once)
    val = [np.array(results[r]["val"]) for r in range(2)]
    assert sorted(np.concatenate(val).tolist()) == list(range(n))
    for r in range(2):
        np.testing.assert_array_equal(val[r], np.arange(r, n, 2))
    for key, epoch, shuffle in (("train", 0, True), ("train", 1, True)):
        shards = [np.array(results[r][key][epoch]) for r in range(2)]
        assert [len(s) for s in shards] == [per_rank, per_rank]
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        assert len(set(shards[0]) & set(shards[1])) == 2 * per_rank - n  # only the padding repeats
        for r in range(2):  # the documented order: DistributedSampler(seed, shuffle).set_epoch(epoch)
            sampler = DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=shuffle, seed=3)
            sampler.set_epoch(epoch)
            np.testing.assert_array_equal(shards[r], list(sampler))
    assert results[0]["train"][0] != results[0]["train"][1]  # reshuffled every epoch


# --------------------------------------------------------------------------------------------
# loaders: in-process


def test_train_batches(train_loader, labels):
    n = len(labels)
    assert len(train_loader) == n // TRAIN_BATCH  # drop_last
    seen = 0
    red = []  # class 0 is red in the fixture: checks RGB order through the JPEG/raw decoders
    for images, y in train_loader:
        assert images.shape == (TRAIN_BATCH, 3, 32, 32) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last) and images.device == CPU
        assert y.dtype == torch.int64 and y.shape == (TRAIN_BATCH,)
        pixels = _unnormalise(images).reshape(len(y), -1, 3).mean(axis=1)
        red.extend(pixels[y.numpy() == 0])
        seen += len(y)
    assert seen == (n // TRAIN_BATCH) * TRAIN_BATCH
    red = np.array(red)  # all but the grayscale oddity (also class 0) are clearly red
    assert ((red[:, 0] > red[:, 1] + 40) & (red[:, 0] > red[:, 2] + 40)).mean() > 0.95


def _epoch_labels(loader) -> np.ndarray:
    return np.concatenate([y.clone().numpy() for _, y in loader])


def test_train_order_follows_seed_and_epoch(train_loader, labels):
    """Epoch e's order is default_rng(seed + e).permutation(N); set_epoch() resumes it."""
    n, kept = len(labels), len(train_loader) * TRAIN_BATCH
    for epoch in (4, 5, 4):
        set_epoch(train_loader, epoch)
        expected = np.random.default_rng(TRAIN_SEED + epoch).permutation(n)[:kept]
        np.testing.assert_array_equal(_epoch_labels(train_loader), labels[expected])
        assert train_loader.next_epoch == epoch + 1
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        set_epoch(train_loader, -1)


def test_progressive_resizing_without_a_new_loader(train_loader):
    assert train_resolution(train_loader) == 32
    try:
        for res in (48, 24):
            set_train_resolution(train_loader, res)
            assert train_resolution(train_loader) == res
            shapes = {tuple(x.shape[1:]) for x, _ in train_loader}
            assert shapes == {(3, res, res)}
    finally:
        set_train_resolution(train_loader, 32)
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        set_train_resolution(train_loader, 0)


def test_set_train_resolution_rejects_a_val_loader(betons, cpu_pipeline_ok):
    val = make_val_loader(betons["raw"], batch_size=8, num_workers=1, resolution=16, device=CPU)
    with pytest.raises(TypeError, match="make_train_loader"):
        set_train_resolution(val, 32)


def test_quasi_random_order(betons, labels, cpu_pipeline_ok):
    """A permutation, the same from a fresh loader with the same seed (ffcv reshuffles its page
    table in place every epoch, so only a fresh loader's first epoch is comparable)."""
    orders = [
        make_train_loader(
            betons["default"],
            batch_size=16,
            num_workers=1,
            resolution=16,
            device=CPU,
            order="quasi_random",
            os_cache=False,
            seed=1,
        ).traversal_order.sample_order(0)
        for _ in range(2)
    ]
    assert sorted(orders[0].tolist()) == list(range(len(labels)))
    np.testing.assert_array_equal(orders[0], orders[1])


# --------------------------------------------------------------------------------------------
# loaders: errors


def test_read_meta_errors(betons, tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m backbone.write_beton"):
        read_meta(tmp_path / "missing.beton")
    lonely = tmp_path / "lonely.beton"
    lonely.write_bytes(betons["default"].read_bytes()[:1024])
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        read_meta(lonely)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"order": "quasi_random", "distributed": True},
            ValueError,
            "not supported by ffcv with distributed",
        ),
        ({"distributed": True}, RuntimeError, "init_process_group"),
        ({"order": "shuffled"}, ValueError, "order must be one of"),
        ({"resolution": 0}, ValueError, "resolution must be a positive integer"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"device": torch.device("meta")}, ValueError, "device must be cpu or cuda"),
    ],
)
def test_train_loader_argument_errors(betons, kwargs, error, match):
    args = {"batch_size": 8, "num_workers": 1, "resolution": 16, "device": CPU, **kwargs}
    with pytest.raises(error, match=match):
        make_train_loader(betons["default"], **args)
