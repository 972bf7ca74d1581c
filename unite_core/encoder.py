"""The Generative Encoder (GE): one transformer, two modes on the same weights.

- tokenize(obs): observed tokens (image patches, atoms, ...) + K register tokens initialised as noise,
  timestep near the noise end, null class -> K latent tokens z0 (after the final latent norm).
- denoise(z_t, t, y): noisy latents alone, conditioned on t and class -> predicted clean latents.

The GE is modality-agnostic: it consumes token sequences. A modality supplies an `embed` module that
turns its observations into (tokens, rope positions, validity mask); the GE never looks inside.

Rotary positions: latents 0..K-1, in-context class tokens K..K+C-1, observed tokens use the
positions their embed module returns (offset past those), where position 0 means "no rotation"
(molecules pass zeros so that atoms stay permutation-equivariant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .nn import AdaLNBlock, GaussianFourierEmbedding, RMSNorm, make_norm, modulate, rope_tables, sincos_1d


@dataclass
class GEOutput:
    raw: torch.Tensor  # (B, K, d) before the final latent norm
    hidden: list[torch.Tensor] | None = None  # per-block latent-token activations (B, K, D)


class GenerativeEncoder(nn.Module):
    def __init__(
        self,
        *,
        depth: int,
        width: int,
        heads: int,
        latent_tokens: int,
        latent_dim: int,
        num_classes: int,
        embed: nn.Module | None,
        in_context_tokens: int = 32,
        in_context_start: int = 4,
        final_norm: str = "layernorm_affine",
        block_norm: bool = True,
        qk_norm: bool = True,
        rope: bool = True,
        label_dropout: float = 0.1,
        fourier_scale: float = 1.0,
        tokenize_t_max: float = 0.01,
    ):
        super().__init__()
        self.depth, self.width, self.heads = depth, width, heads
        self.latent_tokens, self.latent_dim = latent_tokens, latent_dim
        self.num_classes = num_classes
        self.null_class = num_classes  # index of the dropped / unconditional label
        self.label_dropout = label_dropout
        self.tokenize_t_max = tokenize_t_max
        self.use_rope = rope
        self.embed = embed  # modality adapter: obs -> (tokens, positions, mask)

        self.latent_in = nn.Linear(latent_dim, width)
        self.latent_pos = nn.Parameter(sincos_1d(latent_tokens, width) * 0.02 / 0.7)
        self.t_embed = GaussianFourierEmbedding(width, scale=fourier_scale)
        self.y_embed = nn.Embedding(num_classes + 1, width)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        self.in_context_tokens = in_context_tokens if in_context_start < depth else 0
        self.in_context_start = in_context_start
        if self.in_context_tokens:
            self.in_context_pos = nn.Parameter(torch.randn(self.in_context_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(
            [AdaLNBlock(width, heads, qk_norm=qk_norm, block_norm=block_norm) for _ in range(depth)]
        )
        self.out_norm = RMSNorm(width, affine=False)
        self.out_ada = nn.Linear(width, 2 * width)
        nn.init.zeros_(self.out_ada.weight)
        nn.init.zeros_(self.out_ada.bias)
        self.out_proj = nn.Linear(width, latent_dim)
        # Unit-scale raw latents at init (not DiT's tiny final layer): the final latent LayerNorm
        # rescales whatever comes out, so with a 0.02-std projection the per-image part of the raw
        # latent is tiny and the first few optimiser steps on the biases turn it into a constant
        # (every image gets the same latent; measured: latent spread 0.6 -> 1e-4 in 100 steps and a
        # mean-image plateau for ~400 steps on digits). Xavier keeps the image signal O(1).
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.final_norm = make_norm(final_norm, latent_dim)

    # ------------------------------------------------------------------------------------------
    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embed(t) + self.y_embed(y)

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training or self.label_dropout <= 0:
            return y
        drop = torch.rand(y.shape, device=y.device, generator=generator) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        obs_tokens: torch.Tensor | None = None,
        obs_pos: torch.Tensor | None = None,
        obs_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> GEOutput:
        """z: (B, K, d) registers (noise or z_t); t: (B,); y: (B,) long. Returns pre-norm latents."""
        B, K, _ = z.shape
        c = self.condition(t, y)
        x = self.latent_in(z) + self.latent_pos[None, :K]
        pos = [torch.arange(K, device=z.device)]
        C = self.in_context_tokens
        mask = None
        if obs_tokens is not None:
            N = obs_tokens.shape[1]
            x = torch.cat([x, obs_tokens.to(x.dtype)], dim=1)
            if obs_pos is None:
                obs_pos = torch.zeros(N, dtype=torch.long, device=z.device)
            pos.append(torch.where(obs_pos > 0, obs_pos + K + C, torch.zeros_like(obs_pos)))
            if obs_mask is not None:
                mask = torch.cat([torch.ones(B, K, dtype=torch.bool, device=z.device), obs_mask.bool()], dim=1)
        positions = torch.cat(pos)
        rope_main = rope_tables(positions, self.width // self.heads) if self.use_rope else None
        rope_ctx = None
        if C and self.use_rope:
            ctx_pos = torch.arange(K, K + C, device=z.device)
            rope_ctx = rope_tables(torch.cat([positions, ctx_pos]), self.width // self.heads)
        hidden = [] if return_hidden else None
        for i, block in enumerate(self.blocks):
            if C and i == self.in_context_start:
                ctx = self.y_embed(y)[:, None, :] + self.in_context_pos[None]
                x = torch.cat([x, ctx.to(x.dtype)], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool, device=z.device)], dim=1)
            rope = rope_ctx if (C and i >= self.in_context_start) else rope_main
            x = block(x, c, rope, None if mask is None else mask[:, None, None, :])
            if hidden is not None:
                hidden.append(x[:, :K])
        h = x[:, :K]
        shift, scale = self.out_ada(F.silu(c)).chunk(2, dim=-1)
        raw = self.out_proj(modulate(self.out_norm(h), shift, scale))
        return GEOutput(raw=raw, hidden=hidden)

    # ------------------------------------------------------------------------------------------
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """The final latent norm, applied to every latent the GE emits (computed in fp32)."""
        return self.final_norm(raw.float())

    def tokenize(
        self, obs, generator: torch.Generator | None = None, return_hidden: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        if self.embed is None:
            raise RuntimeError("this Generative Encoder has no observation embedding (denoiser only)")
        tokens, pos, mask = self.embed(obs)
        B = tokens.shape[0]
        dev = tokens.device
        noise = torch.randn(B, self.latent_tokens, self.latent_dim, device=dev, generator=generator)
        t = torch.rand(B, device=dev, generator=generator) * self.tokenize_t_max
        y = torch.full((B,), self.null_class, dtype=torch.long, device=dev)
        out = self(noise, t, y, tokens, pos, mask, return_hidden=return_hidden)
        return self.normalize(out.raw), out.hidden

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_hidden: bool = False):
        out = self(z_t, t, y, return_hidden=return_hidden)
        return self.normalize(out.raw), out.hidden
