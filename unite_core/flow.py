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
    """Classifier-free guidance.

    interval: guidance acts for t inside it; `open_interval` excludes both ends, except that a low end
    of 0 includes t = 0 (the authors' test), otherwise both ends are included.
    norm_first: apply the final latent norm to the conditional and unconditional predictions before
    combining them (else: normalise the combination).
    norm_unguided: normalise the prediction when no guidance is used at all (scale <= 1). The
    authors' sampler returns the raw GE output then.
    """

    scale: float = 1.0
    interval: tuple[float, float] = (0.1, 1.0)
    norm_first: bool = True
    open_interval: bool = False
    norm_unguided: bool = True

    def active(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self.interval
        if self.open_interval:
            return (t < hi) & ((t > lo) | (lo == 0.0))
        return (t >= lo) & (t <= hi)


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

    raw_fn returns the GE output before the final latent norm. With scale > 1, cond and uncond run as
    one batch at every t and guidance applies inside the interval; outside it, the conditional
    prediction. With scale <= 1, one conditional pass.
    """
    if guidance.scale <= 1.0:
        raw = raw_fn(z, t, y)
        return norm_fn(raw) if guidance.norm_unguided else raw.float()
    B = z.shape[0]
    raw = raw_fn(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    rc, ru = raw[:B], raw[B:]
    if guidance.norm_first:
        xc, xu = norm_fn(rc), norm_fn(ru)
        guided = xu + guidance.scale * (xc - xu)
    else:
        xc = norm_fn(rc)
        guided = norm_fn(ru + guidance.scale * (rc - ru))
    sel = guidance.active(t).view(-1, *([1] * (z.dim() - 1)))
    return torch.where(sel, guided, xc)


def time_grid(steps: int, shift: float | None = None, device=None) -> torch.Tensor:
    """steps + 1 times from 0 to 1, uniform, then shifted like the training timesteps (shift a < 1
    puts more of them near the noise end, where the authors' sampler spends its steps)."""
    return shift_timesteps(torch.linspace(0.0, 1.0, steps + 1, device=device), shift)


def integrate(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z_init: torch.Tensor,
    *,
    solver: str = "heun",
    steps: int = 50,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    grid_shift: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Integrate dz/dt = velocity(t, z) from t = 0 to 1 with torchdiffeq. Returns (z1, evaluations).

    velocity receives a scalar t tensor. 'heun' is torchdiffeq's fixed-grid 'heun2'. The fixed-step
    solvers step on `time_grid(steps, grid_shift)`; dopri5 chooses its own steps and reports the
    solution on that grid (only the end point is used).
    """
    count = {"n": 0}

    def f(t, z):
        count["n"] += 1
        return velocity(t, z)

    grid = time_grid(steps, grid_shift, device=z_init.device)
    if solver == "dopri5":
        out = odeint(f, z_init, grid, method="dopri5", rtol=rtol, atol=atol)
    else:
        method = {"euler": "euler", "heun": "heun2"}[solver]
        out = odeint(f, z_init, grid, method=method)
    return out[-1], count["n"]
