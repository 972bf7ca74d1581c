"""Pixel side of the image modality: the GE's patch embedding and two decoders (`model.decoder_kind`).

- ``patch_tokens`` (the authors' decoder): each latent token becomes one patch token. Latents go
  through d -> U -> width linear maps (U = model.decoder_latent_width, 768 in the authors' code), are
  resampled bilinearly from a sqrt(K) x sqrt(K) grid to the patch grid when K is not the number of
  patches, get a learned class token in front and a fixed 2-D sin-cos table added, then a ViT, a
  LayerNorm and a linear map to patch pixels. At 256x256 / patch 16 its sequence is 257 tokens. K must
  be a square number.
- ``queries`` (this project's): the K latents are projected to the decoder width and joined by one
  learned query token per image patch (fixed 2-D sin-cos positions); after the transformer, the patch
  queries are projected to pixels. Any K works (MNIST's default K=8 is not a square), at the price of a
  sequence of patches + K tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .nn import ViTBlock, sincos_1d, sincos_2d


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in raster order, pixels as (row, column, channel)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int, size: int) -> torch.Tensor:
    B = x.shape[0]
    g = size // p
    x = x.reshape(B, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, size, size)


class PatchEmbed(nn.Module):
    """Image -> patch tokens for the Generative Encoder: (tokens, rope positions 1..N, mask=None).

    A linear map of each patch's pixels (the authors' strided convolution, written as a matrix
    product); no absolute position table: the GE's rotary positions place the patches.
    """

    def __init__(self, channels: int, image_size: int, patch: int, width: int, pos_table: bool = False):
        super().__init__()
        self.patch = patch
        self.grid = image_size // patch
        self.proj = nn.Linear(patch * patch * channels, width)
        if pos_table:  # model.patch_pos_table: a fixed (imported) table, zero unless loaded
            self.register_buffer("pos", torch.zeros(self.grid**2, width), persistent=True)
        else:
            self.pos = None

    def forward(self, images: torch.Tensor):
        tokens = self.proj(patchify(images, self.patch))
        if self.pos is not None:
            tokens = tokens + self.pos.to(tokens.dtype)
        positions = torch.arange(1, tokens.shape[1] + 1, device=images.device)
        return tokens, positions, None


class PatchTokenDecoder(nn.Module):
    """The authors' decoder: one latent token per image patch (see the module docstring)."""

    def __init__(
        self,
        *,
        latent_dim: int,
        latent_tokens: int,
        channels: int,
        image_size: int,
        patch: int,
        depth: int,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        latent_width: int | None = None,
    ):
        super().__init__()
        self.channels, self.image_size, self.patch = channels, image_size, patch
        self.grid = image_size // patch
        self.n_patches = self.grid**2
        side = math.isqrt(latent_tokens)
        if side * side != latent_tokens:
            raise ValueError(
                f"model.decoder_kind=patch_tokens needs a square number of latent tokens, got "
                f"model.latent_tokens={latent_tokens}: use a square K or model.decoder_kind=queries"
            )
        self.latent_grid = side
        hidden = latent_width or width
        self.latent_up = nn.Linear(latent_dim, hidden)
        self.latent_in = nn.Linear(hidden, width)
        self.cls = nn.Parameter(torch.zeros(width))
        pos = torch.cat([torch.zeros(1, width), sincos_2d(self.grid, self.grid, width)])
        self.register_buffer("pos", pos, persistent=True)  # fixed; persistent so imported tables load
        self.blocks = nn.ModuleList([ViTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.head = nn.Linear(width, patch * patch * channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        x = self.latent_in(self.latent_up(z))
        if self.latent_grid != self.grid:
            s, W = self.latent_grid, x.shape[-1]
            grid = x.reshape(B, s, s, W).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
            x = grid.permute(0, 2, 3, 1).reshape(B, self.n_patches, W)
        x = torch.cat([self.cls.to(x.dtype).expand(B, 1, -1), x], dim=1) + self.pos.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm(x[:, 1:]))
        return unpatchify(out, self.patch, self.channels, self.image_size)


class PixelDecoder(nn.Module):
    """The project's query decoder (model.decoder_kind=queries; see the module docstring)."""

    def __init__(
        self,
        *,
        latent_dim: int,
        latent_tokens: int,
        channels: int,
        image_size: int,
        patch: int,
        depth: int,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.channels, self.image_size, self.patch = channels, image_size, patch
        n_patches = (image_size // patch) ** 2
        self.latent_in = nn.Linear(latent_dim, width)
        self.latent_pos = nn.Parameter(sincos_1d(latent_tokens, width).clone())
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.query, std=0.02)
        self.register_buffer("query_pos", sincos_2d(image_size // patch, image_size // patch, width), persistent=False)
        self.blocks = nn.ModuleList([ViTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.head = nn.Linear(width, patch * patch * channels)
        self.n_patches = n_patches

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, K, _ = z.shape
        lat = self.latent_in(z) + self.latent_pos[None, :K]
        q = (self.query + self.query_pos[None]).expand(B, -1, -1).to(lat.dtype)
        x = torch.cat([q, lat], dim=1)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm(x[:, : self.n_patches]))
        return unpatchify(out, self.patch, self.channels, self.image_size)
