"""Decoders: latent tokens (B, K, d) back to observations.

PixelDecoder is a plain ViT in the MAE-decoder style: the K latents are projected to the decoder
width and joined by one learned query token per image patch (with fixed 2-D sin-cos positions); after
the transformer, the patch queries are projected to pixels and unpatchified. Any K works, whether or
not it equals the number of patches.
"""

from __future__ import annotations

import torch
from torch import nn

from .nn import ViTBlock, sincos_1d, sincos_2d


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int, size: int) -> torch.Tensor:
    B = x.shape[0]
    g = size // p
    x = x.reshape(B, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, size, size)


class PatchEmbed(nn.Module):
    """Image -> patch tokens for the Generative Encoder: (tokens, rope positions, mask=None).

    Patches get 2-D sin-cos absolute positions added, and rotary positions 1..N in raster order.
    """

    def __init__(self, channels: int, image_size: int, patch: int, width: int):
        super().__init__()
        self.patch = patch
        self.grid = image_size // patch
        self.proj = nn.Linear(patch * patch * channels, width)
        self.register_buffer("pos", sincos_2d(self.grid, self.grid, width), persistent=False)

    def forward(self, images: torch.Tensor):
        tokens = self.proj(patchify(images, self.patch)) + self.pos.to(images.dtype)
        positions = torch.arange(1, tokens.shape[1] + 1, device=images.device)
        return tokens, positions, None


class PixelDecoder(nn.Module):
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
        self.norm = nn.LayerNorm(width)
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
