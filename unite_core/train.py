"""The training loop as a plain object: usable alone, in tests, and inside Ray Train workers.

Determinism: the data order of step s is a function of (seed, epoch, s) and every random draw of a
step (noise, timesteps, label dropout, augmentation) comes from a generator seeded by (seed, s, rank).
A run resumed from a checkpoint therefore ends with the same weights as an uninterrupted one.

Distributed data parallelism: when torch.distributed is initialised with world_size > 1, each rank
trains on its slice of the global batch inside torch's DistributedDataParallel (bucketed gradient
all-reduce overlapping the backward pass; with gradient accumulation, one all-reduce per step). Every
other collective (the non-finite-loss agreement, the time-limit flag) runs on the training device, so
NCCL groups work. A non-finite loss on any rank stops all ranks before any optimizer step.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .config import Config, config_from_dict
from .devices import autocast, autocast_dtype_for
from .io import atomic_torch_save
from .nn import AdaLNBlock, ViTBlock
from .optim import build_optimizers, ema_init_weight, ema_with_warmup, lr_factor, lr_scale, make_ema, muon_eligible  # noqa: F401
from .data.loader import StepBatches, collate, fetch, loader_workers, move, step_indices  # noqa: F401
from .model import UNITE

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "unite-checkpoint-v2"
# settings that must agree between a checkpoint and the params that load it
ARCH_SECTIONS = ("modality", "model")


class TrainingError(RuntimeError):
    """A user-facing training failure; the message names the cause and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or from another configuration."""


# ----------------------------------------------------------------------------------------------
# Data order and delivery: unite_core.data.loader (re-exported here for the callers that import them)
# ----------------------------------------------------------------------------------------------
def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 7_919 + step) * 131 + rank)
    return g


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Atomic, fsynced write (unite_core.io): a crash leaves the old file; a full disk is one line."""
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
    if isinstance(state, dict) and state.get("format") == "unite-checkpoint-v1":
        raise CheckpointError(
            f"checkpoint '{path}' was written by an older version of unite whose model differs from the "
            "authors' architecture (format v1): retrain it with this version"
        )
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' is not a UNITE checkpoint ({CHECKPOINT_FORMAT}); an authors' checkpoint "
            "is converted with `unite import-checkpoint FILE`"
        )
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


def warn_if_ema_is_young(state: dict, use_ema: bool, path) -> bool:
    """Warn (True) when the EMA weights still hold more than 1/e of the initialisation (without the warm-up:
    fewer steps than the horizon 1/(1 - decay); with it, a few dozen steps)."""
    try:
        t = state["config"]["train"]
        decay, step, warmup = float(t["ema_decay"]), int(state.get("step", 0)), bool(t.get("ema_warmup", False))
    except (KeyError, TypeError, ValueError):
        return False
    init = ema_init_weight(decay, step, warmup)
    if use_ema and state.get("ema") is not None and init > math.exp(-1.0):
        log.warning("%s: the EMA (decay %g%s) still holds %.0f%% of the initial weights after %d steps, so they "
                    "are close to the initialisation; evaluate the raw weights with sample.use_ema=false",
                    path, decay, ", warm-up" if warmup else "", 100 * init, step)
        return True
    return False


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    last_checkpoint: Path | None = None


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile every transformer block in place (the state_dict keeps its names): the norms,
    modulation, rotary and activation ops around each block's matrix products fuse. Whole-model
    compilation would break its graph at the data-dependent in-context and masking steps."""
    blocks = [m for m in model.modules() if isinstance(m, (AdaLNBlock, ViTBlock))]
    for block in blocks:
        block.compile()
    return len(blocks)


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
        if t.batch_size > len(train_set):
            raise TrainingError(
                f"train.batch_size={t.batch_size} exceeds the {len(train_set)} training samples: lower train.batch_size"
            )
        torch.manual_seed(t.seed)  # parameter initialisation is identical on every rank
        self.model = UNITE(cfg, info).to(self.device)
        self.model.modality.perceptual  # a missing perceptual-loss file fails here, not at step 1
        if t.compile:
            compile_blocks(self.model)
        self.ema = make_ema(self.model, cfg)
        self.optimizers = build_optimizers(self.model, cfg)
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.step = 0
        self.history: list[dict] = []
        self.autocast_dtype = autocast_dtype_for(t.precision)
        # data delivery: the micro-batches of steps [step, _batch_end), decoded ahead by DataLoader
        # workers for lazy sets (image folders, shards); reopened whenever self.step jumps (resume)
        self._batches: StepBatches | None = None
        self._batch_end: int | None = None
        self._ddp = None  # DistributedDataParallel wrapper, built at the first step with several ranks

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
        return self.cfg.train.lr * lr_scale(self.cfg) * f

    def _micro_batches(self) -> Iterator:
        """This rank's grad_accum micro-batches of step self.step, on the device (see unite_core.data.loader)."""
        t = self.cfg.train
        if self._batches is None or not self._batches.ready_for(self.step):
            self.close_batches()
            self._batches = StepBatches(
                self.train_set, batch_size=t.batch_size, seed=t.seed, rank=self.rank, world_size=self.world_size,
                grad_accum=t.grad_accum, start=self.step, end=max(self._batch_end or t.steps, self.step + 1),
                num_workers=loader_workers(self.train_set, self.cfg.data.num_workers),
                pin_memory=self.device.type == "cuda",
            )
        for batch in self._batches.take(self.step):
            yield move(batch, self.device)

    def close_batches(self) -> None:
        """Stop the data-loading workers (they are restarted on the next step)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Every collective of the loop goes through here: on the training device (NCCL reduces CUDA
        tensors only), in place."""
        if tensor.device != self.device:
            raise RuntimeError(f"collective on {tensor.device} while training on {self.device}")
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _forward_model(self) -> torch.nn.Module:
        """The module the loss is computed through: DistributedDataParallel around the model when
        several ranks train (bucketed gradient all-reduce overlapping the backward pass)."""
        if not self.distributed:
            return self.model
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            m = self.cfg.model
            # parameters that get no gradient in some steps: the separate denoiser during a
            # reconstruction-only phase
            unused = m.weight_sharing == "separate" and (self.cfg.loss.flow_warmup_steps > 0 or self.cfg.loss.recon_only)
            self._ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=unused, gradient_as_bucket_view=True,
            )
        return self._ddp

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
        net = self._forward_model()
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(self._micro_batches()):
            # gradients are averaged across ranks once, in the last micro-batch's backward
            sync = not self.distributed or i == t.grad_accum - 1
            with (nullcontext() if sync else net.no_sync()):
                with autocast(self.device, self.autocast_dtype):
                    loss, metrics = net(batch, gen, **warm)
                (loss / t.grad_accum).backward()
            for k, v in metrics.items():  # summed on the device: no host sync per micro-batch
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
                sums[k] = sums.get(k, 0.0) + v / t.grad_accum
        if t.grad_clip:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        # a non-finite loss on any rank stops every rank before any optimizer step
        bad = (~torch.isfinite(sums["loss"])).float().reshape(1)
        if self.distributed:
            self._all_reduce(bad, dist.ReduceOp.MAX)
        keys = list(sums)
        values = torch.stack([bad[0].to(torch.float64)] + [sums[k].reshape(()).to(torch.float64) for k in keys])
        host = values.tolist()  # the step's one host sync
        out = dict(zip(keys, host[1:]))
        if host[0] > 0:
            where = "" if math.isfinite(out["loss"]) else f" ({out['loss']})"
            raise TrainingError(
                f"the loss became non-finite{where} at step {self.step}{' on one of the ranks' if not where else ''}: "
                "training stopped, the last good checkpoint is kept; lower train.lr, keep train.grad_clip on, "
                "or use train.precision=fp32"
            )
        for o in self.optimizers:
            o.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        out["lr"] = lr
        return out

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
            with autocast(self.device, self.autocast_dtype):
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

        self._batch_end = until  # the data loader reads ahead no further than this run goes
        while self.step < until:
            metrics = self.train_step()
            window_steps += 1
            out_of_time = limit is not None and self.step < until and time.perf_counter() - start > limit
            if limit is not None and self.distributed:  # every rank joins, so all stop at one step
                flag = torch.tensor([1.0 if out_of_time else 0.0], device=self.device)
                out_of_time = bool(self._all_reduce(flag, dist.ReduceOp.MAX).item())
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
        self.close_batches()
        self._batch_end = None
        return TrainResult(self.step, self.history, time.perf_counter() - start, stopped_early, last_ckpt)
