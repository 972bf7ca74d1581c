"""The Generative Encoder (GE): one transformer, two modes on the same weights.

- tokenize(obs): observed tokens (image patches, atoms, ...) + K register tokens initialised as noise,
  timestep near the noise end, null class -> K latent tokens z0 (after the final latent norm).
- denoise(z_t, t, y): noisy latents alone, conditioned on t and class -> predicted clean latents.

The GE is modality-agnostic: it consumes token sequences. A modality supplies an `embed` module that
turns its observations into (tokens, rope positions, validity mask); the GE never looks inside.

Rotary positions are sequence indices, as in the authors' code: latents 0..K-1, observed tokens
K..K+N-1 in the order their embed module returns them. Position 0 means "no rotation": an embed module
returns 0 for tokens that must carry no position (molecules: atoms stay permutation-equivariant), and
the in-context class tokens (joined from block `in_context_start` on) carry none either.

Initialisation (the authors'): Xavier-uniform on every Linear of the GE (zero biases), except the
timestep MLP (normal, std 0.02), the adaLN projections (zero) and the output projection
(`model.latent_out_init`: zero as in the authors' code, or Xavier, see below); the modality's
observation embedding keeps its own initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
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
        register_pos_scale: float = 1.0,
        latent_out_init: str = "zero",
    ):
        super().__init__()
        self.depth, self.width, self.heads = depth, width, heads
        self.latent_tokens, self.latent_dim = latent_tokens, latent_dim
        self.num_classes = num_classes
        self.null_class = num_classes  # index of the dropped / unconditional label
        self.label_dropout = label_dropout
        self.tokenize_t_max = tokenize_t_max
        self.use_rope = rope

        self.latent_in = nn.Linear(latent_dim, width)
        # register positions: learned, initialised as 1-D sin-cos (x register_pos_scale; 1 = the authors')
        self.latent_pos = nn.Parameter(sincos_1d(latent_tokens, width) * register_pos_scale)
        self.t_embed = GaussianFourierEmbedding(width, scale=fourier_scale)
        self.y_embed = nn.Embedding(num_classes + 1, width)
        self.in_context_tokens = in_context_tokens if in_context_start < depth else 0
        self.in_context_start = in_context_start
        if self.in_context_tokens:
            self.in_context_pos = nn.Parameter(torch.zeros(self.in_context_tokens, width))
        self.blocks = nn.ModuleList(
            [AdaLNBlock(width, heads, qk_norm=qk_norm, block_norm=block_norm) for _ in range(depth)]
        )
        self.out_norm = RMSNorm(width)
        self.out_ada = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, latent_dim)
        self.final_norm = make_norm(final_norm, latent_dim)
        self._init_weights(latent_out_init)
        self.embed = embed  # modality adapter: obs -> (tokens, positions, mask); keeps its own init

    def _init_weights(self, latent_out_init: str) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        if self.in_context_tokens:
            nn.init.normal_(self.in_context_pos, std=0.02)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        nn.init.zeros_(self.out_ada.weight)
        nn.init.zeros_(self.out_ada.bias)
        if latent_out_init == "zero":
            # The authors' choice. The final latent LayerNorm then sees all-zero raw latents at
            # step 0, and every image starts from the same latent; on small data this can settle
            # into a collapsed tokenizer (see model.latent_out_init in docs/FIDELITY.md).
            nn.init.zeros_(self.out_proj.weight)
        elif latent_out_init != "xavier":
            raise ValueError(f"latent_out_init={latent_out_init!r}: use 'zero' or 'xavier'")
        nn.init.zeros_(self.out_proj.bias)

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
        checkpoint: bool = False,
    ) -> GEOutput:
        """z: (B, K, d) registers (noise or z_t); t: (B,); y: (B,) long. Returns pre-norm latents.

        checkpoint: recompute each block's activations in the backward pass instead of keeping them
        (train.checkpoint_denoiser: the M noisings' activations dominate memory at scale)."""
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
            # an embed module's position p > 0 is the token's place after the K latents
            pos.append(torch.where(obs_pos > 0, obs_pos + K - 1, torch.zeros_like(obs_pos)))
            if obs_mask is not None:
                mask = torch.cat([torch.ones(B, K, dtype=torch.bool, device=z.device), obs_mask.bool()], dim=1)
        positions = torch.cat(pos)
        head_dim = self.width // self.heads
        rope_main = rope_tables(positions, head_dim) if self.use_rope else None
        rope_ctx = None
        if C and self.use_rope:  # in-context class tokens: position 0, no rotation
            rope_ctx = rope_tables(torch.cat([positions, positions.new_zeros(C)]), head_dim)
        hidden = [] if return_hidden else None
        for i, block in enumerate(self.blocks):
            if C and i == self.in_context_start:
                ctx = self.y_embed(y)[:, None, :] + self.in_context_pos[None]
                x = torch.cat([x, ctx.to(x.dtype)], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool, device=z.device)], dim=1)
            rope = rope_ctx if (C and i >= self.in_context_start) else rope_main
            block_mask = None if mask is None else mask[:, None, None, :]
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, c, rope, block_mask, use_reentrant=False)
            else:
                x = block(x, c, rope, block_mask)
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
        self, obs, generator: torch.Generator | None = None, return_hidden: bool = False, *,
        noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Observations -> z0 (B, K, d). The register noise (B, K, d) and the timestep (B,) are drawn
        from `generator` unless given (given, two implementations can be compared exactly)."""
        if self.embed is None:
            raise RuntimeError("this Generative Encoder has no observation embedding (denoiser only)")
        tokens, pos, mask = self.embed(obs)
        B = tokens.shape[0]
        dev = tokens.device
        if noise is None:
            noise = torch.randn(B, self.latent_tokens, self.latent_dim, device=dev, generator=generator)
        if t is None:
            t = torch.rand(B, device=dev, generator=generator) * self.tokenize_t_max
        y = torch.full((B,), self.null_class, dtype=torch.long, device=dev)
        out = self(noise, t, y, tokens, pos, mask, return_hidden=return_hidden)
        return self.normalize(out.raw), out.hidden

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_hidden: bool = False):
        out = self(z_t, t, y, return_hidden=return_hidden)
        return self.normalize(out.raw), out.hidden
