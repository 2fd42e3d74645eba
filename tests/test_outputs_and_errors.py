"""Hostile inputs and a full disk: 16-bit PNGs and named pipes in an image folder, data set errors inside loader
workers, outputs on a disk that is full (a real one: a small tmpfs, which needs root), loader threads.

Every command here must end with one ``error:`` line naming the file and the problem (no traceback), and leave
no empty or half-written file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hangs import PYTHON, run_watched
from PIL import Image
from seg_fixtures import make_voc

from backbone.write_beton import read_meta
from segmentation.writers import write_palette_png

TINY_SEG = Path(__file__).resolve().parents[1] / "configs/segmentation/tiny_cpu.yaml"


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _one_clean_error(rc: int, err: str) -> str:
    """The single ``error:`` line of a command that failed as it should (exit 2, no traceback)."""
    errors = _error_lines(err)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --- the .beton writer: what it reads ------------------------------------------------------------------------
def _write(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # a writer that blocks (a named pipe opened for reading waits for a writer for ever) shows as no progress
    return run_watched([PYTHON, "-m", "backbone.write_beton", "--data-dir", str(data), "--out", str(out),
                        "--num-workers", "1", "--write-mode", "raw", "--max-resolution", "0", *extra], idle_s=60)


def _stored_images(beton: Path) -> list[np.ndarray]:
    """The raw pixels the .beton holds, sample by sample (read from the file: no loader, no resizing)."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    image = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    data = np.memmap(beton, dtype=np.uint8, mode="r")
    assert (image["mode"] == 1).all()  # raw
    return [np.array(data[int(p):int(p) + int(h) * int(w) * 3]).reshape(int(h), int(w), 3)
            for p, h, w in zip(image["data_ptr"], image["height"], image["width"], strict=True)]


def test_16_bit_grey_pngs_are_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    wide = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 65535 // (40 * 50 - 1)).astype(np.uint16)
    for name in ("n01", "n02"):
        (tmp_path / "data" / name).mkdir(parents=True)
    Image.fromarray(wide).save(tmp_path / "data/n01/deep.png")  # PIL mode I;16
    assert Image.open(tmp_path / "data/n01/deep.png").mode == "I;16"
    rgb = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "data/n02/plain.png")
    done = _write(tmp_path / "data", tmp_path / "out.beton")
    assert done.returncode == 0, done.stderr
    deep, plain = _stored_images(tmp_path / "out.beton")
    expected = np.rint(wide / 257).astype(np.uint8)  # 0 -> 0, 65535 -> 255, linear in between
    np.testing.assert_array_equal(deep, np.repeat(expected[..., None], 3, axis=2))
    np.testing.assert_array_equal(plain, rgb)  # 8-bit images unchanged


@pytest.mark.slow
def test_a_named_pipe_among_the_images_is_refused_or_skipped_without_hanging(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out" / "train.beton"
    for name in ("n01", "n02"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (20, 16), (200, 30, 30)).save(data / name / "a.jpg")
    os.mkfifo(data / "n02" / "b.jpg")
    out.parent.mkdir()
    refused = _write(data, out)
    line = _one_clean_error(refused.returncode, refused.stderr)
    assert f"{data / 'n02' / 'b.jpg'}: it is a named pipe (FIFO), not a regular file" in line, line
    assert list(out.parent.iterdir()) == []  # no .partial left
    skipped = _write(data, out, "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    meta = read_meta(out)
    assert meta["num_images"] == 2 and [s["path"] for s in meta["skipped"]] == ["n02/b.jpg"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.beton", "train.json"]


# --- a disk that is full -------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path: Path):
    """A 1 MiB tmpfs filled to the last byte (a real ENOSPC). Needs root to mount (skips otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        assert shutil.disk_usage(disk).free == 0
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _left_on(disk: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(disk)), p.stat().st_size) for p in disk.rglob("*") if p.is_file()
                  and p.name != "filler")


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A VOCdevkit and a fine-tune of two steps on it (its final.pth)."""
    base = tmp_path_factory.mktemp("seg")
    devkit = make_voc(base)
    run_watched([PYTHON, "-m", "segmentation.finetune", "--config", str(TINY_SEG), f"data.root={devkit}",
                 f"run.dir={base / 'run'}", "train.iterations=2", "eval.every=0"], check=True)
    return {"devkit": devkit, "final": base / "run" / "final.pth"}


def test_segmentation_evaluate_on_a_full_disk_says_so_in_one_line_and_leaves_no_file(
        seg_run: dict[str, Path], full_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from segmentation import evaluate

    args = ["--checkpoint", str(seg_run["final"]), "--workers", "0"]
    line = _one_clean_error(evaluate.main([*args, "--out", str(full_disk / "scores.json")]), capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {full_disk / 'scores.per_image.npz'}: the disk is full"), line
    assert _left_on(full_disk) == []  # neither the counts nor the JSON, and no temporary
    pngs = full_disk / "png"
    line = _one_clean_error(evaluate.main([*args, "--out", str(tmp_path / "scores.json"), "--save-png", str(pngs)]),
                            capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {pngs}/2008_00000") and "the disk is full" in line, line
    assert _left_on(full_disk) == [] and not (tmp_path / "scores.json").exists()
    # with room, the same command writes both files, whole
    assert evaluate.main([*args, "--out", str(tmp_path / "scores.json"), "--save-png", str(tmp_path / "png")]) == 0
    record = json.loads((tmp_path / "scores.json").read_text())
    counts = np.load(tmp_path / "scores.per_image.npz")
    assert record["images"] == 3 and len(counts["names"]) == 3 and len(list((tmp_path / "png").iterdir())) == 3


@pytest.mark.slow
def test_backbone_evaluate_on_a_full_disk_says_so_in_one_line_and_leaves_no_file(
        textured_betons: dict[str, Path], full_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from backbone import evaluate

    weights = _tiny_final(tmp_path / "final.pth")
    out = full_disk / "eval.json"
    code = evaluate.main(["--weights", str(weights), "--data", str(textured_betons["val"]), "--workers", "1",
                          "--resolution", "32", "--out", str(out), "--device", "cpu"])
    line = _one_clean_error(code, capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {out}: the disk is full"), line
    assert _left_on(full_disk) == []


def _tiny_final(path: Path) -> Path:
    """A final.pth of an untrained resnet18 for the textured fixture's 4 classes (what backbone.evaluate reads)."""
    import timm

    from backbone.artifacts import FinalWeights

    model = timm.create_model("resnet18", num_classes=4)
    FinalWeights(state_dict=model.state_dict(), model_name="resnet18", num_classes=4,
                 pretrained_cfg=dict(model.pretrained_cfg)).save(path)
    return path


# --- data set errors raised in loader workers ----------------------------------------------------------------
@pytest.mark.parametrize("problem", ["label outside the classes", "label of another size"])
def test_a_bad_label_read_in_a_loader_worker_is_one_line_naming_the_file(
        problem: str, seg_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from segmentation import evaluate

    devkit = shutil.copytree(seg_run["devkit"], tmp_path / "VOCdevkit")
    label = devkit / "VOC2012/SegmentationClass/2008_000007.png"  # a validation image's
    mask = np.asarray(Image.open(label)).copy()
    if problem == "label outside the classes":
        mask[3, 3] = 40
        expected = f"error: label {label} holds values [40] outside the 21 classes (0..20, 255 = void)"
    else:
        mask = mask[:-4]
        image = devkit / "VOC2012/JPEGImages/2008_000007.jpg"
        expected = f"error: image {image} is 52x40 but its label {label} is 52x36"
    write_palette_png(label, mask)
    code = evaluate.main(["--checkpoint", str(seg_run["final"]), "--root", str(devkit), "--workers", "1",
                          "--out", str(tmp_path / "scores.json")])
    line = _one_clean_error(code, capsys.readouterr().err)
    assert line.startswith(expected) and line.endswith("(raised in a data loader worker)"), line


# --- loader threads ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_backbone_evaluate_picks_its_threads_from_the_cpus_and_names_workers_when_too_many(
        textured_betons: dict[str, Path], tmp_path: Path) -> None:
    """On a machine where numba runs 2 threads (as a 2-core one): the default fits, --workers 3 is named."""
    weights = _tiny_final(tmp_path / "final.pth")
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    base = [PYTHON, "-m", "backbone.evaluate", "--weights", str(weights), "--data", str(textured_betons["val"]),
            "--resolution", "32", "--device", "cpu"]
    ok = run_watched([*base, "--out", str(tmp_path / "eval.json")], env=env)
    assert ok.returncode == 0 and json.loads((tmp_path / "eval.json").read_text())["images"] == 32, ok.stderr
    too_many = run_watched([*base, "--workers", "3", "--out", str(tmp_path / "other.json")], env=env)
    line = _one_clean_error(too_many.returncode, too_many.stderr)
    assert line.startswith("error: --workers 3: ffcv decodes with 1 to 2 threads") and \
        "pass --workers 2 or fewer" in line, line
    assert not (tmp_path / "other.json").exists()
