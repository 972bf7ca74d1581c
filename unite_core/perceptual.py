"""Perceptual (LPIPS) loss on VGG16 features, from a local weights file only.

The reference loss is LPIPS; its backbone and head weights are normally downloaded at run time, which
this project never does. This module builds torchvision's VGG16 with no weights and loads a state_dict
the user names (loss.perceptual_weights): the VGG16 convolutions (`features.N.*`, torchvision's
layout) and, optionally, LPIPS's five learned linear heads (`lin0.weight` .. `lin4.weight`, shape
(1, C, 1, 1); LPIPS's own names `lin0.model.1.weight` are accepted too). Per stage, activations are
unit-normalised over channels, their squared difference is weighted per channel (the heads; 1 for
every channel without them), summed over channels and averaged over positions; the five stages add up.
`unite import-checkpoint` writes such a file from the LPIPS weights inside an authors' checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

_STAGE_ENDS = (4, 9, 16, 23, 30)  # indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_HEAD = re.compile(r"^lin(\d)\.(?:model\.1\.)?weight$")


class PerceptualWeightsError(RuntimeError):
    pass


def split_weights(state: dict) -> tuple[dict, list[torch.Tensor] | None]:
    """(VGG16 `features` state_dict without the prefix, the five heads or None)."""
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    heads: dict[int, torch.Tensor] = {}
    for k, v in state.items():
        m = _HEAD.match(k)
        if m:
            heads[int(m.group(1))] = v
    if not heads:
        return features, None
    if sorted(heads) != list(range(5)) or any(heads[i].numel() != c for i, c in enumerate(_CHANNELS)):
        raise ValueError("LPIPS heads must be lin0..lin4 with 64, 128, 256, 512, 512 channels")
    return features, [heads[i].reshape(1, -1, 1, 1).float() for i in range(5)]


class PerceptualLoss(nn.Module):
    def __init__(self, weights_path: str | Path, unit_range: bool = False):
        super().__init__()
        from torchvision.models import vgg16  # imported lazily: only this loss needs torchvision

        path = Path(weights_path)
        if not path.is_file():
            raise PerceptualWeightsError(
                f"loss.perceptual_weights='{path}' does not exist: point it at a local VGG16 state_dict "
                "or set loss.w_perc=0"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            features, heads = split_weights(state)
            net = vgg16(weights=None)
            net.features.load_state_dict(features)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise PerceptualWeightsError(
                f"loss.perceptual_weights='{path}' is not a VGG16 state_dict ({type(exc).__name__}: {exc}): "
                "save one with torch.save(torchvision.models.vgg16(...).state_dict(), path)"
            ) from None
        self.unit_range = unit_range
        self.features = net.features[: _STAGE_ENDS[-1]].eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.has_heads = heads is not None
        for i, h in enumerate(heads or []):
            self.register_buffer(f"head{i}", h, persistent=False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # the backbone stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y in the model's range ([0, 1] with unit_range, else [-1, 1]), 1 or 3 channels; returns
        the batch mean distance (scalar)."""
        def prep(img):
            img = img.float() if self.unit_range else (img.float() + 1) / 2
            if img.shape[1] == 1:
                img = img.repeat(1, 3, 1, 1)
            return (img - self.mean) / self.std

        a, b = prep(x), prep(y)
        total = a.new_zeros(())
        start = 0
        for i, end in enumerate(_STAGE_ENDS):
            block = self.features[start:end]
            a, b = block(a), block(b)
            start = end
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            diff = (na - nb).pow(2)
            if self.has_heads:
                diff = diff * getattr(self, f"head{i}")
            total = total + diff.sum(1).mean()
            if min(a.shape[-2:]) < 2:
                break
        return total
