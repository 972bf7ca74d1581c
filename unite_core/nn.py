"""Transformer building blocks shared by the Generative Encoder and the decoders.

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
    """cos/sin tables (N, head_dim/2) for integer positions (N,). Position 0 rotates nothing."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    ang = positions.float()[:, None] * freqs[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, Dh); rotate channel pairs (first half, second half)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True, bias: bool = False):
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
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0, multiple: int = 64) -> int:
    """Hidden width of a SwiGLU MLP with the parameter budget of a GELU MLP of ratio mlp_ratio."""
    h = int(2 * mlp_ratio * dim / 3)
    return max(multiple, (h + multiple - 1) // multiple * multiple) if dim >= multiple else h


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNBlock(nn.Module):
    """DiT block with adaLN-zero conditioning, SwiGLU MLP, RMSNorm, QK-norm, optional block norm."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, block_norm: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim, affine=False)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm2 = RMSNorm(dim, affine=False)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.ada = nn.Linear(dim, 6 * dim)
        self.block_norm = RMSNorm(dim) if block_norm else nn.Identity()
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None, attn_mask=None) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1), rope, attn_mask)
        x = x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))
        return self.block_norm(x)


class ViTBlock(nn.Module):
    """Plain pre-norm ViT block (MAE-decoder style)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=False, bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class GaussianFourierEmbedding(nn.Module):
    """Timestep embedding: fixed random Fourier features of t followed by an MLP."""

    def __init__(self, dim: int, num_features: int = 256, scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_features // 2) * scale * 2 * math.pi, persistent=True)
        self.mlp = nn.Sequential(nn.Linear(num_features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        ang = t.float()[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([ang.cos(), ang.sin()], dim=-1))


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    ang = pos * omega[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    half = dim // 2
    def enc(p):
        omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float32) / max(1, half // 2))
        ang = p.reshape(-1, 1).float() * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)
    return torch.cat([enc(gy), enc(gx)], dim=1)
