"""Atomic file writes: the one helper every part of the project uses to write a file or a folder.

A write goes to a temporary file beside the target, is flushed and fsynced, gets the permissions a
plain `open(path, "w")` would give (0666 minus the umask; `tempfile.mkstemp` alone makes 0600), and
is renamed over the target; the folder is fsynced after the rename where the OS allows it. Readers
(and a crash at any point) see the old file or the new one, never half of one. A full disk or quota
(ENOSPC, EDQUOT) raises `DiskFullError`, one line naming the path; the temporary file is removed and
the old file stays as it was.

    atomic_write_text(path, text)          atomic_write_bytes(path, data)
    atomic_write_json(path, data)          # sorted keys, NaN as null (json_safe)
    atomic_torch_save(obj, path)           atomic_write(path, lambda f: image.save(f, format="PNG"))
    with atomic_dir(folder) as tmp: ...    # a checkpoint folder: all files, then one rename

Also the project's two digests: `file_sha256(path)` (a file's bytes) and `stable_hash(obj, n)` (a
JSON-able object, key order ignored: params hashes, resume keys, cache names).

Hand-written on purpose: the standard library has no fsynced, permission-keeping atomic write, and
the small packages that offer one either skip the fsync or the umask.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = [
    "DiskFullError",
    "WriteError",
    "atomic_dir",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
    "current_umask",
    "file_sha256",
    "fsync_tree",
    "raise_write_error",
    "stable_hash",
]

_FULL = {errno.ENOSPC, errno.EDQUOT}


class WriteError(OSError):
    """A file could not be written (permissions, read-only disk, ...); the message names the path.

    str() is the message alone (errno and filename are attributes, not part of the text)."""

    def __init__(self, message: str, errno_: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.message = message
        self.errno, self.filename = errno_, filename

    def __str__(self) -> str:
        return self.message


class DiskFullError(WriteError):
    """No space (or quota) left where a file was being written; the message names the path."""


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def raise_write_error(exc: OSError, path: str | Path) -> None:
    """Re-raise an OSError from writing `path` as one line that names the path and the fix."""
    if isinstance(exc, WriteError):
        raise exc
    if exc.errno in _FULL:
        raise DiskFullError(f"no space left on the device to write '{path}': free some space there (or move the "
                            "project to a larger disk) and run the command again", exc.errno, str(path)) from None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise WriteError(f"cannot write '{path}' ({exc.strerror}): check the folder's permissions or that its "
                         "disk is writable", exc.errno, str(path)) from None
    raise exc


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it is durable (not possible on every OS / file system)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingFile:
    """A file whose write errors are remembered: torch.save turns an OSError of the file it writes
    (ENOSPC) into a RuntimeError without the errno, so the cause is taken from here instead."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """Write `path` atomically: `write(f)` fills a binary temp file beside it, then fsync and rename."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            recording = _RecordingFile(f)
            try:
                write(recording)  # type: ignore[arg-type]
            except Exception as exc:
                if recording.error is not None and not isinstance(exc, OSError):
                    raise recording.error from exc
                raise
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise_write_error(exc, path)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    if fsync:
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), fsync=fsync)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def json_safe(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats become null, tuples lists, paths strings, numpy/torch scalars numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        try:
            return json_safe(value.item())
        except (TypeError, ValueError):
            pass
    return value


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 1, fsync: bool = True) -> Path:
    """`data` as sorted-key JSON (json_safe: NaN as null), written atomically."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=indent, sort_keys=True) + "\n", fsync=fsync)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save through atomic_write (fsynced: checkpoints and prepared tensors)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def fsync_tree(folder: str | Path) -> None:
    """fsync every file below `folder`, then the folders themselves (deepest first)."""
    folder = Path(folder)
    dirs = []
    for dirpath, _, files in os.walk(folder):
        dirs.append(Path(dirpath))
        for name in files:
            try:
                fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(d)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A folder written as a whole: fill the yielded temp folder; on success it replaces `path`.

    The files are fsynced before the rename; the folder gets 0777 minus the umask (mkdtemp makes
    0700). An existing `path` is removed first (a folder cannot be renamed over a non-empty one), so
    between that and the rename the folder is absent; readers that list complete folders (a
    checkpoint folder is complete once its meta file is there) never see a half-written one.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise_write_error(exc, path)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (the check of prepared files and downloaded data)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stable_hash(obj: Any, n: int = 12) -> str:
    """The first `n` hex digits of the SHA-256 of `obj` as sorted-key JSON (values JSON cannot hold are
    written as their str()): the same object gives the same hash in every process and on every machine."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
