"""Decoding image files: the one decode that training and `prepare` share, and prepare's parallel pass.

:func:`decode_square` is what an image-folder item is made of: PIL decodes the whole file, converts it
to RGB, crops the centred square and resizes it (bicubic, antialiased) to ``size``; uint8 ``(3, S, S)``.
A truncated JPEG passes ``PIL.Image.verify()`` (which reads headers) and fails only here, so prepare
runs exactly this on every image the split uses.

:func:`decode_files` runs :func:`decode_square` over many files in worker processes (a
``concurrent.futures.ProcessPoolExecutor`` on the ``forkserver`` start method: the caller may hold
threads, e.g. a progress bar's), chunk by chunk, reporting progress after each chunk. A chunk can also
write its images into a shard: a ``.npy`` file of uint8 ``(count, 3, S, S)`` created beforehand by
:func:`create_shard`, which each worker opens memory-mapped and fills at its offset, so the pixels never
travel through a pipe.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from unite_core.data.errors import DataError

# files decoded in-process below this count (worker start-up costs ~1-2 s: they import torch)
MIN_PARALLEL_FILES = 64
MAX_CHUNK = 64


def square_rgb(img: Image.Image, size: int) -> np.ndarray:
    """RGB, center square crop, bicubic (antialiased) resize; uint8 (3, size, size), C-contiguous."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def decode_square(path: str | Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return square_rgb(img, size)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# Shard files
# ----------------------------------------------------------------------------------------------
def create_shard(path: Path, count: int, size: int) -> None:
    """An .npy file of uint8 zeros (count, 3, size, size) (sparse until written)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, 3, size, size))
    arr.flush()
    del arr


def open_shard(path: Path, count: int, size: int, mode: str = "r") -> np.memmap:
    """Memory-map a shard; DataError when it is missing or not the (count, 3, size, size) uint8 array."""
    try:
        arr = np.load(path, mmap_mode=mode)
    except Exception as exc:  # noqa: BLE001 - every unreadable file gets the same message
        raise DataError(
            f"shard file '{path}' is missing or unreadable ({type(exc).__name__}: {exc}): "
            "run `unite prepare` again"
        ) from None
    if arr.dtype != np.uint8 or tuple(arr.shape) != (count, 3, size, size):
        raise DataError(
            f"shard file '{path}' holds {arr.dtype} {tuple(arr.shape)}, expected uint8 {(count, 3, size, size)}: "
            "run `unite prepare` again"
        )
    return arr


# ----------------------------------------------------------------------------------------------
# The parallel pass
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """Files ``rels`` (relative to the root); with ``shard``, image k goes to record ``offset + k``."""

    rels: tuple[str, ...]
    shard: Optional[str] = None
    shard_count: int = 0
    offset: int = 0


def _decode_chunk(root: str, size: int, chunk: Chunk) -> list[Optional[str]]:
    """Decode every file of the chunk; None for a good one, else a short reason. Runs in a worker."""
    out = open_shard(Path(chunk.shard), chunk.shard_count, size, "r+") if chunk.shard else None
    reasons: list[Optional[str]] = []
    for k, rel in enumerate(chunk.rels):
        try:
            pixels = decode_square(os.path.join(root, rel), size)
        except Exception as exc:  # noqa: BLE001 - any decode/read failure makes the file unusable
            reasons.append(f"{type(exc).__name__}: {exc}")
            continue
        if out is not None:
            out[chunk.offset + k] = pixels
        reasons.append(None)
    if out is not None:
        out.flush()
        del out
    return reasons


def chunked(rels: Sequence[str], processes: int, *, shard: Optional[str] = None, shard_count: int = 0,
            offset: int = 0) -> list[Chunk]:
    """Split files into chunks of at most MAX_CHUNK, about 8 per process (for an even finish)."""
    n = len(rels)
    step = max(1, min(MAX_CHUNK, -(-n // max(1, processes * 8))))
    return [Chunk(tuple(rels[i:i + step]), shard, shard_count, offset + i) for i in range(0, n, step)]


ProgressFactory = Callable[[str, Optional[float]], object]


def decode_files(root: Path, size: int, chunks: Sequence[Chunk], *, processes: Optional[int] = None,
                 progress: Optional[ProgressFactory] = None,
                 description: str = "decoding images") -> list[Optional[str]]:
    """Decode (and write, for shard chunks) every file; one reason-or-None per file, in chunk order.

    ``progress(description, total)`` is a context manager yielding a task with ``update(completed)``
    (pipelines' Reporter.progress); it is told after every chunk.
    """
    total = sum(len(c.rels) for c in chunks)
    processes = available_cpus() if processes is None else max(1, int(processes))
    results: list[Optional[list[Optional[str]]]] = [None] * len(chunks)
    with (progress(description, total) if progress else nullcontext()) as task:
        done = 0
        if processes == 1 or total < MIN_PARALLEL_FILES:
            for i, c in enumerate(chunks):
                results[i] = _decode_chunk(str(root), size, c)
                done += len(c.rels)
                if task is not None:
                    task.update(done)
        else:
            ctx = multiprocessing.get_context("forkserver")
            pool = ProcessPoolExecutor(max_workers=min(processes, len(chunks)), mp_context=ctx)
            try:
                futures = {pool.submit(_decode_chunk, str(root), size, c): i for i, c in enumerate(chunks)}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED, timeout=1.0)
                    for f in finished:
                        i = futures[f]
                        results[i] = f.result()  # re-raises a worker's unexpected error
                        done += len(chunks[i].rels)
                    if finished and task is not None:
                        task.update(done)
            except BrokenProcessPool as exc:
                pool.shutdown(wait=False, cancel_futures=True)
                raise DataError(
                    f"an image-decoding process of `unite prepare` ended unexpectedly ({exc}): it ran out of memory "
                    "or was killed; run it again (it uses one process per available CPU: restrict them with taskset)"
                ) from None
            except BaseException:  # Ctrl-C or a worker's unexpected error: do not decode the rest
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    return [r for part in results for r in part]
