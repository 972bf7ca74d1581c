"""Datasets per modality. Images: mnist5k, digits, imagefolder (see ``unite_core.data.images``); the training
loop's step order and batch delivery (DataLoader workers): ``unite_core.data.loader``."""

from unite_core.data.errors import DataError
from unite_core.data.images import (
    IMAGE_DATASETS,
    IMAGE_EXTENSIONS,
    ImageData,
    ImageFolderDataset,
    ShardImageDataset,
    TensorImageDataset,
    denormalize,
    load_image_data,
    load_prepared,
    prepare_image_data,
    stratified_split,
    to_uint8,
)

__all__ = [
    "DataError",
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
]
