"""Evaluation of a trained UNITE image model: generation (guidance sweep), reconstruction, noise floor.

Pure library code: plain PyTorch + ``unite_core.metrics.images`` (torch-fidelity), logging only.

Conventions
- Every image tensor passed to or returned by this module is float ``(N, C, H, W)`` in ``[0, 1]`` (the
  metrics convention); the model's own pixel range (model.pixel_range) is handled inside (``evaluate_reconstruction``).
- Generation uses class-balanced labels (equal count per class, see ``unite_core.model.balanced_labels``)
  and the same noise for every guidance scale (one generator seeded by ``seed``), so the guidance curve
  compares scales on common random numbers.
- Which weights are evaluated (EMA or raw) is the caller's choice: pass the model you want measured.
- gFID / KID / precision / recall / IS compare generated samples with the *training* set; rFID compares
  reconstructions of the validation set with the validation set itself. The noise floor is FID(val vs
  train): the FID a perfect generator would get with this many samples and this feature network.
- Reference statistics are cached under ``cache_dir`` with a name that hashes the reference images and the
  feature extractor (``reference_cache_name``): changing either recomputes them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .metrics.images import (
    INCEPTION_EXTRACTOR,
    MetricsError,
    conditional_accuracy,
    fidelity_metrics,
    psnr,
    reference_cache_name,
    register_own_extractor,
    ssim,
)
from .model import balanced_labels

log = logging.getLogger(__name__)

__all__ = [
    "CURVE_KEYS",
    "PSNR_CAP_DB",
    "FeatureSpec",
    "dataset_images",
    "generate_balanced",
    "evaluate_generation",
    "evaluate_reconstruction",
    "noise_floor",
    "fid_noise",
    "evaluate_images",
    "image_grid",
    "pairs_grid",
    "autocast_dtype_for",
]

#: columns of one guidance-curve row (``evaluate_generation(...)["curve"]``)
CURVE_KEYS = ("cfg_scale", "fid", "kid_mean", "kid_std", "precision", "recall", "isc_mean",
              "conditional_accuracy", "seconds")
#: identical images have infinite PSNR; per-image values are capped here before averaging
PSNR_CAP_DB = 100.0


# ----------------------------------------------------------------------------------------------
# Feature extractor choice, shared by every FID-type call
# ----------------------------------------------------------------------------------------------
@dataclass
class FeatureSpec:
    """Which network computes FID/KID/PRC/IS features, and where reference statistics are cached.

    extractor="own" needs ``classifier`` (the dataset's FeatureClassifier); "inception" needs
    ``inception_weights`` (a local file; nothing is downloaded). ``cache_dir=None`` disables caching.
    """

    extractor: str = "own"
    classifier: Optional[nn.Module] = None
    inception_weights: Optional[str] = None
    cache_dir: Optional[str] = None
    kid_subset_size: int = 1000
    batch_size: int = 128
    device: str | torch.device = "cpu"

    def extractor_name(self) -> str:
        if self.extractor == "own":
            if self.classifier is None:
                raise MetricsError("extractor='own' needs the dataset's feature classifier (models/classifier.pt); "
                                   "run the `classifier` stage first")
            return register_own_extractor(self.classifier)
        if self.extractor == "inception":
            return INCEPTION_EXTRACTOR
        raise MetricsError(f"unknown feature extractor {self.extractor!r}: use eval.feature_extractor=own|inception")

    def cache_name(self, reference: torch.Tensor) -> Optional[str]:
        if self.cache_dir is None:
            return None
        return reference_cache_name(reference, self.extractor_name())

    def metrics(self, generated: torch.Tensor, reference: torch.Tensor, *, prc: bool = True, isc: bool = True,
                seed: int = 2020) -> dict:
        return fidelity_metrics(
            generated, reference, extractor=self.extractor, classifier=self.classifier,
            inception_weights=self.inception_weights, cache_name=self.cache_name(reference),
            cache_dir=self.cache_dir, kid_subset_size=self.kid_subset_size, prc=prc, isc=isc,
            batch_size=self.batch_size, seed=seed, device=self.device,
        )


def _spec(features: FeatureSpec | None, classifier: nn.Module | None, **kwargs) -> FeatureSpec:
    if features is not None:
        return features
    return FeatureSpec(classifier=classifier, **{k: v for k, v in kwargs.items() if v is not None})


def autocast_dtype_for(precision: str) -> torch.dtype | None:
    """train.precision -> the autocast dtype used for sampling (bf16 is the fast path on CPU and GPU)."""
    return torch.bfloat16 if precision == "bf16" else None


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def dataset_images(dataset, max_items: int | None = None, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first ``max_items``) images of an image dataset as ([0, 1] float (N, C, H, W), labels)."""
    n = len(dataset) if max_items is None else min(len(dataset), int(max_items))
    if n == 0:
        raise MetricsError("the dataset is empty: nothing to evaluate against")
    xs, ys = [], []
    getter = getattr(dataset, "get_batch", None)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        if getter is not None:
            x, y = getter(idx)
        else:
            items = [dataset[int(i)] for i in idx]
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            y = torch.stack([torch.as_tensor(it[1]) for it in items])
        xs.append(((x.float() + 1.0) * 0.5).clamp(0.0, 1.0))
        ys.append(y.long())
    return torch.cat(xs), torch.cat(ys)


class _EvalMode:
    """Put a module in eval mode for a block and restore its previous mode afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        self.module.train(self.was_training)
        return False


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_balanced(
    model,
    n: int,
    *,
    sample_cfg,
    cfg_scale: float | None = None,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` class-conditional samples with class-balanced labels (sorted by class).

    ``sample_cfg`` is a ``SampleConfig`` (solver, steps, cfg_interval, norm_first, rtol, atol);
    ``cfg_scale=None`` uses ``sample_cfg.cfg_scale``. The noise comes from one generator seeded by ``seed``,
    so the same seed gives the same starting noise at every guidance scale. Returns (images in [0, 1] on
    the CPU, labels (n,) int64 on the CPU). Unconditional models get all-zero labels (sampled with the null
    class).
    """
    if n < 1:
        raise ValueError(f"generate_balanced: n must be >= 1, got {n}")
    dev = torch.device(device)
    scale = sample_cfg.cfg_scale if cfg_scale is None else float(cfg_scale)
    labels = balanced_labels(n, int(getattr(model, "num_classes", 0)))
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    out = []
    with _EvalMode(model):
        for start in range(0, n, batch_size):
            y = labels[start : start + batch_size].to(dev)
            images, _ = model.generate(y, sample_cfg, cfg_scale=scale, generator=gen, autocast_dtype=autocast_dtype)
            if not torch.is_tensor(images):
                raise MetricsError("generate_balanced works on image models only (the modality returned no tensor)")
            out.append(images.float().cpu())
    return torch.cat(out), labels.cpu()


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def evaluate_generation(
    model,
    reference_images: torch.Tensor,
    classifier: nn.Module | None = None,
    *,
    cfg_scales: Sequence[float],
    n: int,
    sample_cfg,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    features: FeatureSpec | None = None,
    extractor: str = "own",
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    kid_subset_size: int | None = None,
    keep_samples: bool = False,
    on_scale: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Guidance sweep: for every scale, ``n`` class-balanced samples against ``reference_images``.

    Returns ``{"curve": [row per scale], "best": row with the lowest FID}``; a row has the keys
    :data:`CURVE_KEYS` (``conditional_accuracy`` is None without a classifier or for unconditional models;
    ``seconds`` is generation + metrics time for that scale). With ``keep_samples`` the result also holds
    ``"samples"`` and ``"labels"``: the images of the best scale. ``on_scale(row)`` is called after each
    scale (progress logging, tracking).
    """
    if not cfg_scales:
        raise ValueError("evaluate_generation: cfg_scales is empty (eval.cfg_scales)")
    spec = _spec(features, classifier, extractor=extractor, inception_weights=inception_weights,
                 cache_dir=None if cache_dir is None else str(cache_dir), kid_subset_size=kid_subset_size,
                 device=device)
    conditional = int(getattr(model, "num_classes", 0)) > 0
    curve: list[dict] = []
    best_row, best_images, best_labels = None, None, None
    for scale in cfg_scales:
        t0 = time.perf_counter()
        images, labels = generate_balanced(
            model, n, sample_cfg=sample_cfg, cfg_scale=float(scale), batch_size=batch_size, device=device,
            seed=seed, autocast_dtype=autocast_dtype,
        )
        t_gen = time.perf_counter() - t0
        m = spec.metrics(images, reference_images)
        acc = None
        cls = classifier if classifier is not None else spec.classifier
        if cls is not None and conditional:
            acc = conditional_accuracy(cls, images, labels, device=device)
        row = {
            "cfg_scale": float(scale),
            "fid": m["fid"], "kid_mean": m["kid_mean"], "kid_std": m["kid_std"],
            "precision": m["precision"], "recall": m["recall"], "isc_mean": m["isc_mean"],
            "conditional_accuracy": acc,
            "seconds": time.perf_counter() - t0,
        }
        curve.append(row)
        log.info("cfg %.2f: FID %.3f, IS %s, cond. acc %s, %.1f s (generation %.1f s)",
                 scale, row["fid"], row["isc_mean"], acc, row["seconds"], t_gen)
        if _finite(row["fid"]) and (best_row is None or row["fid"] < best_row["fid"]):
            best_row = row
            if keep_samples:
                best_images, best_labels = images, labels
        if on_scale is not None:
            on_scale(dict(row))
        del images
    if best_row is None:
        raise MetricsError("no guidance scale gave a finite FID (samples contain NaN?): check the checkpoint")
    result: dict[str, Any] = {"curve": curve, "best": dict(best_row)}
    if keep_samples:
        result["samples"], result["labels"] = best_images, best_labels
    return result


# ----------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct_images(
    model, images: torch.Tensor, *, batch_size: int = 250, device: str | torch.device = "cpu", seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Tokenize and decode ([0, 1] in, [0, 1] out, CPU); no decoder noise augmentation."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    out = []
    with _EvalMode(model):
        for start in range(0, len(images), batch_size):
            x = model.modality.from_unit(images[start : start + batch_size].to(dev).float())
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                decoded = model.reconstruct(x, gen)
            out.append(model.modality.postprocess(decoded))
    return torch.cat(out)


def evaluate_reconstruction(
    model,
    val_images: torch.Tensor,
    classifier: nn.Module | None = None,
    *,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    features: FeatureSpec | None = None,
    extractor: str = "own",
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    kid_subset_size: int | None = None,
    keep: int = 0,
) -> dict[str, Any]:
    """rFID (reconstructions vs the originals), PSNR (dB, mean over images, each capped at
    :data:`PSNR_CAP_DB`) and SSIM (mean) on ``val_images`` ([0, 1]).

    With ``keep > 0`` the result also holds ``"originals"`` and ``"reconstructions"``: ``keep`` images at
    evenly spaced positions of ``val_images`` (datasets stored class by class still show every class).
    """
    spec = _spec(features, classifier, extractor=extractor, inception_weights=inception_weights,
                 cache_dir=None if cache_dir is None else str(cache_dir), kid_subset_size=kid_subset_size,
                 device=device)
    t0 = time.perf_counter()
    recon = reconstruct_images(model, val_images, batch_size=batch_size, device=device, seed=seed,
                               autocast_dtype=autocast_dtype)
    ref = val_images.float().cpu()
    m = spec.metrics(recon, ref, prc=False, isc=False)
    p = psnr(recon, ref).clamp(max=PSNR_CAP_DB)
    s = ssim(recon, ref)
    out: dict[str, Any] = {
        "rfid": m["fid"],
        "psnr": float(p.mean()),
        "ssim": float(s.mean()),
        "seconds": time.perf_counter() - t0,
    }
    log.info("reconstruction: rFID %.3f, PSNR %.2f dB, SSIM %.4f (%d images, %.1f s)",
             out["rfid"], out["psnr"], out["ssim"], len(ref), out["seconds"])
    if keep:
        pick = torch.linspace(0, len(ref) - 1, min(int(keep), len(ref))).round().long()
        out["originals"] = ref[pick]
        out["reconstructions"] = recon[pick]
    return out


# ----------------------------------------------------------------------------------------------
# Sanity references
# ----------------------------------------------------------------------------------------------
def noise_floor(
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    classifier: nn.Module | None = None,
    *,
    features: FeatureSpec | None = None,
    extractor: str = "own",
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    kid_subset_size: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """FID of the validation set against the training set: what a perfect generator would score with
    this many samples and this feature network (the floor gFID should be read against)."""
    spec = _spec(features, classifier, extractor=extractor, inception_weights=inception_weights,
                 cache_dir=None if cache_dir is None else str(cache_dir), kid_subset_size=kid_subset_size,
                 device=device)
    return float(spec.metrics(val_images, train_images, prc=False, isc=False)["fid"])


def fid_noise(
    train_images: torch.Tensor,
    classifier: nn.Module | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    features: FeatureSpec | None = None,
    extractor: str = "own",
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    kid_subset_size: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """FID of uniform noise images (``n``, default min(1000, len(train))) against the training set: the
    ceiling a useless generator reaches."""
    n = int(n or min(1000, len(train_images)))
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.rand((n, *train_images.shape[1:]), generator=g)
    spec = _spec(features, classifier, extractor=extractor, inception_weights=inception_weights,
                 cache_dir=None if cache_dir is None else str(cache_dir), kid_subset_size=kid_subset_size,
                 device=device)
    return float(spec.metrics(noise, train_images, prc=False, isc=False)["fid"])


# ----------------------------------------------------------------------------------------------
# Everything at once (what the `evaluate` stage and `unite compare` run)
# ----------------------------------------------------------------------------------------------
def evaluate_images(
    model,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    features: FeatureSpec,
    *,
    sample_cfg,
    cfg_scales: Sequence[float],
    num_samples: int,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    keep_samples: bool = False,
    keep_reconstructions: int = 0,
    sanity: bool = True,
    on_scale: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Guidance sweep + reconstruction + (optionally) noise floor and noise FID.

    Returns ``{"curve", "best", "reconstruction", "noise_floor_fid", "noise_fid"}`` (+ kept images).
    """
    gen = evaluate_generation(
        model, train_images, features.classifier, cfg_scales=cfg_scales, n=num_samples, sample_cfg=sample_cfg,
        batch_size=batch_size, device=device, seed=seed, autocast_dtype=autocast_dtype, features=features,
        keep_samples=keep_samples, on_scale=on_scale,
    )
    rec = evaluate_reconstruction(
        model, val_images, features=features, batch_size=batch_size, device=device, seed=seed,
        autocast_dtype=autocast_dtype, keep=keep_reconstructions,
    )
    out: dict[str, Any] = {**gen, "reconstruction": rec}
    if sanity:
        out["noise_floor_fid"] = noise_floor(train_images, val_images, features=features)
        out["noise_fid"] = fid_noise(train_images, features=features, n=min(num_samples, len(train_images)))
    return out


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
def image_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.5, min_tile: int = 0):
    """A PIL image of ``images`` ([0, 1], (N, C, H, W), C in {1, 3}) laid out ``nrow`` per row.

    With ``min_tile`` the picture is upscaled by the smallest integer factor (nearest neighbour) that makes
    a tile at least that many pixels wide."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid expects (N, 1|3, H, W) images, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("image_grid: no images")
    nrow = max(1, min(int(nrow), n))
    rows = math.ceil(n / nrow)
    H = rows * h + (rows + 1) * padding
    W = nrow * w + (nrow + 1) * padding
    canvas = torch.full((c, H, W), float(pad_value))
    for i in range(n):
        r, col = divmod(i, nrow)
        y0 = padding + r * (h + padding)
        x0 = padding + col * (w + padding)
        canvas[:, y0 : y0 + h, x0 : x0 + w] = images[i].float().clamp(0, 1)
    arr = (canvas * 255.0).round().to(torch.uint8)
    if c == 1:
        img = Image.fromarray(arr[0].numpy(), mode="L")
    else:
        img = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    scale = math.ceil(min_tile / w) if min_tile and w < min_tile else 1
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def pairs_grid(originals: torch.Tensor, reconstructions: torch.Tensor, ncol: int = 10, **kwargs):
    """Rows alternate: ``ncol`` originals, then their ``ncol`` reconstructions below them."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"pairs_grid: shapes differ {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    chunks = []
    for start in range(0, len(originals), ncol):
        a = originals[start : start + ncol]
        b = reconstructions[start : start + ncol]
        if len(a) < ncol:  # pad the last pair of rows so originals and reconstructions stay aligned
            fill = torch.zeros((ncol - len(a), *a.shape[1:]))
            a, b = torch.cat([a, fill]), torch.cat([b, fill])
        chunks += [a, b]
    return image_grid(torch.cat(chunks), nrow=ncol, **kwargs)


def class_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int = 10, **kwargs):
    """One row per class (sorted), up to ``per_class`` samples each: the samples picture."""
    rows = []
    classes = sorted(set(int(c) for c in labels.tolist()))
    for c in classes:
        sel = images[labels == c][:per_class]
        if len(sel) < per_class:
            sel = torch.cat([sel, torch.zeros((per_class - len(sel), *images.shape[1:]))])
        rows.append(sel)
    return image_grid(torch.cat(rows), nrow=per_class, **kwargs)
