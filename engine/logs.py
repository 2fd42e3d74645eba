"""Logging for runs: python logging setup, rank-0 JSON-lines metrics, progress display.

Interactive runs (stderr is a terminal) get a tqdm bar; batch jobs (SLURM logs, CI) get one
summary line every ``every_s`` seconds instead, which reads well in a log file where a bar's
carriage returns would be one endless line. Only rank 0 writes metrics and shows progress;
every line is tagged with its rank (the trainer keeps per-epoch messages to rank 0).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def setup_logging(rank: int = 0, level: int = logging.INFO, log_file: str | Path | None = None) -> None:
    """Configure the root logger: rank-tagged lines on stderr (+ a file on rank 0 if given)."""
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                            datefmt="%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_lkm_run", False)]:  # ours only (pytest adds its own)
        root.removeHandler(h)
        h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        h._lkm_run = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


class MetricsWriter:
    """Appends one JSON object per line to ``path`` and, with ``tensorboard``, the numbers of each record
    as TensorBoard scalars in the same folder (rank 0 only; a no-op elsewhere).

    Appending keeps the history of a resumed run in one file; every record carries ``time``. A record's
    ``kind`` and ``step`` place its scalars (``train/loss`` at step 120); a list of numbers is one scalar
    per entry, named by ``names`` (e.g. per-class IoU by class name). Records go to TensorBoard's event
    file as they come; it is flushed every 30 s and at each validation (``flush``).
    """

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: bool = True,
                 names: dict[str, list[str]] | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.names = names or {}
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.path.parent), flush_secs=30)

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **{k: _jsonable(v) for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind", "metrics"), int(record["step"])
        for key, value in record.items():
            if key in ("time", "kind", "step"):
                continue
            if isinstance(value, list):
                labels = self.names.get(key) or [str(i) for i in range(len(value))]
                for label, v in zip(labels, value, strict=False):
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        self._tb.add_scalar(f"{kind}/{key}/{label}", v, step)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                self._tb.add_scalar(f"{kind}/{key}", value, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """Progress of a loop: tqdm bar on a TTY, else a summary line every ``every_s`` seconds.

    Iterate it over an iterable, or call :meth:`advance` per item and :meth:`close` at the end;
    ``update(**values)`` sets what is shown (loss, lr, images/s...).
    """

    def __init__(self, iterable: Iterable[T] | None, total: int | None, desc: str, enabled: bool = True,
                 every_s: float = 30.0, logger: logging.Logger | None = None, initial: int = 0):
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.every_s = every_s
        self.log = logger or logging.getLogger("progress")
        self.values: dict[str, Any] = {}
        self.count = initial
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True) if self.tty else None
        self._last, self._shown, self._closed = time.monotonic(), "", False

    def update(self, **values: Any) -> None:
        self.values.update(values)
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in self.values.items()}, refresh=False)

    def _line(self) -> str:
        of = f"/{self.total}" if self.total else ""
        vals = " ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())
        return f"{self.desc} {self.count}{of} {vals}".rstrip()

    def advance(self, n: int = 1) -> None:
        """``n`` more items done."""
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._shown = self._line()
            self.log.info(self._shown)
            self._last = time.monotonic()

    def close(self) -> None:
        """Close the bar, or log the final line (unless it was just shown)."""
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self._line() != self._shown:
            self.log.info(self._line())

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable or ():
                yield item
                self.advance()
        finally:
            self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
