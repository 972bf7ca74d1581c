"""Datasets per modality. Images: mnist5k, digits, imagefolder (see ``unite_core.data.images``); the training
loop's step order and batch delivery (DataLoader workers): ``unite_core.data.loader``.

The names below are imported on first use (PEP 562), so that a process which needs only
``unite_core.data.decoding`` (prepare's decode workers) does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from unite_core.data.errors import DataError

_FROM_IMAGES = (
    "IMAGE_DATASETS",
    "IMAGE_EXTENSIONS",
    "ImageData",
    "ImageFolderDataset",
    "ShardImageDataset",
    "TensorImageDataset",
    "denormalize",
    "load_image_data",
    "load_prepared",
    "prepare_image_data",
    "stratified_split",
    "to_uint8",
)

__all__ = ["DataError", *_FROM_IMAGES]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from unite_core.data.images import (  # noqa: F401
        IMAGE_DATASETS, IMAGE_EXTENSIONS, ImageData, ImageFolderDataset, ShardImageDataset, TensorImageDataset,
        denormalize, load_image_data, load_prepared, prepare_image_data, stratified_split, to_uint8,
    )


def __getattr__(name: str) -> Any:
    if name in _FROM_IMAGES:
        return getattr(import_module("unite_core.data.images"), name)
    raise AttributeError(f"module 'unite_core.data' has no attribute {name!r}")
