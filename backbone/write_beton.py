"""Write an ImageNet-style folder (``ROOT/<class>/<image>``) to an ffcv ``.beton``.

    python -m backbone.write_beton --data-dir /data/imagenet/train --out /data/ffcv/train.beton

One ``.beton`` per split, with fields ``image`` (``RGBImageField``) and ``label`` (``IntField``),
and a JSON file beside it (``PATH.beton`` -> ``PATH.json``) holding the class names, their
indices (sorted folder order, as torchvision's ``ImageFolder``), the writer settings and the
skipped files. Defaults are the ones ffcv-imagenet writes ImageNet with.

Order of work: scan and validate the folder and the output path (errors before any work), probe
every image with a cheap reduced-size decode (catches truncated/unreadable files and gives the
sizes, from which the page size is chosen), then write with ffcv's ``DatasetWriter`` to a
temporary name that is renamed only once the file is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import json
import multiprocessing
import os
import shutil
import signal
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

BETON_SUFFIX = ".beton"
MIN_PAGE_SIZE = 1 << 23  # ffcv's default DatasetWriter page size (8 MiB)
MAX_SIDE = 65535  # RGBImageField stores width and height as uint16
# The loaders' centre crop keeps int(0.875 x short side) pixels (timm's DEFAULT_CROP_PCT): a short side
# under 2 px crops to nothing, and OpenCV aborts the whole training process on it.
MIN_SIDE = 2
JPEG_BYTES_PER_PIXEL = 0.05  # a lower bound for quality-90 JPEGs of photos (about 1/60 of raw): a floor, not a guess


class WriterError(RuntimeError):
    """Bad input or output for the writer; the message names the problem and the fix."""


@dataclass
class WriterSettings:
    write_mode: str = "proportion"
    max_resolution: int | None = 500
    compress_probability: float = 0.5
    jpeg_quality: int = 90
    smart_threshold: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.write_mode not in ("raw", "jpg", "smart", "proportion"):
            raise WriterError(f"write_mode must be raw, jpg, smart or proportion, not {self.write_mode!r}")
        if self.max_resolution is not None and self.max_resolution < 1:
            raise WriterError(
                f"max_resolution must be positive (or None to keep sizes), not {self.max_resolution}"
            )
        if not 0.0 <= self.compress_probability <= 1.0:
            raise WriterError(f"compress_probability must be in [0, 1], not {self.compress_probability}")
        if not 1 <= self.jpeg_quality <= 100:
            raise WriterError(f"jpeg_quality must be in [1, 100], not {self.jpeg_quality}")


@dataclass
class FolderScan:
    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    skipped: list[dict] = field(default_factory=list)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}


def meta_path(beton: str | Path) -> Path:
    """The JSON written beside a ``.beton``: ``PATH.beton`` -> ``PATH.json``."""
    return Path(beton).with_suffix(".json")


def read_meta(beton: str | Path) -> dict:
    """The JSON written beside ``beton`` by ``backbone.write_beton`` (class map, counts, settings)."""
    beton = Path(beton)
    if not beton.is_file():
        raise FileNotFoundError(
            f"{beton} not found; write it with: "
            f"python -m backbone.write_beton --data-dir SPLIT_DIR --out {beton}"
        )
    meta = meta_path(beton)
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} (the class map written beside {beton.name}) is missing; it is written by "
            f"python -m backbone.write_beton, rewrite the .beton with it (--overwrite)"
        )
    with meta.open() as f:
        return json.load(f)


def check_beton(beton: str | Path, meta: dict) -> None:
    """Open ``beton`` with ffcv's reader and check it against its JSON: the fields this project writes and as
    many samples as the JSON says. Raises ValueError: a random, truncated or foreign file fails here, before a
    run creates anything, rather than in a loader thread."""
    import torch

    threads = torch.get_num_threads()
    try:
        from ffcv.reader import Reader  # importing ffcv sets torch's thread count to 1: put it back

        reader = Reader(str(beton))
    except Exception as e:  # noqa: BLE001 - ffcv raises what numpy raises on a bad header
        raise ValueError(f"not a readable .beton ({type(e).__name__}: {e})") from None
    finally:
        torch.set_num_threads(threads)
    fields = set(reader.field_names)
    if fields != {"image", "label"}:
        raise ValueError(f"it holds the fields {sorted(fields)}, not image and label")
    if reader.num_samples != meta.get("num_images"):
        raise ValueError(f"it holds {reader.num_samples} images, its JSON says {meta.get('num_images')}: the two do "
                         "not belong together")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def scan_imagefolder(root: str | Path) -> FolderScan:
    """Classes and ``(path, label)`` samples, in torchvision ``ImageFolder`` order.

    Same rules as ``ImageFolder``: class folders sorted by name, images found recursively
    (following links) with its extension list, case-insensitively, sorted within a class.
    """
    root = Path(root)
    if not root.exists():
        raise WriterError(
            f"--data-dir {root} does not exist; pass the folder that holds one folder per class"
        )
    if not root.is_dir():
        raise WriterError(
            f"--data-dir {root} is not a folder; pass the folder that holds one folder per class"
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise WriterError(
            f"no class folders in {root}: expected ROOT/<class>/<image> (ImageNet layout), e.g. "
            f"{root}/n01440764/n01440764_10026.JPEG; did you pass the parent of train/ and val/?"
        )
    samples: list[tuple[Path, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            found.extend(Path(dirpath) / f for f in sorted(fnames) if _is_image(Path(f)))
        if not found:
            empty.append(name)
        samples.extend((p, label) for p in found)
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise WriterError(
            f"{len(empty)} class folder(s) in {root} hold no images ({shown}); every class needs images "
            f"with one of the extensions {', '.join(IMG_EXTENSIONS)}. Remove the empty folders or fill them."
        )
    return FolderScan(root=root, classes=classes, samples=samples)


def check_output(out: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """Validate the output path before any work; return the temporary (beton, json) names."""
    out = Path(out)
    if out.suffix != BETON_SUFFIX:
        raise WriterError(
            f"--out {out} must end in {BETON_SUFFIX} (the class map is written beside it as .json)"
        )
    if out.is_dir():
        raise WriterError(f"--out {out} is a folder; pass a file name such as {out / 'train.beton'}")
    if not out.parent.is_dir():
        raise WriterError(f"the folder of --out {out} does not exist; create {out.parent} first")
    for existing in (out, meta_path(out)):
        if existing.exists() and not overwrite:
            raise WriterError(
                f"{existing} already exists; pass --overwrite to replace it, or choose another --out"
            )
    _clean_partials(out)
    tmp_beton = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp_json = meta_path(out).with_name(f".{meta_path(out).name}.partial-{os.getpid()}")
    try:
        tmp_beton.touch()
    except OSError as e:
        raise WriterError(f"cannot write to {out.parent} ({e.strerror}); choose a writable --out") from e
    return tmp_beton, tmp_json


def _clean_partials(out: Path) -> None:
    """Remove the partial files a killed writer left for ``out``; refuse while a live writer owns some."""
    for name in (out.name, meta_path(out).name):
        for partial in out.parent.glob(f".{name}.partial-*"):
            pid = partial.name.rsplit("-", 1)[-1]
            alive = pid.isdigit() and _pid_alive(int(pid))
            if alive and int(pid) != os.getpid():
                raise WriterError(f"{partial} belongs to a writer that is still running (pid {pid}): wait for it, or "
                                  "stop it, before writing the same --out")
            partial.unlink(missing_ok=True)
            print(f"removed {partial}, left by an interrupted writer", file=sys.stderr)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _not_a_regular_file(path: Path) -> str:
    """What ``path`` is when it is no regular file (links followed): "a named pipe (FIFO)", ...; "" otherwise."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""  # gone or a broken link: the probe's open says so
    kinds = ((stat.S_ISREG, ""), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
    return next((kind for test, kind in kinds if test(mode)), "no regular file")


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) of a readable image; raises if it cannot be decoded in full.

    JPEGs are decoded with DCT scaling (``draft``, 1/8 size): every byte is still entropy-decoded,
    so truncation and corruption are caught, at a fraction of the cost of a full decode.
    """
    with Image.open(path) as im:
        w, h = im.size
        im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
        im.load()
    return w, h


def _probe_all(scan: FolderScan, settings: WriterSettings, num_workers: int, skip_bad: bool) -> tuple[int, int]:
    """Drop unreadable or unusable files from ``scan`` (or raise); return the largest sample's raw size
    and the raw size of all samples, in bytes, after resizing."""

    def probe(path: Path) -> tuple[int, int] | str:
        kind = _not_a_regular_file(path)
        if kind:  # opening a named pipe would block for ever; a device could be endless
            return f"it is {kind}, not a regular file"
        try:
            return probe_image(path)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            return f"{type(e).__name__}: {e}"

    # PIL releases the GIL while decoding, so threads give parallelism without forking. Submitted
    # in slices: one future per image of ImageNet at once would hold ~1 GB.
    paths = [p for p, _ in scan.samples]
    results: list[tuple[int, int] | str] = []
    with (
        ThreadPoolExecutor(max_workers=num_workers) as pool,
        tqdm(total=len(paths), desc="checking images") as bar,
    ):
        for start in range(0, len(paths), 4096):
            results.extend(pool.map(probe, paths[start : start + 4096]))
            bar.update(len(paths[start : start + 4096]))
    kept, max_bytes, total_bytes = [], 0, 0
    for (path, label), res in zip(scan.samples, results, strict=True):
        if isinstance(res, tuple):
            w0, h0 = w, h = res
            if settings.max_resolution is not None and max(w, h) > settings.max_resolution:
                s = settings.max_resolution / max(w, h)
                w, h = int(w * s), int(h * s)  # as ffcv's RGBImageField resizes
            if max(w, h) > MAX_SIDE:
                res = f"{w}x{h} is larger than ffcv's limit of {MAX_SIDE} px per side; use --max-resolution"
            elif min(w, h) < MIN_SIDE:
                stored = f" (stored as {w}x{h} at --max-resolution {settings.max_resolution})" if (w, h) != (w0, h0) \
                    else ""
                res = (f"a {w0}x{h0} image{stored} is too small for the loaders' crops (a side under {MIN_SIDE} px "
                       "crops to nothing)")
            else:
                max_bytes = max(max_bytes, w * h * 3)
                total_bytes += w * h * 3
                kept.append((path, label))
                continue
        if not skip_bad:
            raise WriterError(
                f"cannot use image {path}: {res}; delete or replace it, or pass --skip-bad to leave it out"
            )
        scan.skipped.append({"path": str(path.relative_to(scan.root)), "label": label, "error": res})
    scan.samples = kept
    if not kept:
        raise WriterError(f"no readable images in {scan.root}")
    empty = sorted(set(scan.classes) - {scan.classes[label] for _, label in kept})
    if empty:
        raise WriterError(f"after skipping unreadable files, class(es) {', '.join(empty)} hold no images")
    return max_bytes, total_bytes


def storage_bounds(settings: WriterSettings, raw_bytes: int, num_images: int, page_size: int,
                   num_workers: int) -> tuple[int, int]:
    """(at least, at most) bytes the .beton needs. Samples: raw pixels for what is stored raw, a JPEG
    floor for the rest; at most everything raw. ffcv stores them in whole pages, each writer worker
    filling its own, plus a metadata record per image."""
    jpeg = {"raw": 0.0, "jpg": 1.0, "smart": 0.0, "proportion": settings.compress_probability}[settings.write_mode]
    overhead = 64 * num_images
    low = int(raw_bytes * (1 - jpeg) + raw_bytes * jpeg * JPEG_BYTES_PER_PIXEL / 3)
    pages = -(-low // page_size)
    return pages * page_size + overhead, (-(-raw_bytes // page_size) + num_workers) * page_size + overhead


def page_size_for(max_sample_bytes: int) -> int:
    """ffcv stores each sample inside one page: the page must hold the largest raw image."""
    size = MIN_PAGE_SIZE
    while size < 2 * max_sample_bytes:
        size *= 2
    return size


def rgb8(im: Image.Image) -> np.ndarray:
    """``im`` as contiguous RGB uint8 (H, W, 3). 16-bit grey images (PNG, TIFF) are scaled to 8 bits,
    ``round(v / 257)``: PIL's ``convert("RGB")`` clips them at 255, which turns most pixels white. (PIL
    already reduces 16-bit colour PNGs to 8 bits per channel.)"""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # "I": 16-bit PNGs of older PILs
        wide = np.asarray(im).astype(np.int64)
        grey = ((wide.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    return np.ascontiguousarray(im.convert("RGB"))


class ImageFolderRGB:
    """Indexable (image, label) source for ``DatasetWriter``: every image converted to RGB uint8 (:func:`rgb8`).

    ``convert('RGB')`` handles grayscale, CMYK and palette files, and PIL picks the decoder from
    the content, so a PNG saved as ``.JPEG`` is read correctly.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], seed: int) -> None:
        self.samples = list(samples)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        # RGBImageField draws its raw/jpg choice ('proportion' mode) from numpy's global RNG in
        # this worker: seeding per image makes the choice independent of the worker split.
        np.random.seed((self.seed * 1_000_003 + index) % 2**32)
        try:
            with Image.open(path) as im:
                return rgb8(im), label
        except Exception as e:
            raise WriterError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _watch_workers(report: Connection, workers: list[multiprocessing.process.BaseProcess], parent: int,
                   shared: list[str]) -> None:
    """In the writer process: when a worker dies with an error, say so and end this process at once.

    ffcv's ``DatasetWriter`` then waits forever -- for a sample count a dead worker never delivers, or
    in a blocking read of its allocation queue, where no Python-level interrupt reaches it. So the
    writer process exits from this thread instead, and the parent cleans up.

    ``workers`` holds every worker as it starts, so one that dies before the first look is seen too
    (``multiprocessing.active_children`` forgets finished children). When the command that started this
    process is gone (killed: it cannot clean up), this process removes ffcv's shared memory (``shared``)
    and ends itself and its workers rather than write on for nobody; the next start removes the partial file.
    """
    while True:
        time.sleep(0.2)
        if os.getppid() != parent:
            _unlink_shared_memory([("shared_memory", name) for name in shared])
            os.killpg(os.getpgrp(), signal.SIGKILL)
        failed = [f"{c.name} (pid {c.pid}) exited with code {c.exitcode}" for c in list(workers)
                  if c.exitcode not in (None, 0)]
        if failed:
            report.send(("worker", "; ".join(failed)))
            os._exit(3)


def _writer_process(scan_samples: list[tuple[Path, int]], tmp_beton: Path, settings: WriterSettings,
                    num_workers: int, chunk_size: int, page_size: int, report: Connection) -> None:
    """The body of the writer process: ffcv's DatasetWriter and its worker processes, watched."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    parent = os.getppid()
    os.setpgrp()  # this process and the workers it forks: one group the parent can stop at once
    workers: list[multiprocessing.process.BaseProcess] = []
    start = multiprocessing.process.BaseProcess.start

    def start_and_watch(process: multiprocessing.process.BaseProcess) -> None:
        process.run = _reporting(process.run, report)  # its error as one line, not a traceback
        start(process)
        workers.append(process)

    multiprocessing.process.BaseProcess.start = start_and_watch  # ffcv's workers (this process only)
    fields = {
        "image": RGBImageField(
            write_mode=settings.write_mode,
            max_resolution=settings.max_resolution,
            smart_threshold=settings.smart_threshold,
            jpeg_quality=settings.jpeg_quality,
            compress_probability=settings.compress_probability,
        ),
        "label": IntField(),
    }
    writer = DatasetWriter(str(tmp_beton), fields, page_size=page_size, num_workers=num_workers)
    prepare = writer.prepare

    shared: list[str] = []

    def prepare_and_report() -> None:  # the shared memory ffcv creates must not outlive a failed write
        prepare()
        shared.append(writer.metadata_sm.name)
        report.send(("shared_memory", writer.metadata_sm.name))

    writer.prepare = prepare_and_report
    threading.Thread(target=_watch_workers, args=(report, workers, parent, shared), daemon=True).start()
    _reporting(lambda: writer.from_indexed_dataset(ImageFolderRGB(scan_samples, settings.seed),
                                                   chunksize=chunk_size), report)()
    report.send(("done",))


def _reporting(body: Callable[[], object], report: Connection) -> Callable[[], None]:
    """``body`` for the writer process or one of its workers: an error is sent to the command (which ends the
    write with the cause, e.g. the space a full disk lacked), said in one line unless it is a full disk (the
    command's message says all), and ends the process with exit code 1, without multiprocessing's traceback."""
    def run() -> None:
        try:
            body()
        except Exception as e:  # noqa: BLE001 - whatever it is, the command reports it and stops the write
            code = getattr(e, "errno", None)
            report.send(("error", f"{type(e).__name__}: {e}", code))
            if code not in (errno.ENOSPC, errno.EDQUOT):
                print(f"{multiprocessing.current_process().name}: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
            sys.exit(1)
    return run


def _stop_group(proc: multiprocessing.process.BaseProcess) -> None:
    """Kill the writer process and its workers (its process group) and reap the writer."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.join()


def _write_samples(
    scan: FolderScan,
    tmp_beton: Path,
    settings: WriterSettings,
    num_workers: int,
    chunk_size: int,
    page_size: int,
    needs: tuple[int, int],
) -> None:
    """Run ffcv's writer in a process group of its own and watch it: a dead worker or a full disk ends
    the write within a second, with the cause; nothing of it is left running."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_writer_process, name="beton-writer",
                       args=(scan.samples, tmp_beton, settings, num_workers, chunk_size, page_size, send))
    proc.start()
    send.close()
    messages: list[tuple] = []
    try:
        while True:  # until the writer process has closed its end of the pipe (it ended)
            if not receive.poll(0.2):
                if not proc.is_alive() and not receive.poll():
                    break
                continue
            try:
                messages.append(receive.recv())
            except EOFError:
                break
            if messages[-1][0] == "worker":
                break  # the writer process is ending itself; its workers may be stuck: stop them
    except BaseException:  # Ctrl-C: take the writer and its workers down with us
        _stop_group(proc)
        _unlink_shared_memory(messages)
        raise
    _stop_group(proc)
    if proc.exitcode == 0 and any(m[0] == "done" for m in messages):
        return
    _unlink_shared_memory(messages)
    raise WriterError(_failure_message(messages, proc.exitcode, tmp_beton, needs))


def _unlink_shared_memory(messages: list[tuple]) -> None:
    for kind, *rest in messages:
        if kind == "shared_memory":
            with contextlib.suppress(FileNotFoundError):
                sm = SharedMemory(name=rest[0])
                sm.close()
                sm.unlink()


def _failure_message(messages: list[tuple], exitcode: int | None, tmp_beton: Path, needs: tuple[int, int]) -> str:
    free = shutil.disk_usage(tmp_beton.parent).free
    errnos = {m[2] for m in messages if m[0] == "error"}
    written = tmp_beton.stat().st_size if tmp_beton.exists() else 0
    if errnos & {errno.ENOSPC, errno.EDQUOT} or free < MIN_PAGE_SIZE:
        low, high = needs
        return (f"the disk holding {tmp_beton.parent} is full ({_human(free)} free) after {_human(written)} of the "
                f".beton were written; it needs between {_human(low)} and {_human(high)} (ffcv's pages of "
                f"{_human(MIN_PAGE_SIZE)} at least, filled with JPEGs or raw pixels). Free space, write to another "
                "disk (--out), or store fewer raw images (--compress-probability, --max-resolution); nothing was "
                "written to --out")
    worker = next((m[1] for m in messages if m[0] == "worker"), None)
    error = next((m[1] for m in messages if m[0] == "error"), None)
    if worker:
        cause = f"a writer worker failed ({error or worker})"
    else:
        cause = f"the writer failed ({error or f'exit code {exitcode}'})"
    return (f"{cause}. Nothing was written to --out; fix the cause (a file changed since the check? --skip-bad "
            "leaves out unreadable ones) and run again")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_beton(
    data_dir: str | Path,
    out: str | Path,
    settings: WriterSettings | None = None,
    *,
    num_workers: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    chunk_size: int = 100,
) -> dict:
    """Write ``data_dir`` to ``out`` (+ the JSON beside it); return the JSON's content.

    ``DatasetWriter`` forks worker processes: call this from a process that has no ffcv
    ``Loader`` alive (a forked child can inherit numba's compiler lock and hang).
    """
    start = time.perf_counter()
    settings = settings or WriterSettings()
    settings.validate()
    num_workers = num_workers or os.cpu_count() or 1
    if num_workers < 1 or chunk_size < 1:
        raise WriterError(f"num_workers and chunk_size must be at least 1, not {num_workers} and {chunk_size}")
    out = Path(out)
    scan = scan_imagefolder(data_dir)
    tmp_beton, tmp_json = check_output(out, overwrite)
    try:
        max_bytes, raw_bytes = _probe_all(scan, settings, num_workers, skip_bad)
        page_size = page_size_for(max_bytes)
        needs = storage_bounds(settings, raw_bytes, len(scan.samples), page_size, num_workers)
        free = shutil.disk_usage(out.parent).free
        if free < needs[0]:
            raise WriterError(f"{out.parent} has {_human(free)} free, and the .beton needs at least {_human(needs[0])} "
                              f"(up to {_human(needs[1])}); free space or write to another disk (--out)")
        _write_samples(scan, tmp_beton, settings, num_workers, chunk_size, page_size, needs)
        meta = {
            "classes": scan.classes,
            "class_to_idx": scan.class_to_idx,
            "num_classes": len(scan.classes),
            "num_images": len(scan.samples),
            "class_counts": np.bincount(
                [lab for _, lab in scan.samples], minlength=len(scan.classes)
            ).tolist(),
            "writer": {
                **asdict(settings),
                "fields": {"image": "RGBImageField", "label": "IntField"},
                "source": str(scan.root.resolve()),
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
            "skipped": scan.skipped,
        }
        try:
            tmp_json.write_text(json.dumps(meta, indent=1) + "\n")
        except OSError as e:
            raise WriterError(f"cannot write {meta_path(out)} ({e.strerror}); free space in {out.parent}") from e
        # The JSON first, the .beton last: an existing .beton always has its JSON. An old one (--overwrite) goes
        # first, so that a kill between the two renames cannot leave it beside the new JSON.
        out.unlink(missing_ok=True)
        os.replace(tmp_json, meta_path(out))
        os.replace(tmp_beton, out)
    finally:
        for tmp in (tmp_beton, tmp_json):
            tmp.unlink(missing_ok=True)
    meta["seconds"] = time.perf_counter() - start
    meta["bytes"] = out.stat().st_size
    return meta


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = WriterSettings()
    p = argparse.ArgumentParser(
        prog="python -m backbone.write_beton",
        description="Write an ImageNet-style folder (ROOT/<class>/<image>) to an ffcv .beton, plus a JSON "
        "class map beside it (PATH.beton -> PATH.json). Run once per split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", required=True, type=Path, help="split folder with one sub-folder per class")
    p.add_argument("--out", required=True, type=Path, help="output file, e.g. /data/ffcv/train.beton")
    p.add_argument(
        "--write-mode",
        default=d.write_mode,
        choices=["raw", "jpg", "smart", "proportion"],
        help="raw pixels, JPEG, 'smart' (JPEG above --smart-threshold bytes) or 'proportion' "
        "(JPEG with probability --compress-probability)",
    )
    p.add_argument(
        "--max-resolution",
        type=int,
        default=d.max_resolution,
        help="longest side after resizing (INTER_AREA); 0 keeps the original sizes",
    )
    p.add_argument(
        "--compress-probability",
        type=float,
        default=d.compress_probability,
        help="fraction stored as JPEG in 'proportion' mode",
    )
    p.add_argument(
        "--jpeg-quality", type=int, default=d.jpeg_quality, help="JPEG quality of re-encoded images"
    )
    p.add_argument(
        "--smart-threshold",
        type=int,
        default=d.smart_threshold,
        help="'smart' mode: raw images larger than this many bytes are stored as JPEG",
    )
    p.add_argument("--num-workers", type=int, default=os.cpu_count(), help="writer processes")
    p.add_argument("--chunk-size", type=int, default=100, help="images per work item")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the per-image raw/JPEG choice")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unreadable or truncated images (listed in the JSON) instead of stopping",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    settings = WriterSettings(
        write_mode=args.write_mode,
        max_resolution=args.max_resolution or None,
        compress_probability=args.compress_probability,
        jpeg_quality=args.jpeg_quality,
        smart_threshold=args.smart_threshold,
        seed=args.seed,
    )
    try:
        with warnings.catch_warnings():
            # Truncated/odd files are reported by the probe; PIL's own warnings would repeat them.
            warnings.simplefilter("ignore", UserWarning)
            meta = write_beton(
                args.data_dir,
                args.out,
                settings,
                num_workers=args.num_workers,
                skip_bad=args.skip_bad,
                overwrite=args.overwrite,
                chunk_size=args.chunk_size,
            )
    except WriterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(
        f"wrote {args.out}: {meta['num_images']} images, {meta['num_classes']} classes, "
        f"{meta['bytes'] / 2**20:.1f} MiB, {meta['seconds']:.1f} s"
        + (
            f", {len(meta['skipped'])} unreadable file(s) skipped (listed in {meta_path(args.out)})"
            if meta["skipped"]
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
