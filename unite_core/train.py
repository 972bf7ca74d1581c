"""The training loop as a plain object: usable alone, in tests, and inside Ray Train workers.

Determinism: the data order of step s is a function of (seed, epoch, s) and every random draw of a
step (noise, timesteps, label dropout, augmentation) comes from a generator seeded by (seed, s, rank).
A run resumed from a checkpoint therefore ends with the same weights as an uninterrupted one.

Distributed data parallelism: when torch.distributed is initialised with world_size > 1, each rank
trains on its slice of the global batch and gradients are averaged with one all-reduce per step
(no DDP wrapper: the shared-weight GE is called twice per step and some parameters are unused in
some variants, which DDP's bucketing handles poorly).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from .config import Config, config_from_dict
from .model import UNITE

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "unite-checkpoint-v1"
# settings that must agree between a checkpoint and the params that load it
ARCH_SECTIONS = ("modality", "model")


class TrainingError(RuntimeError):
    """A user-facing training failure; the message names the cause and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or from another configuration."""


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------
def step_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Global sample indices of optimizer step `step`: epoch-wise permutations, last partial dropped."""
    if batch > n:
        raise TrainingError(f"train.batch_size={batch} exceeds the {n} training samples: lower train.batch_size")
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * batch : (pos + 1) * batch]


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 7_919 + step) * 131 + rank)
    return g


def collate(items):
    first = items[0]
    if isinstance(first, dict):
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in first}
    return tuple(torch.stack([torch.as_tensor(it[i]) for it in items]) for i in range(len(first)))


def move(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return tuple(v.to(device, non_blocking=True) for v in batch)


def fetch(dataset, indices: torch.Tensor):
    """A batch from a dataset; tensor-backed datasets index in one go (fast path)."""
    getter = getattr(dataset, "get_batch", None)
    if getter is not None:
        return getter(indices)
    return collate([dataset[int(i)] for i in indices])


# ----------------------------------------------------------------------------------------------
# Optimisers and schedule
# ----------------------------------------------------------------------------------------------
def muon_eligible(name: str, p: torch.Tensor) -> bool:
    """2-D weight matrices inside transformer blocks (GE and decoder) go to Muon."""
    return p.ndim == 2 and ".blocks." in f".{name}"


def build_optimizers(model: torch.nn.Module, cfg: Config) -> list[torch.optim.Optimizer]:
    t = cfg.train
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        return [torch.optim.AdamW([p for _, p in params], lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)]
    muon = [p for n, p in params if muon_eligible(n, p)]
    rest = [p for n, p in params if not muon_eligible(n, p)]
    opts: list[torch.optim.Optimizer] = []
    if muon:
        # update RMS matched to AdamW's, so one learning rate serves both (torch's adjust_lr_fn)
        opts.append(torch.optim.Muon(muon, lr=t.muon_lr or t.lr, weight_decay=t.weight_decay,
                                     adjust_lr_fn="match_rms_adamw"))
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay))
    return opts


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay from 1 to lr_min/lr at the last step."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr_min / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Atomic, fsynced write (unite_core.io): a crash leaves the old file; a full disk is one line."""
    from .io import atomic_torch_save

    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, cfg: Config | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found: train first (`unite train`) or pass the right path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file gets the same message
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a UNITE checkpoint ({type(exc).__name__}): "
            "delete it and resume from an earlier one or retrain"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is not a UNITE checkpoint ({CHECKPOINT_FORMAT})")
    if cfg is not None:
        check_compatible(state, cfg, path)
    return state


def check_compatible(state: dict, cfg: Config, path: str | Path = "checkpoint") -> None:
    saved = state["config"]
    now = cfg.to_dict()
    for section in ARCH_SECTIONS:
        a, b = saved.get(section), now.get(section)
        if isinstance(a, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    raise CheckpointError(
                        f"checkpoint '{path}' was trained with {section}.{key}={a.get(key)!r} but the params say "
                        f"{b.get(key)!r}: use the params it was trained with or another checkpoint"
                    )
        elif a != b:
            raise CheckpointError(
                f"checkpoint '{path}' was trained with {section}={a!r} but the params say {b!r}"
            )


def model_from_checkpoint(state: dict, use_ema: bool = True, device="cpu") -> UNITE:
    """Rebuild the model a checkpoint was trained with (its own saved config) and load weights."""
    cfg = config_from_dict(state["config"])
    model = UNITE(cfg, state["info"])
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    step: int
    metrics: dict[str, float]


@dataclass
class TrainResult:
    step: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    last_checkpoint: Path | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    return torch.device(name)


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


class Trainer:
    def __init__(
        self,
        cfg: Config,
        info: dict,
        train_set,
        device: torch.device | str = "cpu",
        *,
        val_set=None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg = cfg
        self.info = dict(info)
        self.train_set = train_set
        self.val_set = val_set
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        t = cfg.train
        if t.batch_size % (world_size * t.grad_accum):
            raise TrainingError(
                f"train.batch_size={t.batch_size} must be divisible by workers x grad_accum = "
                f"{world_size} x {t.grad_accum}"
            )
        torch.manual_seed(t.seed)  # parameter initialisation is identical on every rank
        self.model = UNITE(cfg, info).to(self.device)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_with_warmup(t.ema_decay), use_buffers=True)
        self.optimizers = build_optimizers(self.model, cfg)
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.step = 0
        self.history: list[dict] = []
        self.autocast_dtype = torch.bfloat16 if t.precision == "bf16" else None

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "info": self.info,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema_weights(),
            "ema_n_averaged": self.ema.n_averaged.clone(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "history": copy.deepcopy(self.history),
        }

    def ema_weights(self) -> dict:
        return {k.removeprefix("module."): v for k, v in self.ema.state_dict().items() if k.startswith("module.")}

    def load_state_dict(self, state: dict) -> None:
        check_compatible(state, self.cfg)
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.ema.n_averaged.copy_(state["ema_n_averaged"])
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.state_dict())

    # ------------------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        f = lr_factor(self.step, self.cfg)
        for o, bases in zip(self.optimizers, self.base_lrs):
            for g, base in zip(o.param_groups, bases):
                g["lr"] = base * f
        return self.cfg.train.lr * f

    def _micro_batches(self) -> Iterator:
        t = self.cfg.train
        idx = step_indices(self.step, len(self.train_set), t.batch_size, t.seed)
        if hasattr(self.train_set, "set_epoch"):  # per-epoch augmentation draws
            self.train_set.set_epoch(self.step // (len(self.train_set) // t.batch_size))
        local = idx[self.rank :: self.world_size]
        for chunk in local.chunk(t.grad_accum):
            yield move(fetch(self.train_set, chunk), self.device)

    def _allreduce_grads(self) -> None:
        if self.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        grads = []
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def train_step(self) -> dict[str, float]:
        t = self.cfg.train
        self.model.train()
        lr = self._set_lr()
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        gen = step_generator(t.seed, self.step, self.rank, self.device)
        # loss.flow_warmup_steps: reconstruction alone for the first steps (keyword only then, so
        # objectives without a flow term need not know it)
        warm = {"with_flow": False} if self.step < self.cfg.loss.flow_warmup_steps else {}
        sums: dict[str, float] = {}
        for batch in self._micro_batches():
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss, metrics = self.model.compute_loss(batch, gen, **warm)
            (loss / t.grad_accum).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / t.grad_accum
        self._allreduce_grads()
        if not math.isfinite(sums["loss"]):
            raise TrainingError(
                f"the loss became {sums['loss']} at step {self.step}: training stopped, the last good checkpoint "
                "is kept; lower train.lr, keep train.grad_clip on, or use train.precision=fp32"
            )
        if t.grad_clip:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
        for o in self.optimizers:
            o.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        sums["lr"] = lr
        return sums

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_items: int = 500, batch_size: int = 250, use_ema: bool = True) -> dict[str, float]:
        """Reconstruction metrics on the validation set (no noise augmentation)."""
        if self.val_set is None:
            return {}
        model = self.ema.module if use_ema else self.model
        model.eval()
        n = min(max_items, len(self.val_set))
        gen = torch.Generator(device=self.device).manual_seed(12345)
        totals: dict[str, float] = {}
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            obs, _ = model.modality.unpack(move(fetch(self.val_set, idx), self.device))
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                decoded = model.reconstruct(obs, gen)
            for k, v in model.modality.recon_metrics(decoded.float(), obs).items():
                totals[k] = totals.get(k, 0.0) + v * len(idx) / n
        return {f"val_{k}": v for k, v in totals.items()}

    def run(
        self,
        until_step: int | None = None,
        *,
        on_log: Callable[[int, dict], None] | None = None,
        on_checkpoint: Callable[[int, bool], None] | None = None,
        checkpoint_path: str | Path | None = None,
        time_limit_s: float | None = None,
    ) -> TrainResult:
        """Train until `until_step` (default: train.steps). Checkpoints every checkpoint_every steps
        and at the end, through `on_checkpoint(step, final)` (Ray) and/or an atomic file write.

        The time limit (`time_limit_s`, else train.time_limit_minutes) is checked after every step,
        by all ranks together (one tiny all-reduce per step when there are several). The step that
        uses it up is logged with a validation pass and checkpointed as final."""
        t = self.cfg.train
        until = until_step or t.steps
        limit = time_limit_s if time_limit_s is not None else (t.time_limit_minutes * 60 if t.time_limit_minutes else None)
        start = time.perf_counter()
        last_ckpt = None
        stopped_early = False
        window_start, window_steps = time.perf_counter(), 0

        def checkpoint(final: bool):
            nonlocal last_ckpt
            if checkpoint_path is not None and self.rank == 0:
                last_ckpt = self.save(checkpoint_path)
            if on_checkpoint is not None:
                on_checkpoint(self.step, final)

        while self.step < until:
            metrics = self.train_step()
            window_steps += 1
            out_of_time = limit is not None and self.step < until and time.perf_counter() - start > limit
            if limit is not None and self.world_size > 1:  # every rank joins, so all stop at one step
                flag = torch.tensor([1.0 if out_of_time else 0.0])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            last = self.step == until or out_of_time
            if self.step % t.log_every == 0 or last:
                now = time.perf_counter()
                metrics["samples_per_s"] = window_steps * t.batch_size / max(now - window_start, 1e-9)
                window_start, window_steps = now, 0
                if self.step % t.eval_every == 0 or last:
                    metrics.update(self.evaluate())
                record = {"step": self.step, "time_s": round(now - start, 3), **metrics}
                self.history.append(record)
                if on_log is not None:
                    on_log(self.step, record)
            if self.step % t.checkpoint_every == 0 or last:
                checkpoint(last)
            if out_of_time:
                stopped_early = True
                log.info("time limit reached at step %d of %d", self.step, until)
                break
        return TrainResult(self.step, self.history, time.perf_counter() - start, stopped_early, last_ckpt)
