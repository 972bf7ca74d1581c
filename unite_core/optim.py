"""Optimisers, learning-rate schedule and EMA of every training run (the authors' recipe; see
docs/FIDELITY.md): Muon for the 2-D weight matrices, AdamW for the rest, the lr scaled with the global
batch, a cosine or the authors' two-phase schedule, and an EMA of the weights.

`BatchedMuon` is torch.optim.Muon with the Newton-Schulz iterations of same-shape matrices run as one
batched matrix product (a GE block has five weight matrices; 12 blocks give groups of 12 equal shapes).
Hand-written because torch's Muon orthogonalises one matrix at a time; the state (momentum_buffer) and
the update rule are torch's, so checkpoints move between the two.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import Config


# Parameters that stay with AdamW although they are 2-D: the observation embedding (patches, atoms),
# the GE's output layer and the learned position tables (the authors' rule: Muon for every 2-D weight
# except patch_embed, final_layer, in_context_posemb and latent_tokens).
_ADAMW_MODULES = {"embed", "out_proj", "out_ada"}
_ADAMW_TABLES = {"latent_pos", "in_context_pos", "query", "slot_query"}


def muon_eligible(name: str, p: torch.Tensor) -> bool:
    """Muon takes 2-D weight matrices: the transformer blocks, the latent maps, the timestep MLP, the
    label table, the decoder's maps; not the ones listed above."""
    parts = name.split(".")
    return p.ndim == 2 and not (_ADAMW_MODULES & set(parts[:-1])) and parts[-1] not in _ADAMW_TABLES


def lr_scale(cfg: Config) -> float:
    """The authors' linear batch scaling: max(1, global batch / train.lr_batch_base)."""
    t = cfg.train
    return 1.0 if t.lr_batch_base is None else max(1.0, t.batch_size / t.lr_batch_base)


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iterations run batched over same-shape matrices."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            mu = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = [g.lerp(b, mu) for g, b in zip(grads, bufs)] if group["nesterov"] else bufs
            by_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, u in enumerate(updates):
                by_shape[(tuple(u.shape), u.device)].append(i)
            lr, wd = group["lr"], group["weight_decay"]
            for (shape, _), idx in by_shape.items():
                ortho = newton_schulz_batched(torch.stack([updates[i] for i in idx]), group["ns_coefficients"],
                                              group["ns_steps"], group["eps"])
                scale = _adjusted_lr(lr, group["adjust_lr_fn"], shape)
                ps = [params[i] for i in idx]
                if wd:
                    torch._foreach_mul_(ps, 1 - lr * wd)
                torch._foreach_add_(ps, list(ortho.unbind(0)), alpha=-scale)
        return loss


def newton_schulz_batched(g: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of torch.optim.Muon, for a stack (n, rows, cols)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.mT
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]
    for _ in range(steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.mT if tall else x


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple) -> float:
    """torch.optim.Muon's update scaling for a (rows, cols) matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return lr * math.sqrt(rows / cols)
    return lr


def build_optimizers(model: torch.nn.Module, cfg: Config) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] (or [AdamW] with train.optimizer=adamw); lrs are the peak (batch-scaled) values."""
    t = cfg.train
    scale = lr_scale(cfg)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    device = next(model.parameters()).device
    # fused AdamW kernels on CUDA and CPU (one kernel for all parameters)
    adamw = dict(lr=t.lr * scale, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                 fused=device.type in ("cuda", "cpu"))
    if t.optimizer == "adamw":
        return [torch.optim.AdamW([p for _, p in params], **adamw)]
    muon = [p for n, p in params if muon_eligible(n, p)]
    rest = [p for n, p in params if not muon_eligible(n, p)]
    opts: list[torch.optim.Optimizer] = []
    if muon:
        # update RMS matched to AdamW's, so one learning rate serves both (torch's adjust_lr_fn)
        muon_cls = BatchedMuon if t.muon_batched else torch.optim.Muon
        opts.append(muon_cls(muon, lr=(t.muon_lr or t.lr) * scale, weight_decay=t.weight_decay,
                             momentum=t.muon_momentum, eps=t.eps, adjust_lr_fn="match_rms_adamw"))
    if rest:
        opts.append(torch.optim.AdamW(rest, **adamw))
    return opts


def _cosine_between(step: int, s0: int, s1: int, start: float, end: float) -> float:
    if s1 <= s0:
        return end
    progress = min(1.0, max(0.0, (step - s0) / (s1 - s0)))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(step: int, cfg: Config) -> float:
    """The lr of `step` as a fraction of the peak lr.

    cosine: linear warmup ((step + 1) / warmup), then cosine decay to lr_min/lr at the last step.
    two_phase (the authors'): warmup step / warmup, hold, cosine to lr2, hold, cosine to lr_min."""
    t = cfg.train
    floor = t.lr_min / t.lr
    if t.schedule == "two_phase":
        p = t.two_phase
        mid = (p.lr2 or t.lr) / t.lr
        if t.warmup_steps and step < t.warmup_steps:
            return step / t.warmup_steps
        if step < p.hold_until:
            return 1.0
        if step < p.decay_until:
            return _cosine_between(step, p.hold_until, p.decay_until, 1.0, mid)
        if step < p.hold2_until:
            return mid
        if step < p.decay2_until:
            return _cosine_between(step, p.hold2_until, p.decay2_until, mid, floor)
        return floor if p.decay2_until > p.hold2_until else mid
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    return _cosine_between(step, t.warmup_steps, max(t.warmup_steps + 1, t.steps), 1.0, floor)


def ema_init_weight(decay: float, steps: int, warmup: bool) -> float:
    """The weight an EMA still gives the initial parameters after `steps` updates (with or without the
    warm-up of :func:`ema_with_warmup`): decay**steps without it, the product of the ramped decays with it."""
    if not warmup:
        return float(decay) ** int(steps)
    n = np.arange(int(steps), dtype=np.float64)
    return float(np.prod(np.minimum(float(decay), (1.0 + n) / (10.0 + n))))


def ema_with_warmup(decay: float):
    """EMA update for AveragedModel whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    torch's get_ema_multi_avg_fn uses the full decay from the first step, so the average keeps
    decay**steps of the random initial weights: 33% after 1,100 steps at 0.999, which made every
    short run's EMA model (the one evaluated and sampled) mostly noise. The warm-up makes the
    average follow the weights early on and reach the configured decay after ~10 / (1 - decay) steps.
    """

    @torch.no_grad()
    def update(ema_params, model_params, num_averaged):
        # AveragedModel calls this once per (device, dtype) group, so a group is all float or none
        if ema_params[0].is_floating_point():
            n = float(num_averaged)
            torch._foreach_lerp_(ema_params, model_params, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
        else:
            torch._foreach_copy_(ema_params, model_params)

    return update


def make_ema(model: torch.nn.Module, cfg: Config) -> AveragedModel:
    """The EMA of every training run (UNITE, its ablations, both stages of the two-stage baseline):
    train.ema_decay, with the warm-up above unless train.ema_warmup is false (then the authors' plain
    EMA, the full decay from the first step)."""
    t = cfg.train
    avg = ema_with_warmup(t.ema_decay) if t.ema_warmup else get_ema_multi_avg_fn(t.ema_decay)
    return AveragedModel(model, multi_avg_fn=avg, use_buffers=True)
