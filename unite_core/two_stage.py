"""The two-stage baseline (the paper's foil), on the same data, model sizes and budget as UNITE.

Stage 1 trains the tokenizer alone: the GE's tokenization path + the decoder, reconstruction loss only
(the UNITE config with ``loss.recon_only=true``; decoder noise augmentation as configured).
Stage 2 freezes that tokenizer, encodes the training set to latents once, and trains a *separate*
denoiser GE of the same size on those latents with the same flow objective (M flow mini-batches,
logit-normal + shifted timesteps, velocity loss, label dropout). The result is an ordinary UNITE
checkpoint with ``model.weight_sharing=separate`` whose encoder and decoder are the frozen stage-1 weights,
so ``model_from_checkpoint`` / the ``evaluate`` stage consume it like any other.

Budget: **equal wall-clock**. ``TwoStageBudget.minutes`` is the total training time of both stages (give it
the UNITE run's training time); ``tokenizer_fraction`` of it goes to stage 1 (default 0.5) and the rest,
plus whatever stage 1 left unused, to stage 2 (encoding the training set counts towards stage 2).
``minutes=None`` trains by steps only: ``tokenizer_steps`` and ``denoiser_steps`` (default ``train.steps``
each). The step count of each stage is always capped by its ``*_steps``; its cosine schedule spans them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import Config, config_from_dict
from .devices import autocast, autocast_dtype_for
from .model import UNITE
from .train import Trainer, TrainResult, build_optimizers, make_ema, save_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "TwoStageBudget",
    "TwoStageResult",
    "LatentDataset",
    "LatentDenoiserUNITE",
    "DenoiserTrainer",
    "tokenizer_config",
    "denoiser_config",
    "tokenizer_weights",
    "encode_dataset",
    "train_tokenizer",
    "train_denoiser",
    "train_two_stage",
]


@dataclass
class TwoStageBudget:
    """Total wall-clock minutes of both stages (None: steps only), the share of stage 1, step caps."""

    minutes: Optional[float] = None
    tokenizer_fraction: float = 0.5
    tokenizer_steps: Optional[int] = None
    denoiser_steps: Optional[int] = None

    def __post_init__(self):
        if not 0.0 < self.tokenizer_fraction < 1.0:
            raise ValueError(f"tokenizer_fraction={self.tokenizer_fraction} must lie strictly between 0 and 1")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes={self.minutes} must be > 0 (or None for a steps-only budget)")


@dataclass
class TwoStageResult:
    checkpoint: Path
    tokenizer_checkpoint: Optional[Path]
    tokenizer_steps: int
    tokenizer_seconds: float
    encode_seconds: float
    denoiser_steps: int
    denoiser_seconds: float
    tokenizer_history: list = field(default_factory=list)
    denoiser_history: list = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.tokenizer_seconds + self.encode_seconds + self.denoiser_seconds

    @property
    def steps(self) -> int:
        return self.tokenizer_steps + self.denoiser_steps

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.endswith("history")}
        d["checkpoint"] = str(self.checkpoint)
        d["tokenizer_checkpoint"] = None if self.tokenizer_checkpoint is None else str(self.tokenizer_checkpoint)
        d["seconds"] = self.seconds
        d["steps"] = self.steps
        return d


# ----------------------------------------------------------------------------------------------
# Configs of the two stages
# ----------------------------------------------------------------------------------------------
def _with(cfg: Config, overrides: dict) -> Config:
    data = cfg.to_dict()
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return config_from_dict(data)


def _steps_overrides(cfg: Config, steps: Optional[int]) -> dict:
    if steps is None:
        return {}
    steps = int(steps)
    return {"train.steps": steps, "train.warmup_steps": min(cfg.train.warmup_steps, max(0, steps - 1))}


def tokenizer_config(cfg: Config, steps: Optional[int] = None) -> Config:
    """Stage 1: the GE's tokenization path + decoder, reconstruction loss only (shared layout, one GE)."""
    return _with(cfg, {"loss.recon_only": True, "model.weight_sharing": "shared", **_steps_overrides(cfg, steps)})


def denoiser_config(cfg: Config, steps: Optional[int] = None) -> Config:
    """Stage 2 / the final checkpoint: separate encoder and denoiser GEs of the same size."""
    return _with(cfg, {"loss.recon_only": False, "model.weight_sharing": "separate", **_steps_overrides(cfg, steps)})


TOKENIZER_PREFIXES = ("encoder.", "decoder.")


def tokenizer_weights(state_dict: dict) -> dict:
    """The encoder (tokenization GE incl. observation embedding) and decoder tensors of a state_dict."""
    return {k: v for k, v in state_dict.items() if k.startswith(TOKENIZER_PREFIXES)}


# ----------------------------------------------------------------------------------------------
# Stage 2 pieces
# ----------------------------------------------------------------------------------------------
class LatentDataset(torch.utils.data.Dataset):
    """Precomputed clean latents z0 (N, K, d) with their labels; batches are (z0, y)."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor):
        if len(latents) != len(labels):
            raise ValueError(f"{len(latents)} latents but {len(labels)} labels")
        self.latents = latents
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        return self.latents[int(i)], self.labels[int(i)]

    def get_batch(self, indices: torch.Tensor):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.latents[idx], self.labels[idx]


class LatentDenoiserUNITE(UNITE):
    """A separate-weights UNITE whose training objective is the flow loss on precomputed latents.

    ``compute_loss((z0, y))`` runs only the denoiser GE; the (frozen) encoder and decoder are not touched,
    so no compute is spent on them during stage 2. Its state_dict is exactly a separate-weights UNITE's.
    """

    def compute_loss(self, batch, generator: torch.Generator | None = None):
        z0, y = batch
        lflow, per_noising = self.flow_objective(z0.float(), y, generator)
        metrics = {"flow": per_noising.detach(), "loss": lflow.detach(), "latent_std": z0.detach().float().std()}
        return lflow, metrics


class DenoiserTrainer(Trainer):
    """The ordinary Trainer (same loop, optimiser split, schedule, EMA, checkpoints) on a
    :class:`LatentDenoiserUNITE` whose encoder and decoder hold ``frozen`` weights and have
    ``requires_grad=False``: only the denoiser GE's parameters are optimised."""

    def __init__(self, cfg: Config, info: dict, latent_set: LatentDataset, frozen: dict, device="cpu", *,
                 val_set=None):
        if cfg.model.weight_sharing != "separate" or cfg.loss.recon_only:
            raise ValueError("DenoiserTrainer needs model.weight_sharing=separate and loss.recon_only=false "
                             "(use two_stage.denoiser_config)")
        super().__init__(cfg, info, latent_set, device, val_set=val_set)
        torch.manual_seed(cfg.train.seed)
        model = LatentDenoiserUNITE(cfg, info)
        missing, unexpected = model.load_state_dict(frozen, strict=False)
        if unexpected:
            raise ValueError(f"tokenizer weights do not fit the stage-2 model: unexpected keys {unexpected[:5]}")
        not_denoiser = [k for k in missing if not k.startswith("denoiser_ge.")]
        if not_denoiser:
            raise ValueError(f"tokenizer weights are incomplete: missing {not_denoiser[:5]}")
        for module in (model.encoder, model.decoder):
            module.requires_grad_(False)
        self.model = model.to(self.device)
        self.ema = make_ema(self.model, cfg)  # the same EMA as every other run
        self.optimizers = build_optimizers(self.model, cfg)
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]


@torch.no_grad()
def encode_dataset(model: UNITE, dataset, *, batch_size: int = 256, device="cpu", seed: int = 0,
                   autocast_dtype: torch.dtype | None = None) -> LatentDataset:
    """Tokenize every item of ``dataset`` (no augmentation beyond the dataset's own) into a LatentDataset."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    zs, ys = [], []
    getter = getattr(dataset, "get_batch", None)
    try:
        for start in range(0, len(dataset), batch_size):
            idx = torch.arange(start, min(len(dataset), start + batch_size))
            if getter is not None:
                batch = getter(idx)
            else:
                items = [dataset[int(i)] for i in idx]
                batch = tuple(torch.stack([torch.as_tensor(it[j]) for it in items]) for j in range(len(items[0])))
            obs, y = model.modality.unpack(batch)
            obs = obs.to(dev) if torch.is_tensor(obs) else {k: v.to(dev) for k, v in obs.items()}
            with autocast(dev, autocast_dtype):
                z = model.tokenize(obs, gen)
            zs.append(z.float().cpu())
            ys.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was_training)
    return LatentDataset(torch.cat(zs), torch.cat(ys))


def _limit(seconds: Optional[float]) -> float:
    return math.inf if seconds is None else max(0.0, float(seconds))


def train_tokenizer(cfg: Config, info: dict, train_set, *, val_set=None, device="cpu",
                    steps: Optional[int] = None, time_limit_s: Optional[float] = None,
                    checkpoint_path=None, on_log: Callable | None = None) -> tuple[Trainer, TrainResult]:
    """Stage 1: train GE tokenization + decoder with the reconstruction loss only."""
    tcfg = tokenizer_config(cfg, steps)
    trainer = Trainer(tcfg, info, train_set, device, val_set=val_set)
    result = trainer.run(tcfg.train.steps, on_log=on_log, checkpoint_path=checkpoint_path,
                         time_limit_s=_limit(time_limit_s))
    log.info("two-stage: tokenizer trained %d steps in %.1f s", result.step, result.seconds)
    return trainer, result


def train_denoiser(cfg: Config, info: dict, train_set, frozen: dict, *, val_set=None, device="cpu",
                   steps: Optional[int] = None, time_limit_s: Optional[float] = None, checkpoint_path=None,
                   on_log: Callable | None = None) -> tuple[DenoiserTrainer, TrainResult, float]:
    """Stage 2: encode ``train_set`` with the frozen tokenizer, then train the separate denoiser GE.

    ``time_limit_s`` covers encoding and training. Returns (trainer, training result, encode seconds).
    """
    dcfg = denoiser_config(cfg, steps)
    t0 = time.perf_counter()
    tok = UNITE(tokenizer_config(cfg), info)  # the tokenizer alone: encoder + decoder, loaded strictly
    tok.load_state_dict(frozen)
    tok.to(device)
    latents = encode_dataset(tok, train_set, batch_size=max(64, cfg.train.batch_size), device=device,
                             seed=cfg.train.seed, autocast_dtype=autocast_dtype_for(cfg.train.precision))
    del tok
    encode_s = time.perf_counter() - t0
    log.info("two-stage: encoded %d training items to latents in %.1f s", len(latents), encode_s)
    if getattr(train_set, "flip", False):
        log.warning("two-stage: data.flip is on but stage 2 trains on latents of the unflipped training set")
    trainer = DenoiserTrainer(dcfg, info, latents, frozen, device, val_set=val_set)
    remaining = None if time_limit_s is None else time_limit_s - encode_s
    result = trainer.run(dcfg.train.steps, on_log=on_log, checkpoint_path=checkpoint_path,
                         time_limit_s=_limit(remaining))
    log.info("two-stage: denoiser trained %d steps in %.1f s", result.step, result.seconds)
    return trainer, result, encode_s


def train_two_stage(
    cfg: Config,
    info: dict,
    train_set,
    *,
    val_set=None,
    budget: TwoStageBudget | None = None,
    device="cpu",
    checkpoint_path,
    tokenizer_checkpoint_path=None,
    tokenizer_use_ema: bool = True,
    on_log: Callable[[str, int, dict], None] | None = None,
) -> TwoStageResult:
    """Both stages under one budget; writes the final (separate-weights) checkpoint to ``checkpoint_path``.

    The frozen tokenizer is stage 1's EMA weights (``tokenizer_use_ema``), as a released tokenizer would be.
    The final checkpoint carries ``state["two_stage"]`` (budget and per-stage steps/seconds).
    ``on_log(stage, step, record)`` receives the training logs of both stages ("tokenizer" / "denoiser").
    """
    budget = budget or TwoStageBudget()
    total = None if budget.minutes is None else budget.minutes * 60.0
    tok_limit = None if total is None else total * budget.tokenizer_fraction

    def logger_for(stage):
        return None if on_log is None else (lambda step, rec: on_log(stage, step, rec))

    t0 = time.perf_counter()
    tok_trainer, tok_result = train_tokenizer(
        cfg, info, train_set, val_set=val_set, device=device,
        steps=budget.tokenizer_steps or cfg.train.steps, time_limit_s=tok_limit,
        checkpoint_path=tokenizer_checkpoint_path, on_log=logger_for("tokenizer"),
    )
    weights = tok_trainer.ema_weights() if tokenizer_use_ema else tok_trainer.model.state_dict()
    frozen = {k: v.detach().clone().cpu() for k, v in tokenizer_weights(weights).items()}
    del tok_trainer
    used = time.perf_counter() - t0
    den_limit = None if total is None else total - used
    den_trainer, den_result, encode_s = train_denoiser(
        cfg, info, train_set, frozen, val_set=val_set, device=device,
        steps=budget.denoiser_steps or cfg.train.steps, time_limit_s=den_limit,
        checkpoint_path=None, on_log=logger_for("denoiser"),
    )
    result = TwoStageResult(
        checkpoint=Path(checkpoint_path),
        tokenizer_checkpoint=None if tokenizer_checkpoint_path is None else Path(tokenizer_checkpoint_path),
        tokenizer_steps=tok_result.step, tokenizer_seconds=tok_result.seconds, encode_seconds=encode_s,
        denoiser_steps=den_result.step, denoiser_seconds=den_result.seconds,
        tokenizer_history=tok_result.history, denoiser_history=den_result.history,
    )
    state = den_trainer.state_dict()
    state["two_stage"] = {
        "budget": asdict(budget),
        "tokenizer_use_ema": bool(tokenizer_use_ema),
        **{k: v for k, v in result.summary().items() if k not in ("checkpoint", "tokenizer_checkpoint")},
        "tokenizer_history": tok_result.history,
    }
    save_checkpoint(checkpoint_path, state)
    log.info("two-stage baseline: %d + %d steps, %.1f s in all -> %s", result.tokenizer_steps,
             result.denoiser_steps, result.seconds, checkpoint_path)
    return result
