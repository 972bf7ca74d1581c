"""Perceptual (LPIPS-style) loss on VGG16 features, from a local weights file only.

The reference loss is LPIPS; its backbone weights are normally downloaded at run time, which this
project never does. This module builds torchvision's VGG16 with no weights, loads a state_dict the
user names (loss.perceptual_weights), and compares unit-normalised activations of its five stages
(channel-uniform weights, as LPIPS without its learned linear heads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_STAGE_ENDS = (4, 9, 16, 23, 30)  # indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class PerceptualWeightsError(RuntimeError):
    pass


class PerceptualLoss(nn.Module):
    def __init__(self, weights_path: str | Path):
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
            net = vgg16(weights=None)
            state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
            net.features.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise PerceptualWeightsError(
                f"loss.perceptual_weights='{path}' is not a VGG16 state_dict ({type(exc).__name__}): "
                "save one with torch.save(torchvision.models.vgg16(...).state_dict(), path)"
            ) from None
        self.features = net.features[: _STAGE_ENDS[-1]].eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # the backbone stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y in [-1, 1], 1 or 3 channels; returns the mean distance (scalar)."""
        def prep(img):
            img = (img.float() + 1) / 2
            if img.shape[1] == 1:
                img = img.repeat(1, 3, 1, 1)
            return (img - self.mean) / self.std

        a, b = prep(x), prep(y)
        total = a.new_zeros(())
        start = 0
        for end in _STAGE_ENDS:
            block = self.features[start:end]
            a, b = block(a), block(b)
            start = end
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (na - nb).pow(2).sum(1).mean()
            if min(a.shape[-2:]) < 2:
                break
        return total

