"""Typed schema of params.yaml: one source of truth for every setting.
Over 500 lines because every params.yaml section is one pydantic model here, with its checks and comments.

`load_config(path, overrides)` reads the YAML, applies `a.b=c` overrides and validates the result.
A preset (presets/*.yaml) holds only the keys it changes and names the file it builds on with
`base: ../params.yaml` (relative to its folder); `read_params` merges it over that base section by section.
Any problem (unknown key, wrong type, impossible value) raises `ConfigError` whose message is one line
naming the key, the offending value and what is allowed.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .io import stable_hash


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line naming key, value and fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
class DataConfig(_Section):
    dataset: Literal["mnist5k", "digits", "imagefolder", "molecules_embedded", "qm9", "moses3d"] = "mnist5k"
    root: Optional[str] = Field(None, description="folder (imagefolder), SDF file (qm9), or the MOSES source "
                                "(moses3d: a molsets wheel, a SMILES CSV or a folder; null = the wheel set-up downloads)")
    image_size: int = Field(32, ge=4, description="images are resized/padded to this square size")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    flip: bool = Field(False, description="random horizontal flip (training only)")
    on_corrupt: Literal["skip", "stop"] = Field(
        "stop", description="imagefolder, an unreadable image: stop with its path, or skip it (prepare leaves it "
        "out; at train time the next readable image of the split takes its place); read at prepare and at train time"
    )
    max_items: Optional[int] = Field(None, ge=1, description="cap the dataset size (debugging)")
    max_heavy_atoms: int = Field(9, ge=1, description="molecules: heavy-atom limit")
    max_atoms: int = Field(29, ge=2, description="molecules: max atoms incl. hydrogens (padding length)")
    conformer_seed: int = 0
    format: Literal["folder", "shards"] = Field(
        "folder", description="imagefolder: 'folder' decodes the image files at train time; 'shards' has prepare "
        "write every image once, cropped and resized, as uint8 arrays in a few large .npy files that training "
        "memory-maps (no decoding at train time; 3 x image_size^2 bytes per image on disk). Same batches either way"
    )
    num_workers: int = Field(
        2, ge=0, le=256, description="DataLoader worker processes per training process that decode image folders / "
        "read shards ahead of the training step; 0 = in the training thread. In-memory sets (mnist5k, digits, "
        "molecules) are always fetched in the training thread. GPU nodes: about (CPU cores per GPU) - 2"
    )
    num_molecules: int = Field(20000, ge=2, description="moses3d: how many MOSES molecules to embed (a deterministic "
                               "subset; 20000 takes about 10 minutes of `unite prepare` on 2 CPU cores)")
    prepare_workers: Optional[int] = Field(None, ge=1, description="moses3d: processes that embed conformers in "
                                           "`unite prepare` (null = all CPUs); the result does not depend on it")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.format == "shards" and self.dataset != "imagefolder":
            raise ValueError(
                f"data.format=shards applies to data.dataset=imagefolder only ({self.dataset} is held in memory "
                "already): set data.format=folder"
            )
        if self.dataset == "moses3d":
            if self.max_items is not None:
                raise ValueError(f"data.max_items={self.max_items} does not apply to data.dataset=moses3d; "
                                 f"set data.num_molecules={self.max_items} instead and data.max_items=null")
            # Facts of the pinned MOSES file (below): tighter limits keep nothing, and fail here rather
            # than after `unite prepare` has read all 1.6M SMILES. A user's own SMILES file (data.root)
            # may hold smaller molecules: not checked then.
            if self.root is None and self.max_heavy_atoms < MOSES_MIN_HEAVY_ATOMS:
                raise ValueError(
                    f"data.max_heavy_atoms={self.max_heavy_atoms} keeps no MOSES molecule (the smallest C/N/O/F "
                    f"ones have {MOSES_MIN_HEAVY_ATOMS} heavy atoms; QM9's limit of 9 does not fit this drug-like "
                    f"set): raise it, e.g. data.max_heavy_atoms=32 as in presets/molecules_large.yaml"
                )
            if self.root is None and self.max_atoms < MOSES_MIN_ATOMS:
                raise ValueError(
                    f"data.max_atoms={self.max_atoms} keeps no MOSES molecule (the smallest C/N/O/F ones have "
                    f"{MOSES_MIN_ATOMS} atoms with hydrogens): raise it, e.g. data.max_atoms=32 as in "
                    f"presets/molecules_large.yaml"
                )
        return self


# molsets 0.3.1's train.csv.gz: of its 1,584,663 SMILES, 910,475 have only C/N/O/F heavy atoms; those have
# 16 to 27 heavy atoms and 18 to 62 atoms with hydrogens (8,617 have at most 29, 38,860 at most 32).
MOSES_MIN_HEAVY_ATOMS = 16
MOSES_MIN_ATOMS = 18


# Named sizes: (depth, width, heads)
GE_SIZES: dict[str, tuple[int, int, int]] = {
    "T": (4, 128, 4),  # tiny: the embedded default (MNIST, 10 minutes on a 2-core CPU)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (12, 1024, 16),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DECODER_SIZES: dict[str, tuple[int, int, int]] = {
    "T": (2, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
}


class ModelConfig(_Section):
    ge_size: Literal["T", "S", "B", "M", "L", "XL", "custom"] = "T"
    ge_depth: Optional[int] = Field(None, ge=1)
    ge_width: Optional[int] = Field(None, ge=8)
    ge_heads: Optional[int] = Field(None, ge=1)
    decoder_size: Literal["T", "S", "B", "L", "custom"] = "T"
    decoder_depth: Optional[int] = Field(None, ge=1)
    decoder_width: Optional[int] = Field(None, ge=8)
    decoder_heads: Optional[int] = Field(None, ge=1)
    decoder_mlp_ratio: float = Field(4.0, gt=0)
    patch_size: int = Field(8, ge=1)
    latent_tokens: int = Field(8, ge=1, description="K register tokens")
    latent_dim: int = Field(8, ge=1, description="d, channels per latent token")
    in_context_tokens: int = Field(8, ge=0)
    in_context_start: int = Field(2, ge=0, description="block index from which class tokens are added")
    final_norm: Literal["layernorm_affine", "layernorm", "rmsnorm"] = "layernorm_affine"
    block_norm: bool = True
    qk_norm: bool = True
    rope: bool = True
    weight_sharing: Literal["shared", "separate"] = "shared"
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    fourier_scale: float = Field(1.0, gt=0, description="std of the timestep embedding's random frequencies")
    decoder_kind: Literal["patch_tokens", "queries"] = Field(
        "queries", description="patch_tokens: one latent token per patch (the authors'; K must be a "
        "square number); queries: learned patch queries beside the K latents (any K)")
    decoder_latent_width: Optional[int] = Field(
        None, ge=1, description="patch_tokens: width of the latents' first linear map (the authors': 768; "
        "null = the decoder width)")
    pixel_range: Literal["unit", "signed"] = Field(
        "unit", description="images as the model sees them: unit = [0, 1] (the authors'), signed = [-1, 1]")
    register_pos_scale: float = Field(
        1.0, ge=0.0, description="scale of the register tokens' initial sin-cos positions (1 = the authors')")
    latent_out_init: Literal["zero", "xavier"] = Field(
        "zero", description="init of the GE's output projection: zero (the authors') or xavier")
    patch_pos_table: bool = Field(
        False, description="add a fixed table to the patch tokens (the authors' is all zeros; "
        "import-checkpoint sets this when a checkpoint carries a non-zero one)")

    def ge_dims(self) -> tuple[int, int, int]:
        return _resolve_dims("model.ge", self.ge_size, GE_SIZES, self.ge_depth, self.ge_width, self.ge_heads)

    def decoder_dims(self) -> tuple[int, int, int]:
        return _resolve_dims(
            "model.decoder", self.decoder_size, DECODER_SIZES,
            self.decoder_depth, self.decoder_width, self.decoder_heads,
        )

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for prefix in ("ge", "decoder"):
            depth, width, heads = (self.ge_dims() if prefix == "ge" else self.decoder_dims())
            if width % heads != 0 or (width // heads) % 2 != 0:
                raise ValueError(
                    f"model.{prefix}_width={width} must split into {heads} heads of even size "
                    f"(width divisible by 2*heads)"
                )
        return self


def _resolve_dims(key, size, table, depth, width, heads) -> tuple[int, int, int]:
    if size == "custom":
        if None in (depth, width, heads):
            raise ValueError(f"{key}_size=custom needs {key}_depth, {key}_width and {key}_heads")
        return depth, width, heads
    d, w, h = table[size]
    return depth or d, width or w, heads or h


class FlowConfig(_Section):
    minibatches: int = Field(3, ge=1, description="M independent noisings per reconstruction pass")
    t_mu: float = 0.0
    t_sigma: float = Field(1.0, gt=0)
    shift: Optional[float] = Field(0.5, gt=0, description="t' = a t / (1 + (a-1) t); null = no shift")
    tokenize_t_max: float = Field(0.01, ge=0.0, lt=1.0, description="tokenization t ~ U[0, this]")
    velocity_clamp: float = Field(0.05, gt=0.0, lt=1.0, description="min of (1 - t) in v = (z - z_t)/(1 - t)")
    stop_grad: bool = Field(True, description="stop-gradient on z0 before the denoising pass")
    loss_space: Literal["velocity", "x"] = "velocity"
    reduction: Literal["sum", "mean"] = Field(
        "sum", description="flow loss over the M noisings: sum (the authors': weighs M x loss.w_gen) or mean")
    chunk_size: Optional[int] = Field(
        None, ge=1, description="noisings per denoiser forward pass (memory; null = all M at once)")


class LossConfig(_Section):
    recon: Literal["l1", "mse", "l1_mse"] = Field(
        "l1", description="pixel reconstruction loss (the paper: l1; mse learns small images faster)"
    )
    w_gen: float = Field(1.0, ge=0.0)
    w_perc: float = Field(0.0, ge=0.0)
    perceptual_weights: Optional[str] = Field(
        None, description="local VGG16 state_dict for the perceptual loss (nothing is downloaded)"
    )
    decoder_noise: bool = True
    decoder_noise_start: float = Field(0.7, ge=0.0, le=1.0)
    decoder_noise_prob: float = Field(0.5, ge=0.0, le=1.0)
    recon_only: bool = Field(False, description="tokenizer-only training (stage 1 of the two-stage baseline)")
    flow_warmup_steps: int = Field(0, ge=0, description="train the first N steps on the reconstruction loss alone, "
                                   "then the joint objective (a warm start for the tokenizer; 0 = joint from step 0)")

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        if self.w_perc > 0 and not self.perceptual_weights:
            raise ValueError(
                f"loss.w_perc={self.w_perc} needs loss.perceptual_weights=<local VGG16 state_dict path> "
                "(nothing is downloaded); set loss.w_perc=0 to train without the perceptual loss"
            )
        return self


class TwoPhaseSchedule(_Section):
    """train.schedule=two_phase (the authors'): linear warmup to lr over train.warmup_steps, hold until
    hold_until, decay (cosine) to lr2 until decay_until, hold lr2 until hold2_until, decay to lr_min
    until decay2_until, then lr_min. Steps; lr2 is scaled with the batch like lr."""

    hold_until: int = Field(0, ge=0)
    decay_until: int = Field(0, ge=0)
    lr2: Optional[float] = Field(None, gt=0.0, description="null = train.lr (no first decay)")
    hold2_until: int = Field(0, ge=0)
    decay2_until: int = Field(0, ge=0)


class TrainConfig(_Section):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch per optimizer step (all workers)")
    grad_accum: int = Field(1, ge=1)
    optimizer: Literal["muon_adamw", "adamw"] = "muon_adamw"
    lr: float = Field(1e-3, gt=0.0, description="base learning rate (scaled with the batch, see lr_batch_base)")
    muon_lr: Optional[float] = Field(
        None, gt=0.0, description="Muon's base lr (default: train.lr; Muon's updates are scaled to AdamW's "
        "RMS, so one lr serves both)")
    lr_batch_base: Optional[int] = Field(
        384, ge=1, description="lr x max(1, batch_size / this) (the authors' linear scaling; null = none)")
    lr_min: float = Field(1e-6, ge=0.0, description="final lr (before batch scaling)")
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "two_phase"] = Field(
        "cosine", description="cosine: warmup, cosine to lr_min at train.steps; two_phase: the authors' "
        "warmup / hold / decay / hold / decay (train.two_phase)")
    two_phase: TwoPhaseSchedule = Field(default_factory=lambda: TwoPhaseSchedule())
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0.0, description="AdamW's and Muon's epsilon")
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    muon_batched: bool = Field(
        True, description="run Muon's Newton-Schulz iterations batched over same-shape matrices (same update)")
    compile: bool = Field(False, description="torch.compile each transformer block (GE and decoder)")
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: Optional[float] = Field(3.0, gt=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(
        True, description="EMA decay ramps up as min(decay, (1+n)/(10+n)) (false: the full decay from step 0, "
        "the authors')")
    checkpoint_denoiser: bool = Field(
        False, description="recompute the denoising passes' activations in backward (saves memory at large M)")
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(500, ge=1)
    time_limit_minutes: Optional[float] = Field(None, gt=0, description="stop early after this wall time")
    init_from: Optional[str] = Field(
        None, description="start a new run from this checkpoint's full state (weights, EMA, optimisers, step), "
        "e.g. one written by `unite import-checkpoint`; a run with checkpoints of its own resumes from those")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.lr_min > self.lr:
            raise ValueError(f"train.lr_min={self.lr_min} must be <= train.lr={self.lr}")
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be < train.steps={self.steps}")
        if self.batch_size % self.grad_accum != 0:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum}"
            )
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"train.betas={list(self.betas)} must each lie in [0, 1)")
        if self.schedule == "two_phase":
            p = self.two_phase
            marks = [("train.warmup_steps", self.warmup_steps), ("train.two_phase.hold_until", p.hold_until),
                     ("train.two_phase.decay_until", p.decay_until), ("train.two_phase.hold2_until", p.hold2_until),
                     ("train.two_phase.decay2_until", p.decay2_until)]
            for (ka, a), (kb, b) in zip(marks, marks[1:]):
                if b < a:
                    raise ValueError(f"{kb}={b} must be >= {ka}={a} (the two-phase schedule's steps are in order)")
            if p.lr2 is not None and not self.lr_min <= p.lr2 <= self.lr:
                raise ValueError(f"train.two_phase.lr2={p.lr2} must lie between train.lr_min={self.lr_min} "
                                 f"and train.lr={self.lr}")
        return self


class SampleConfig(_Section):
    solver: Literal["dopri5", "euler", "heun"] = "heun"
    steps: int = Field(50, ge=1, description="fixed-step solvers")
    rtol: float = Field(1e-3, gt=0, description="dopri5")
    atol: float = Field(1e-6, gt=0, description="dopri5")
    cfg_scale: float = Field(2.0, ge=0.0)
    cfg_interval: tuple[float, float] = (0.1, 1.0)
    cfg_interval_open: bool = Field(
        True, description="guide for low < t < high (a low of 0 includes t=0), the authors'; false: low <= t <= high")
    norm_first: bool = Field(True, description="apply final latent norm to cond/uncond before combining")
    norm_unguided: bool = Field(
        True, description="apply the final latent norm to the prediction when cfg_scale <= 1 (the authors' "
        "sampler does not)")
    shifted_grid: bool = Field(True, description="step on a time grid shifted by flow.shift (the authors')")
    final_norm: bool = Field(False, description="apply the final latent norm to the ODE's end point before "
                             "decoding (the authors decode it as it is)")
    class_balanced: bool = True
    num_samples: int = Field(100, ge=1)
    use_ema: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SampleConfig":
        lo, hi = self.cfg_interval
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(
                f"sample.cfg_interval=[{lo}, {hi}] must satisfy 0 <= low <= high <= 1"
            )
        return self


class EvalConfig(_Section):
    num_samples: int = Field(1000, ge=2)
    batch_size: int = Field(250, ge=1)
    feature_extractor: Literal["own", "inception"] = "own"
    inception_weights: Optional[str] = Field(None, description="local torch-fidelity Inception weights file")
    cfg_scales: list[float] = Field(default_factory=lambda: [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    classifier_steps: int = Field(1500, ge=1)
    kid_subset_size: int = Field(500, ge=2)
    reference_stats: Optional[str] = Field(
        None, description="local .npz with 'mu' (D,) and 'sigma' (D, D), the ADM/JiT reference-batch format (e.g. "
        "VIRTUAL_imagenet256_labeled.npz, Inception features): gFID and the noise floor are computed against "
        "these statistics instead of the training images; KID and precision/recall still use training images")
    feature_subset: int = Field(
        10_000, ge=2, description="images per side whose features are kept for KID and precision/recall (a seeded "
        "random subset of larger sets; their cost grows with its square); FID and IS use every image")
    parallel: Literal["auto", "ray", "local"] = Field(
        "auto", description="where generation runs: ray = distributed.num_workers Ray workers (a GPU each with "
        "distributed.use_gpu), local = this process, auto = ray when distributed.num_workers > 1 or when "
        "distributed.use_gpu is set and this machine has no GPU")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if self.feature_extractor == "inception" and not self.inception_weights:
            raise ValueError(
                "eval.feature_extractor=inception needs eval.inception_weights=<local weights file> "
                "(nothing is downloaded); or use eval.feature_extractor=own"
            )
        if self.reference_stats is not None and not str(self.reference_stats).endswith(".npz"):
            raise ValueError(
                f"eval.reference_stats={self.reference_stats} must be an .npz file holding 'mu' and 'sigma' "
                "(the ADM/JiT reference-batch format); or set it to null to compare with the training images"
            )
        if self.kid_subset_size > self.feature_subset:
            raise ValueError(
                f"eval.kid_subset_size={self.kid_subset_size} exceeds eval.feature_subset={self.feature_subset}, "
                "the features kept for KID: lower eval.kid_subset_size or raise eval.feature_subset"
            )
        return self


class DistributedConfig(_Section):
    num_workers: int = Field(1, ge=0, description="Ray Train workers; 0 = in-process without Ray")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1, description="refits after a worker died or failed outside the project's code "
                              "(each from the newest checkpoint; -1 = no limit); the project's own errors are never retried")
    num_cpus: Optional[int] = Field(None, ge=1, description="logical CPUs for a local Ray cluster")


class TrackingConfig(_Section):
    experiment: str = "unite"
    enabled: bool = True
    strict: bool = Field(False, description="stop a stage when the MLflow store is locked for too long, corrupt "
                         "or unreachable (default: warn once and run the stage untracked; metrics/*.json are "
                         "written either way)")


class SweepConfig(_Section):
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1, description="random: trials; grid: repeats of the grid")
    max_concurrent: int = Field(1, ge=1)
    scheduler: Literal["none", "asha"] = "asha"
    metric: str = "val_psnr"
    mode: Literal["min", "max"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    steps: Optional[int] = Field(None, ge=1, description="train.steps per trial (default: train.steps)")
    space: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values")
    gfid_samples: int = Field(0, ge=0, description="images: class-balanced samples per trial for its gFID "
                              "(own features or Inception as eval.feature_extractor says); 0 = no gFID")
    gfid_scale: float = Field(2.0, ge=0.0, description="guidance scale of the trials' gFID samples")


class AnalysisConfig(_Section):
    num_images: int = Field(256, ge=8)
    timesteps: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    knn: int = Field(10, ge=1)
    entropy_bins: int = Field(256, ge=2)
    probe_max_iter: int = Field(1000, ge=10)


#: the sections whose settings define a trained model (Config.fingerprint)
MODEL_SECTIONS = ("modality", "data", "model", "flow", "loss", "train")
#: keys of MODEL_SECTIONS that change how a run is carried out, not the model it trains: changing
#: one resumes the same run instead of starting over. Everything else in those sections counts.
#: data.root and data.on_corrupt only matter through the data's content, whose hash the run name holds.
OPERATIONAL_KEYS = (
    "data.root",
    "data.on_corrupt",
    "data.format",            # folder or shards: the same batches either way
    "data.num_workers",
    "data.prepare_workers",
    "flow.chunk_size",        # memory only: the same loss, in chunks
    "train.checkpoint_denoiser",
    "train.compile",
    "train.muon_batched",     # the same update, batched across same-shape matrices
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.time_limit_minutes",
    "train.device",
    "train.threads",
)


class Config(_Section):
    modality: Literal["images", "molecules"] = "images"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        image_sets = {"mnist5k", "digits", "imagefolder"}
        if self.modality == "images":
            if self.data.dataset not in image_sets:
                raise ValueError(
                    f"data.dataset={self.data.dataset} is a molecule dataset but modality=images; "
                    f"use one of {sorted(image_sets)} or set modality=molecules"
                )
            if self.data.image_size % self.model.patch_size != 0:
                raise ValueError(
                    f"model.patch_size={self.model.patch_size} must divide data.image_size={self.data.image_size}"
                )
        else:
            if self.data.dataset in image_sets:
                raise ValueError(
                    f"data.dataset={self.data.dataset} is an image dataset but modality=molecules; "
                    "use molecules_embedded, moses3d or qm9"
                )
        if self.modality == "images" and self.model.decoder_kind == "patch_tokens":
            k = self.model.latent_tokens
            if math.isqrt(k) ** 2 != k:
                raise ValueError(
                    f"model.decoder_kind=patch_tokens needs a square number of latent tokens, got "
                    f"model.latent_tokens={k}: use a square K or model.decoder_kind=queries"
                )
        if self.data.dataset in ("imagefolder", "qm9") and not self.data.root:
            raise ValueError(f"data.dataset={self.data.dataset} needs data.root=<path to your data>")
        depth = self.model.ge_dims()[0]
        if self.model.in_context_tokens > 0 and self.model.in_context_start >= depth:
            raise ValueError(
                f"model.in_context_start={self.model.in_context_start} must be < GE depth {depth}"
            )
        return self

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, sections: tuple[str, ...] = MODEL_SECTIONS,
                    exclude: tuple[str, ...] = OPERATIONAL_KEYS) -> str:
        """Short hash of the settings that define a trained model (the resume key of a training run).

        Every key of `sections` counts except the operational ones in `exclude` (a key added to a
        section later counts automatically). The data's content is not in the params: run names add
        the prepared data's content hash (pipelines.distributed.run_name).
        """
        d = self.to_dict()
        sub = {k: d[k] for k in sections}
        for dotted in exclude:
            section, _, key = dotted.partition(".")
            if isinstance(sub.get(section), dict):
                sub[section].pop(key, None)
        return stable_hash(sub, 12)


# --------------------------------------------------------------------------------------------
# Loading, overrides, error formatting
# --------------------------------------------------------------------------------------------
def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ""
    for part in e["loc"]:  # keys joined by dots, list positions in brackets: sample.cfg_interval[1]
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        return f"unknown key '{loc}': remove it or check the spelling (see params.yaml for the known keys)"
    if e["type"].startswith("value_error") or e["type"] == "assertion_error":
        return msg.removeprefix("Value error, ")
    value = e.get("input")
    allowed = msg
    if e["type"] == "literal_error":
        allowed = msg.replace("Input should be", "allowed:")
    return f"{loc}={value!r} is invalid: {allowed}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; use section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set `section.key=value` texts, or {dotted key: value} items, in a params dict (in place)."""
    if isinstance(overrides, dict):
        items = [(k.split("."), v, f"{k}={v}") for k, v in overrides.items()]
    else:
        items = [(*parse_override(t), t) for t in overrides or []]
    for path, value, text in items:
        node = data
        for p in path[:-1]:
            if p not in node or node[p] is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override '{text}': '{p}' is a value, not a section")
            node = node[p]
        _check_plain({text.split("=", 1)[0].strip(): value}, "override ")
        node[path[-1]] = value
    return data


def _unplain_value(data: Any, prefix: str = "") -> tuple[str, Any] | None:
    """The first (dotted key, value) whose value YAML read as something other than plain data
    (a date or time stamp, binary data, a set), or None."""
    if isinstance(data, dict):
        for k, v in data.items():
            found = _unplain_value(v, f"{prefix}{k}.")
            if found:
                return found
        return None
    if isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found = _unplain_value(v, f"{prefix.rstrip('.')}[{i}].")
            if found:
                return found
        return None
    if data is None or isinstance(data, (str, int, float, bool)):
        return None
    return prefix.rstrip("."), data


def _check_plain(data: Any, where: str) -> None:
    found = _unplain_value(data)
    if found is None:
        return
    key, value = found
    if isinstance(value, (datetime.date, datetime.datetime)):
        raise ConfigError(
            f"{where}{key}={value} was read as a date; no setting takes a date: quote it (\"{value}\") "
            "if you meant text, or give the number the key expects"
        )
    raise ConfigError(f"{where}{key} holds {type(value).__name__} data that no setting takes: use a number, "
                      "text, true/false or a list")


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    _check_plain(data or {}, "")
    data = json.loads(json.dumps(data or {}))  # deep copy of plain data
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


#: the first line of a params file that `unite preset` wrote (a preset merged over the embedded default)
PRESET_MARK = "# Written by `unite preset "


def _read_params_file(p: Path) -> tuple[dict[str, Any], str]:
    """One YAML params file as it is written (a `base:` key included), and its text."""
    if p.is_dir():
        raise ConfigError(f"params file '{p}' is a folder: pass --params FILE (a YAML file such as params.yaml)")
    if not p.is_file():
        raise ConfigError(f"params file '{p}' not found: pass --params FILE or run from the project root")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"params file '{p}' cannot be read ({exc.strerror}): check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise ConfigError(f"params file '{p}' is binary, not YAML text: pass the YAML params file "
                          "(e.g. params.yaml or presets/*.yaml)")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"params file '{p}' is not valid YAML{where}: fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file '{p}' must hold a mapping of sections (data, model, train, ...)")
    _check_plain(data, f"params file '{p}': ")
    return data, text


def merge_params(base: dict[str, Any], overlay: dict[str, Any], schema: type[BaseModel] = Config) -> dict[str, Any]:
    """`overlay` over `base`: a section (a model of the schema, e.g. `train` or `train.two_phase`) is merged
    key by key; any other value, a mapping such as `sweep.space` or a list included, replaces the base's."""
    out = dict(base)
    for key, value in overlay.items():
        field = schema.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if (isinstance(value, dict) and isinstance(out.get(key), dict) and isinstance(sub, type)
                and issubclass(sub, BaseModel)):
            out[key] = merge_params(out[key], value, sub)
        else:
            out[key] = value
    return out


def read_params(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file as plain data, with its `base:` resolved: a preset that says `base: ../params.yaml`
    (a path relative to the preset's own folder) holds only what it changes, and is merged over that base
    (recursively: a base may have a base of its own). Not validated: `config_from_dict` does that."""
    p = Path(path)
    data, _ = _read_params_file(p)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"params file '{p}': base={base!r} must name the params file it builds on, relative "
                          f"to its folder (e.g. base: ../params.yaml)")
    base_path = Path(os.path.normpath(p.parent / base))
    if not base_path.is_file():
        raise ConfigError(f"params file '{p}' builds on '{base_path}' (base: {base}, relative to the file's "
                          f"folder), which is not a file: fix the base or restore that file")
    chain = (*_chain, p.resolve())
    if base_path.resolve() in chain:
        raise ConfigError(f"params file '{p}': base {base} leads back to '{base_path}' (a loop of bases)")
    _, base_text = _read_params_file(base_path)
    if base_text.startswith(PRESET_MARK):
        written = base_text.splitlines()[0].removeprefix(PRESET_MARK).split("`")[0]
        raise ConfigError(f"params file '{p}' builds on '{base_path}', which now holds preset {written} (written "
                          f"by `unite preset`), not the embedded default: restore it with "
                          f"`git checkout {base_path.name}` (then `unite preset NAME` for another preset)")
    return merge_params(read_params(base_path, chain), data)


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read, merge (a preset's `base:`), override and validate a params file (None: the schema's defaults)."""
    data = read_params(path) if path is not None else {}
    return config_from_dict(data, overrides)


class _ParamsDumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line (`cfg_scales: [1.0, 2.0]`), as params.yaml writes them."""


_ParamsDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def params_as_written(path: str | Path | None, overrides: list[str], cfg: Config) -> dict[str, Any]:
    """The params file as the user wrote it (a preset merged over its base) plus `overrides`: a full params
    file (best_params.yaml); `cfg` as a dict where there is no file."""
    doc = read_params(path) if path is not None and Path(path).is_file() else cfg.to_dict()
    return apply_overrides(doc, list(overrides or []))


def preset_params_text(path: str | Path, name: str) -> str:
    """The full params file `unite preset NAME` writes: the preset merged over its base, every key written
    out (DVC reads params.yaml itself), headed by PRESET_MARK and the preset's own leading comments."""
    p = Path(path)
    data = read_params(p)
    config_from_dict(data)  # validate before anything is written
    _, text = _read_params_file(p)
    notes = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        notes.append(line)
    header = [f"{PRESET_MARK}{name}`: {p.as_posix()} over its base, every key written out.",
              "# Presets build on the embedded default: `git checkout params.yaml` restores it (before",
              "# `unite preset OTHER` or `--params presets/OTHER.yaml`). The preset's notes:", *notes]
    body = yaml.dump(data, Dumper=_ParamsDumper, sort_keys=False, width=120, allow_unicode=True)
    return "\n".join(header) + "\n" + body


def write_preset(name: str, out: Path, presets: Path = Path("presets")) -> str:
    """`unite preset NAME`: make `out` the preset (presets/NAME.yaml, or a preset file's path) over the embedded
    default, every key written out; nothing is written when `out` holds those settings already. Says what
    happened."""
    from .io import atomic_write_text

    path = Path(name) if name.endswith((".yaml", ".yml")) else Path(presets) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(presets).glob("*.yaml"))
        raise ConfigError(f"preset '{name}' not found ({path}): the presets are {', '.join(known) or 'none here'} "
                          "(run from the project root)")
    label = path.stem if path.parent == Path(presets) else name
    if out.is_file() and out.read_text(errors="replace").startswith(f"{PRESET_MARK}{label}`"):
        return f"{out} holds preset {label} already (`git checkout {out}` first to write it afresh): nothing written"
    text = preset_params_text(path, label)
    try:  # presets/mnist5k.yaml over an unedited params.yaml changes nothing
        same = out.is_file() and load_config(path) == load_config(out)
    except ConfigError:
        same = False
    if same:
        return f"{out} holds these settings already ({path} changes nothing in it): nothing written"
    atomic_write_text(out, text)
    return f"{out}: preset {label} ({path} over the embedded default); `git checkout {out}` restores the default"
