"""Images as a UNITE modality: patch embedding in, pixel decoder out, L1/MSE (+ perceptual) loss."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from ..config import Config
from ..decoder import PatchEmbed, PatchTokenDecoder, PixelDecoder
from ..perceptual import PerceptualLoss


class ImageModality:
    """Images: patch embedding in, pixel decoder out (`model.decoder_kind`), L1/MSE (+ perceptual) loss.

    Datasets hold images in [-1, 1]. The model sees them in `model.pixel_range`: "unit" ([0, 1], the
    authors'), or "signed" ([-1, 1]). `unpack` converts a batch into the model's range; the model's
    tokenize/decode/reconstruct work in that range, and `postprocess` returns [0, 1] images.
    """

    name = "images"

    def __init__(self, cfg: Config, info: dict):
        self.cfg = cfg
        self.channels = int(info["channels"])
        self.image_size = int(info["image_size"])
        self.patch = cfg.model.patch_size
        self.unit_range = cfg.model.pixel_range == "unit"
        if self.image_size % self.patch:
            raise ValueError(f"model.patch_size={self.patch} must divide the image size {self.image_size}")

    @cached_property
    def perceptual(self) -> PerceptualLoss | None:
        """The perceptual loss (loss.w_perc > 0), loaded from loss.perceptual_weights on first use, so
        that sampling and evaluation never need its weights file."""
        if self.cfg.loss.w_perc > 0:
            return PerceptualLoss(self.cfg.loss.perceptual_weights, unit_range=self.unit_range)
        return None

    def make_embed(self, width: int) -> nn.Module:
        return PatchEmbed(self.channels, self.image_size, self.patch, width, pos_table=self.cfg.model.patch_pos_table)

    def make_decoder(self) -> nn.Module:
        m = self.cfg.model
        depth, width, heads = m.decoder_dims()
        common = dict(
            latent_dim=m.latent_dim, latent_tokens=m.latent_tokens, channels=self.channels,
            image_size=self.image_size, patch=self.patch, depth=depth, width=width, heads=heads,
            mlp_ratio=m.decoder_mlp_ratio,
        )
        if m.decoder_kind == "patch_tokens":
            return PatchTokenDecoder(**common, latent_width=m.decoder_latent_width)
        return PixelDecoder(**common)

    # -- value ranges ----------------------------------------------------------------------------
    def from_data(self, x: torch.Tensor) -> torch.Tensor:
        """Dataset range [-1, 1] -> the model's range."""
        return (x + 1) * 0.5 if self.unit_range else x

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> the model's range."""
        return x if self.unit_range else x * 2 - 1

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """The model's range -> [0, 1], clamped."""
        x = x.float()
        return x.clamp(0, 1) if self.unit_range else ((x.clamp(-1, 1) + 1) * 0.5)

    def unpack(self, batch):
        x, y = batch
        return self.from_data(x), y

    def augment(self, obs, generator=None):
        """No training augmentation for images (flips are part of the data order)."""
        return obs

    def batch_size(self, obs) -> int:
        return obs.shape[0]

    def recon_loss(self, decoded, obs):
        """Pixel loss in the model's range (`loss.recon`), plus `loss.w_perc` x perceptual."""
        err = decoded.float() - obs.float()
        kind = self.cfg.loss.recon
        metrics: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=err.device)
        if kind in ("l1", "l1_mse"):
            l1 = err.abs().mean()
            metrics["l1"] = l1.detach()
            loss = loss + l1
        if kind in ("mse", "l1_mse"):
            mse = err.pow(2).mean()
            metrics["mse"] = mse.detach()
            loss = loss + mse
        if self.perceptual is not None:
            perc = self.perceptual.to(obs.device)(decoded, obs)
            metrics["perceptual"] = perc.detach()
            loss = loss + self.cfg.loss.w_perc * perc
        return loss, metrics

    def recon_metrics(self, decoded, obs) -> dict[str, float]:
        a = self.to_unit(decoded).flatten(1)
        b = self.to_unit(obs).flatten(1)
        mse = (a - b).pow(2).mean(1).clamp_min(1e-10)
        return {"psnr": float((10 * torch.log10(1.0 / mse)).mean())}

    def postprocess(self, decoded, **_):
        return self.to_unit(decoded).cpu()
