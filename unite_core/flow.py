"""Flow matching in latent space: path, timesteps, velocity loss, and ODE sampling with guidance.

Convention (the paper's): t = 0 is pure noise, t = 1 is clean. z_t = t * z0 + (1 - t) * eps.
The GE predicts the clean latent (x-prediction); its velocity is v = (x_hat - z_t) / max(1 - t, c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torchdiffeq import odeint


def shift_timesteps(t: torch.Tensor, shift: float | None) -> torch.Tensor:
    """t' = a t / (1 + (a - 1) t). a < 1 moves mass towards the noise end (t = 0)."""
    if shift is None or shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int, *, mu: float = 0.0, sigma: float = 1.0, shift: float | None = 0.5,
    device=None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logit-normal timesteps, then shifted."""
    t = torch.sigmoid(mu + sigma * torch.randn(n, device=device, generator=generator))
    return shift_timesteps(t, shift)


def interpolate(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.view(-1, *([1] * (z0.dim() - 1)))
    return tt * z0 + (1 - tt) * eps


def x_to_velocity(x_hat: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, clamp: float = 0.05) -> torch.Tensor:
    denom = (1 - t).clamp_min(clamp).view(-1, *([1] * (z_t.dim() - 1)))
    return (x_hat - z_t) / denom


def flow_loss(
    x_hat: torch.Tensor, z0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
    clamp: float = 0.05, space: str = "velocity",
) -> torch.Tensor:
    """MSE between predicted and true velocity (or between x_hat and z0 when space == 'x')."""
    if space == "x":
        return (x_hat.float() - z0.float()).pow(2).mean()
    v_hat = x_to_velocity(x_hat.float(), z_t.float(), t, clamp)
    v = x_to_velocity(z0.float(), z_t.float(), t, clamp)
    return (v_hat - v).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
@dataclass
class GuidanceConfig:
    scale: float = 1.0
    interval: tuple[float, float] = (0.1, 1.0)
    norm_first: bool = True


def guided_prediction(
    raw_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    norm_fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    null_class: int,
    guidance: GuidanceConfig,
) -> torch.Tensor:
    """Clean-latent prediction with classifier-free guidance.

    raw_fn returns the GE output before the final latent norm. Inside the interval (lo <= t <= hi)
    and when scale != 1, cond and uncond run as one batch; "norm first" normalises each before the
    combination, otherwise the combination is normalised. Outside it, the conditional prediction.
    """
    lo, hi = guidance.interval
    active = (t >= lo) & (t <= hi)
    if guidance.scale == 1.0 or not bool(active.any()):
        return norm_fn(raw_fn(z, t, y))
    B = z.shape[0]
    raw = raw_fn(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    rc, ru = raw[:B], raw[B:]
    if guidance.norm_first:
        xc, xu = norm_fn(rc), norm_fn(ru)
        guided = xu + guidance.scale * (xc - xu)
    else:
        xc = norm_fn(rc)
        guided = norm_fn(ru + guidance.scale * (rc - ru))
    sel = active.view(-1, *([1] * (z.dim() - 1)))
    return torch.where(sel, guided, xc)


def integrate(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z_init: torch.Tensor,
    *,
    solver: str = "heun",
    steps: int = 50,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> tuple[torch.Tensor, int]:
    """Integrate dz/dt = velocity(t, z) from t = 0 to 1 with torchdiffeq. Returns (z1, evaluations).

    velocity receives a scalar t tensor. 'heun' is torchdiffeq's fixed-grid 'heun2'.
    """
    count = {"n": 0}

    def f(t, z):
        count["n"] += 1
        return velocity(t, z)

    t_span = torch.tensor([0.0, 1.0], dtype=torch.float32, device=z_init.device)
    if solver == "dopri5":
        out = odeint(f, z_init, t_span, method="dopri5", rtol=rtol, atol=atol)
    else:
        method = {"euler": "euler", "heun": "heun2"}[solver]
        grid = torch.linspace(0.0, 1.0, steps + 1, device=z_init.device)
        out = odeint(f, z_init, grid, method=method)
    return out[-1], count["n"]
