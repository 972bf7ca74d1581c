"""What the `unite` commands print: the stdout / stderr consoles, progress (a rich bar with an ETA on a
terminal, a line every 30 s elsewhere or with --quiet) and the summary line of a finished stage."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@functools.cache
def console():
    """stdout console for results."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


@functools.cache
def err_console():
    """stderr console shared by logging and progress bars (so log lines print above the bar)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------
def _fmt_duration(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class _RichTask:
    def __init__(self, progress, task_id, description: str, total: float | None):
        self.progress, self.task_id = progress, task_id
        self.description, self.total = description, total
        self.started = False

    def update(self, completed: float, total: float | None = None, **fields: Any) -> None:
        info = "  ".join(f"{k} {_num(v)}" for k, v in fields.items())
        if total is not None and total != self.total:
            self.total = total
            self.progress.update(self.task_id, total=total)
        if not self.started:  # the first value is the baseline (a resumed run), not speed
            self.progress.reset(self.task_id, completed=completed, total=self.total, info=info)
            self.started = True
        else:
            self.progress.update(self.task_id, completed=completed, info=info)


class _LineTask:
    """Progress as occasional log-style lines when stderr is not a terminal (CI, dvc repro | tee)."""

    def __init__(self, description: str, total: float | None, every_s: float = 30.0):
        self.description, self.total, self.every_s = description, total, every_s
        self.first: tuple[float, float] | None = None
        self.last_print = 0.0
        self.pending: tuple[float, dict] | None = None

    def update(self, completed: float, total: float | None = None, **fields: Any) -> None:
        now = time.monotonic()
        if total is not None:
            self.total = total
        self.pending = (completed, fields)
        if self.first is None:
            self.first = (now, completed)
        done = self.total is not None and completed >= self.total
        if now - self.last_print >= self.every_s or done:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self.pending is not None:
            now = now or time.monotonic()
            self.last_print = now
            self.emit(*self.pending, now)
            self.pending = None

    def emit(self, completed, fields, now) -> None:
        text = f"{self.description}: {completed:g}"
        if self.total:
            text += f"/{self.total:g} ({100 * completed / self.total:.0f}%)"
        t0, c0 = self.first or (now, completed)
        if self.total and completed > c0 and now > t0:
            eta = (self.total - completed) * (now - t0) / (completed - c0)
            text += f" eta {_fmt_duration(eta)}"
        if fields:
            text += "  " + "  ".join(f"{k} {_num(v)}" for k, v in fields.items())
        err_console().print(text, markup=False)


class RichReporter:
    """The CLI's Reporter: a rich progress bar with an ETA on a terminal; a progress line every
    `every_s` seconds (and at the end) when stderr is no terminal or with --quiet."""

    def __init__(self, quiet: bool = False, every_s: float = 30.0):
        self.quiet, self.every_s = quiet, every_s

    @contextmanager
    def progress(self, description: str, total: float | None) -> Iterator[Any]:
        con = err_console()
        if self.quiet or not con.is_terminal:
            task = _LineTask(description, total, every_s=self.every_s)
            yield task
            task.flush()
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=con, transient=False) as progress:
            tid = progress.add_task(description, total=total, info="")
            yield _RichTask(progress, tid, description, total)


def _num(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def print_result(stage: str, result: dict, seconds: float, root: Path, wrote_metrics: bool) -> None:
    out = console()
    if stage == "prepare":
        out.print(f"prepared {result.get('dataset')}: {result.get('num_train')} train / {result.get('num_val')} val "
                  f"items, content hash {str(result.get('content_hash', ''))[:12]}", markup=False)
    elif stage == "train":
        verb = "trained" if result.get("trained_now") else "already trained (reused the finished run)"
        line = (f"{verb} {result.get('run_name')}: {result.get('steps')}/{result.get('steps_requested')} steps, "
                f"{_num(result.get('seconds'))} s of training ({_num(result.get('samples_per_s'))} samples/s), "
                f"final loss {_num(result.get('final_loss'))}")
        if result.get("val_psnr") is not None:
            line += f", val PSNR {_num(result.get('val_psnr'))} dB"
        if result.get("stopped_early"):
            line += " (stopped by train.time_limit_minutes)"
        out.print(line, markup=False)
    elif stage == "sample":
        out.print(f"wrote {result.get('num_samples')} samples to {result.get('out')}", markup=False)
    else:
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k} {_num(v)}" for k, v in list(scalars.items())[:12])
        out.print(f"{stage}: {shown}" if shown else f"{stage}: done", markup=False)
    tail = f"{stage} finished in {seconds:.1f} s"
    if wrote_metrics:
        tail += f"; metrics in {(root / 'metrics' / f'{stage}.json').relative_to(root)}"
    out.print(tail, markup=False)
