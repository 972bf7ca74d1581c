"""Modalities: what the model needs to know about one kind of observation.

A modality embeds observations into GE tokens (`make_embed`), builds the decoder (`make_decoder`),
turns a data batch into (observations, labels) and augments them for training (`unpack`,
`augment`), measures reconstruction (`recon_loss`, `recon_metrics`) and turns decoder outputs into
results (`postprocess`). The Generative Encoder never changes between modalities.

    images      unite_core.modalities.images.ImageModality
    molecules   unite_core.modalities.molecules.MoleculeModality

A new modality is one class with the `Modality` methods and one entry in `MODALITIES`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from ..config import Config
from .images import ImageModality
from .molecules import MoleculeModality


class Modality(Protocol):
    name: str
    perceptual: Optional[nn.Module]

    def make_embed(self, width: int) -> nn.Module: ...
    def make_decoder(self) -> nn.Module: ...
    def unpack(self, batch) -> tuple[Any, torch.Tensor]: ...
    def augment(self, obs, generator: Optional[torch.Generator] = None): ...
    def recon_loss(self, decoded, obs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def recon_metrics(self, decoded, obs) -> dict[str, float]: ...
    def postprocess(self, decoded, **kwargs): ...
    def batch_size(self, obs) -> int: ...


#: modality name (params.yaml `modality`, the data's info["modality"]) -> its class, built as cls(cfg, info)
MODALITIES: dict[str, Callable[[Config, dict], Modality]] = {
    "images": ImageModality,
    "molecules": MoleculeModality,
}


def build_modality(cfg: Config, info: dict) -> Modality:
    name = info.get("modality", cfg.modality)
    if name not in MODALITIES:
        raise ValueError(f"unknown modality '{name}'; known: {sorted(MODALITIES)}")
    return MODALITIES[name](cfg, info)


__all__ = ["MODALITIES", "ImageModality", "Modality", "MoleculeModality", "build_modality"]
