"""What a training attempt leaves beside its adapter for a person to read: metrics, a loss plot, a log.

The metrics file is appended to while training runs and read by other machines over the share, so it is
written one whole line at a time and read tolerantly: a crash (or a reader racing the writer) leaves at most
a partial last line, which the reader skips. No torch here: the spooler side reads these files too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from pydantic import ValidationError

from schemas.checkpoint import MetricsLine
from spooler.atomic import fsync_dir, open_append, write_bytes
from spooler.errors import Cancelled, ClaimLost, Rejected

log = logging.getLogger(__name__)

FSYNC_SECONDS = 5.0  # a flush per line reaches the share's client; an fsync per step would cost too much
SMOOTH_MIN_POINTS = 30  # below this the raw curve is readable on its own


# ── metrics.jsonl ────────────────────────────────────────────────────────────────────────────────────────
class MetricsLog:
    """Appends ``MetricsLine`` records to a JSON-lines file, one write per whole line."""

    def __init__(self, path: Path, file_mode: int = 0o664) -> None:
        self.path = path
        self.file_mode = file_mode
        self._file: IO[str] | None = None
        self._last_sync = time.monotonic()
        self._appended = False

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_from(self, previous: Path | None, upto_step: int) -> int:
        """Begin with the earlier attempt's history up to the checkpoint it resumes from, so the combined file
        has no step twice; steps after it were trained again by this attempt. Returns the lines kept.
        Must come before any append: it replaces the file."""
        if self._appended:
            raise RuntimeError("start_from must be called before anything is appended")
        kept = _history_upto(read_metrics(previous), upto_step) if previous is not None else []
        self._close_file()
        text = "".join(line.model_dump_json(exclude_none=True) + "\n" for line in kept)
        write_bytes(self.path, text.encode(), self.file_mode)
        return len(kept)

    def train(self, step: int, loss: float | None, lr: float | None = None, epoch: float | None = None,
              tokens: int | None = None, tokens_per_second: float | None = None,
              grad_norm: float | None = None) -> None:
        self._append(MetricsLine(step=step, kind="train", loss=loss, lr=lr, epoch=epoch, tokens=tokens,
                                 tokens_per_second=tokens_per_second, grad_norm=grad_norm))

    def eval(self, step: int, eval_loss: float | None, phase: str | None = None) -> None:
        self._append(MetricsLine(step=step, kind="eval", eval_loss=eval_loss, phase=phase))

    def sync(self) -> None:
        """Make every line written so far durable (before a checkpoint says the steps happened)."""
        if self._file is not None:
            self._file.flush()
            with contextlib.suppress(OSError):  # some network filesystems refuse fsync; the flush still went out
                os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        self._close_file()

    def _append(self, line: MetricsLine) -> None:
        f = self._open()
        f.write(line.model_dump_json(exclude_none=True) + "\n")  # one write: a crash cuts at most this line
        f.flush()
        self._appended = True
        if time.monotonic() - self._last_sync >= FSYNC_SECONDS:
            self.sync()

    def _open(self) -> IO[str]:
        if self._file is None:
            new = not self.path.exists()
            self._file = open_append(self.path)  # closed in close()
            if new:
                with contextlib.suppress(OSError):
                    os.chmod(self.path, self.file_mode)
                fsync_dir(self.path.parent)
        return self._file

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _history_upto(lines: list[MetricsLine], upto_step: int) -> list[MetricsLine]:
    """Lines at or before ``upto_step``, each train step and each (step, phase) evaluation once."""
    seen: set[tuple[str, int, str | None]] = set()
    kept: list[MetricsLine] = []
    for line in lines:
        key = (line.kind, line.step, line.phase if line.kind == "eval" else None)
        if line.step <= upto_step and key not in seen:
            seen.add(key)
            kept.append(line)
    return kept


def read_metrics(path: Path | None) -> list[MetricsLine]:
    """Every line that parses; a partial last line (the writer crashed, or is mid-write) is simply skipped."""
    if path is None:
        return []
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    lines: list[MetricsLine] = []
    for chunk in raw.split(b"\n"):
        if line := _parse_line(chunk):
            lines.append(line)
    return lines


def _parse_line(chunk: bytes) -> MetricsLine | None:
    if not chunk.strip():
        return None
    try:
        return MetricsLine.model_validate(json.loads(chunk.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValidationError, TypeError):
        return None


# ── loss.png ─────────────────────────────────────────────────────────────────────────────────────────────
def plot_loss(metrics: list[MetricsLine], png: Path, title: str, file_mode: int = 0o664) -> Path | None:
    """The loss curve a person glances at first. None (nothing written) when no train step has a loss."""
    train = sorted((m.step, m.loss) for m in metrics if m.kind == "train" and m.loss is not None)
    evals = sorted((m.step, m.eval_loss) for m in metrics if m.kind == "eval" and m.eval_loss is not None)
    if not train:
        return None
    write_bytes(png, _render_png(train, evals, title), file_mode)
    return png


def _render_png(train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str) -> bytes:
    """Drawn on an Agg canvas of its own: no pyplot, so no global backend or figure state in the worker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, losses = zip(*train, strict=True)
    smooth = len(losses) >= SMOOTH_MIN_POINTS
    ax.plot(steps, losses, color="tab:blue", linewidth=1, alpha=0.35 if smooth else 1.0, label="train loss")
    if smooth:
        ax.plot(steps, _moving_average(list(losses)), color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if evals:
        e_steps, e_losses = zip(*evals, strict=True)
        ax.plot(e_steps, e_losses, color="tab:orange", marker="o", linewidth=1.5, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _moving_average(values: list[float]) -> list[float]:
    """A trailing mean over ~5% of the run: a centred one would draw the curve's end before it happened."""
    window = max(5, len(values) // 20)
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ── train.log ────────────────────────────────────────────────────────────────────────────────────────────
class _OneLineFormatter(logging.Formatter):
    """Tracebacks folded onto their record's line, so every line of train.log starts with a timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r\n", "\n").replace("\n", " | ")


class _NoFollowFileHandler(logging.FileHandler):
    """train.log is opened never through a link: see ``spooler.atomic.open_append``."""

    def _open(self) -> IO[str]:
        return open_append(Path(self.baseFilename))


class TrainLog:
    """While training runs, every log record also goes to ``<folder>/train.log``, kept with the attempt."""

    def __init__(self, folder: Path, level: int = logging.INFO, file_mode: int | None = None) -> None:
        self.path = folder / "train.log"
        self.level = level
        self.file_mode = file_mode
        self._handler: logging.FileHandler | None = None
        self._root_level: int | None = None

    def __enter__(self) -> TrainLog:
        handler = _NoFollowFileHandler(self.path, encoding="utf-8")
        handler.setLevel(self.level)
        handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if self.file_mode is not None:
            with contextlib.suppress(OSError):
                os.chmod(self.path, self.file_mode)
        root = logging.getLogger()
        self._root_level = root.level
        if root.level > self.level:
            root.setLevel(self.level)  # else INFO records never reach any handler
        root.addHandler(handler)
        self._handler = handler
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        root = logging.getLogger()
        if exc is not None and not isinstance(exc, (Rejected, Cancelled, ClaimLost, KeyboardInterrupt, SystemExit)):
            log.error("training stopped by %s", type(exc).__name__, exc_info=(exc_type, exc, tb))
        if self._handler is not None:
            root.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        if self._root_level is not None:
            root.setLevel(self._root_level)
            self._root_level = None
