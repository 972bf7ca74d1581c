"""Transformer building blocks shared by the Generative Encoder and the decoders.

The block details follow the authors' reference code (docs/FIDELITY.md): affine RMSNorms (eps 1e-6),
biases on qkv/proj/SwiGLU, a SwiGLU hidden width of int(2/3 * mlp_ratio * dim), rotary positions on
interleaved channel pairs, a Gaussian-Fourier timestep embedding with 256 random frequencies, and ViT
decoder blocks with exact GELU and LayerNorm eps 1e-12. Matching them exactly is what lets the
authors' released weights load (unite_core/authors.py).

Attention goes through F.scaled_dot_product_attention (fused kernels on CPU and CUDA). RoPE is
hand-written because it is a few lines and torch has no public module for it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)  # fused kernel needs equal dtypes
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm_affine":
        return nn.LayerNorm(dim, elementwise_affine=True)
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False)
    if kind == "rmsnorm":
        return RMSNorm(dim, affine=True)
    raise ValueError(f"unknown norm '{kind}'")


def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, head_dim/2) for integer positions (N,). Position 0 rotates nothing, so a
    token given position 0 (in-context class tokens, atoms) carries no rotary position."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    ang = positions.float()[:, None] * freqs[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, Dh); rotate interleaved channel pairs (0, 1), (2, 3), ... in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attn_mask: boolean, broadcastable to (B, H, N, N), True where a key may be attended."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        if q.dtype != v.dtype:  # norms may upcast under autocast
            q, k = q.to(v.dtype), k.to(v.dtype)
        # torch's CPU flash kernel is 2.4-4.7x slower than the plain math path in bf16 for these
        # short sequences (benchmarks/attention_cpu.py, 2 cores: 88 tokens, 42 ms vs 17 ms fwd+bwd)
        cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
        with sdpa_kernel(SDPBackend.MATH) if cpu_bf16 else nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of a SwiGLU MLP with the parameter budget of a GELU MLP of ratio mlp_ratio
    (the authors' rule, unrounded: 2048 for width 768, 2730 for 1024)."""
    return int(2 / 3 * int(dim * mlp_ratio))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNBlock(nn.Module):
    """DiT block with adaLN-zero conditioning, SwiGLU MLP, affine RMSNorms, QK-norm, optional block norm."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, block_norm: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.ada = nn.Linear(dim, 6 * dim)
        self.block_norm = RMSNorm(dim) if block_norm else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None, attn_mask=None) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1), rope, attn_mask)
        x = x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))
        return self.block_norm(x)


class ViTBlock(nn.Module):
    """Plain pre-norm ViT block (MAE-decoder style): LayerNorm (eps 1e-12), exact GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-12):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qk_norm=False, bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class GaussianFourierEmbedding(nn.Module):
    """Timestep embedding: sin/cos of t * 2 pi * W for fixed random W ~ N(0, scale^2), then an MLP."""

    def __init__(self, dim: int, num_features: int = 256, scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_features) * scale, persistent=True)
        self.mlp = nn.Sequential(nn.Linear(2 * num_features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        ang = t.float()[:, None] * self.freqs[None, :] * (2.0 * math.pi)
        return self.mlp(torch.cat([ang.sin(), ang.cos()], dim=-1))


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """(n, dim): [sin, cos] of position x 1/10000^(i/(dim/2)), float64 arithmetic."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    ang = pos * omega[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1).float()


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """(h*w, dim) for a raster grid: the first half of the channels encodes the column, the second
    half the row (the layout of the authors' decoder position table)."""
    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")

    def enc(p: torch.Tensor) -> torch.Tensor:
        half = dim // 2
        omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2.0))
        ang = p.reshape(-1, 1).double() * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([enc(gx), enc(gy)], dim=1).float()
