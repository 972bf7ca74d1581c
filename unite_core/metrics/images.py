"""Image metrics for UNITE: FID / KID / precision-recall / IS through torch-fidelity, PSNR, SSIM and
class-conditional accuracy.
Over 500 lines because the feature networks, the streamed statistics and their cache serve every metric.

Conventions (every function here):

* images are float tensors ``(N, C, H, W)`` with values in ``[0, 1]``, ``C`` in ``{1, 3}``, ``H == W >= 8``;
* labels are ``int64`` tensors ``(N,)``.

Two feature extractors are supported by :func:`fidelity_metrics`:

* ``"own"`` -- a small CNN (:class:`FeatureClassifier`) trained on the dataset itself
  (:func:`train_feature_classifier`). FID / KID / precision-recall use its 128-d penultimate features, IS its
  logits. Numbers are only comparable between runs that use the *same* classifier weights; the torch-fidelity
  extractor name returned by :func:`register_own_extractor` therefore contains a hash of the weights.
* ``"inception"`` -- torch-fidelity's ``inception-v3-compat`` (the standard FID network), loaded from a local
  weights file (``eval.inception_weights``). Nothing is ever downloaded: without a readable file a
  :class:`MetricsError` is raised. torch-fidelity unpickles that file without restriction, so the project reads
  it once, checks it with ``torch.load(weights_only=True)`` and hands torch-fidelity the checked bytes; a file
  that needs pickle is refused (:func:`read_pickle_free`).

Image sets are never needed whole: :func:`summarise` runs the feature network batch by batch into
:class:`FeatureStats` (float64 sums for FID's mean and covariance, the Inception Score per split as torch-fidelity
splits, and the features of a bounded, seeded subset of images for KID and precision/recall). Statistics of
disjoint parts of a set merge exactly (sharded generation), and :func:`fidelity_from_stats` computes the metrics
with torch-fidelity's own functions. :func:`fidelity_metrics` is that path for in-memory tensors.

Reference statistics can be cached on disk: pass ``cache_dir`` and a ``cache_name`` built by
:func:`reference_cache_name` (it hashes the reference data and the extractor name). The cache is an ``.npz``
with ``mu``/``sigma`` -- the ADM/JiT reference-batch format, which :meth:`FeatureStats.load` also reads -- and
is read without pickle.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import logging
import math
import os
import pickle
import threading
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..devices import autocast, autocast_dtype_for, resolve_device
from ..io import atomic_torch_save, atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "MetricsError",
    "FeatureClassifier",
    "train_feature_classifier",
    "save_classifier",
    "load_classifier",
    "classifier_fingerprint",
    "tensor_hash",
    "register_own_extractor",
    "reference_cache_name",
    "fidelity_metrics",
    "psnr",
    "ssim",
    "conditional_accuracy",
    "METRIC_KEYS",
    "INCEPTION_EXTRACTOR",
    "read_pickle_free",
    "to_feature_input",
    "FeatureNet",
    "build_feature_net",
    "StatsPlan",
    "FeatureStats",
    "summarise",
    "tensor_batches",
    "frechet_distance",
    "fidelity_from_stats",
    "cached_stats",
]

#: keys of the dict returned by :func:`fidelity_metrics` (always all present; ``None`` = not computed)
METRIC_KEYS = ("fid", "kid_mean", "kid_std", "precision", "recall", "isc_mean", "isc_std")
#: torch-fidelity's name of the standard FID Inception network
INCEPTION_EXTRACTOR = "inception-v3-compat"

_CLASSIFIER_FORMAT = "unite-feature-classifier/1"
_OWN_PREFIX = "unite-own-"
_FIX_HINT = "run the `classifier` stage / `unite evaluate` to (re)create it"


class MetricsError(RuntimeError):
    """A user-facing error of the metrics code (one-line message that says what to do)."""


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_images(x: Any, what: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise MetricsError(f"{what}: expected a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise MetricsError(f"{what}: expected shape (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise MetricsError(f"{what}: expected 1 or 3 channels, got {c} (shape {tuple(x.shape)})")
    if h < 8 or w < 8:
        raise MetricsError(f"{what}: images must be at least 8x8, got {h}x{w}")
    if not x.is_floating_point():
        raise MetricsError(f"{what}: expected float images in [0, 1], got dtype {x.dtype}")
    return x


def _check_range(x: torch.Tensor, what: str) -> None:
    """Reject NaN/inf and values clearly outside [0, 1] (e.g. [-1, 1] or [0, 255] images)."""
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise MetricsError(f"{what}: images contain NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -0.25 or hi > 1.25:
        raise MetricsError(
            f"{what}: images must be in [0, 1] but span [{lo:.3g}, {hi:.3g}] (convert [-1, 1] or [0, 255] first)"
        )


def _to_classifier_input(x: torch.Tensor, channels: int, image_size: int) -> torch.Tensor:
    """Float [0, 1] (N, C, H, W) -> the classifier's channel count and resolution."""
    x = x.float()
    c = x.shape[1]
    if c != channels:
        if channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif c == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise MetricsError(f"cannot convert {c}-channel images for a {channels}-channel classifier")
    if x.shape[-2] != image_size or x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x


def tensor_hash(t: torch.Tensor, length: int = 16) -> str:
    """sha256 (hex, first ``length`` chars) of a tensor's shape, dtype and raw contents."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        flat = t.reshape(-1).view(torch.uint8).numpy()
        step = 1 << 24
        for i in range(0, flat.size, step):
            h.update(flat[i : i + step].tobytes())
    return h.hexdigest()[:length]


# ----------------------------------------------------------------------------------------------------------------
# the dataset's own classifier
# ----------------------------------------------------------------------------------------------------------------


class FeatureClassifier(nn.Module):
    """Small CNN classifier used as the dataset's own feature extractor.

    Three blocks (conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool) with ``width, 2*width, 4*width`` channels, global
    average pooling, a ``feature_dim``-d penultimate layer (Linear + ReLU; used, times ``feature_scale``, for
    FID/KID/precision-recall) and a linear head producing the logits (used for IS and for
    :func:`conditional_accuracy`). Inputs are float images in [0, 1]; the normalisation to [-1, 1] is done
    inside.
    """

    def __init__(self, channels: int, image_size: int, num_classes: int, *, width: int = 32, feature_dim: int = 128):
        super().__init__()
        if channels not in (1, 3):
            raise MetricsError(f"FeatureClassifier: channels must be 1 or 3, got {channels}")
        if image_size < 8:
            raise MetricsError(f"FeatureClassifier: image_size must be >= 8, got {image_size}")
        if num_classes < 2:
            raise MetricsError(f"FeatureClassifier: num_classes must be >= 2, got {num_classes}")
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.feature_dim = int(feature_dim)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        w = self.width
        self.body = nn.Sequential(block(self.channels, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, self.feature_dim)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        # multiplies the penultimate features handed to torch-fidelity so that real training images have a mean
        # squared feature of 1 (set by calibrate_feature_scale): keeps KID's polynomial kernel well conditioned
        # and FID in a sane range. Part of the state_dict, hence of the extractor's hash.
        self.register_buffer("feature_scale", torch.ones(()))

    @property
    def config(self) -> dict:
        return {
            "channels": self.channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(penultimate features (N, feature_dim), logits (N, num_classes))``."""
        h = self.body(x * 2.0 - 1.0)
        feat = F.relu(self.fc(self.pool(h).flatten(1)))
        return feat, self.head(self.dropout(feat))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def metric_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(penultimate features * feature_scale, logits)``: what the torch-fidelity extractor computes."""
        feat, logits = self.forward_features(x)
        return feat * self.feature_scale, logits

    @torch.no_grad()
    def calibrate_feature_scale(self, x: torch.Tensor, batch_size: int = 512) -> float:
        """Set ``feature_scale`` so that the mean squared penultimate feature over ``x`` is 1; returns it."""
        was_training = self.training
        self.eval()
        dev = self.feature_scale.device
        total, count = 0.0, 0
        for i in range(0, len(x), batch_size):
            feat = self.features(x[i : i + batch_size].to(dev).float()).double()
            total += float(feat.pow(2).sum())
            count += feat.numel()
        self.train(was_training)
        mean_sq = total / max(1, count)
        scale = 1.0 / math.sqrt(mean_sq) if mean_sq > 0 else 1.0
        self.feature_scale.fill_(scale)
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


def _random_affine(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Light per-image random affine: rotation within +-10 degrees, scale within +-10%, translation within
    +-max_shift pixels (bilinear, edge-replicated borders)."""
    n, _, h, w = x.shape

    def uniform() -> torch.Tensor:
        return torch.rand(n, generator=gen, device=gen.device) * 2.0 - 1.0

    angle = uniform() * math.radians(10.0)
    scale = 1.0 + 0.1 * uniform()
    tx = uniform() * (2.0 * max_shift / w)  # affine_grid coordinates span 2 over the image
    ty = uniform() * (2.0 * max_shift / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 512) -> float:
    if len(x) == 0:
        return float("nan")
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        yb = y[i : i + batch_size].to(device)
        correct += int((model(xb).argmax(dim=1) == yb).sum())
    return correct / len(x)


def train_feature_classifier(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: bool = True,
    bf16: bool | None = None,
    num_classes: int | None = None,
    log_every: int = 250,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[FeatureClassifier, dict]:
    """Train a :class:`FeatureClassifier` on the dataset itself.

    AdamW with a linear warm-up (5% of the steps) and cosine decay; batches are drawn from per-epoch random
    permutations; ``augment`` applies a light random affine per image (shift up to ``image_size // 16`` pixels,
    >= 1; rotation +-10 degrees; scale +-10%).
    ``bf16=None`` uses bf16 autocast where the hardware supports it (fast path on recent CPUs); the loss is
    computed in fp32. Fully determined by ``seed`` (its own generators; the global RNG state is restored).

    ``on_step(step, loss)`` (optional) is called after every optimizer step (progress display).

    Returns ``(model in eval mode on device, {"val_accuracy", "train_accuracy", "steps", "seconds"})``.
    """
    train_x = _check_images(train_x, "train_x")
    val_x = _check_images(val_x, "val_x")
    if train_x.shape[-1] != train_x.shape[-2]:
        raise MetricsError(f"train_x: images must be square, got {tuple(train_x.shape[-2:])}")
    if val_x.shape[1:] != train_x.shape[1:]:
        raise MetricsError(f"val_x shape {tuple(val_x.shape)} does not match train_x {tuple(train_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise MetricsError("train/val images and labels have different lengths")
    if len(train_x) == 0:
        raise MetricsError("train_x is empty")
    if steps < 1:
        raise MetricsError(f"steps must be >= 1, got {steps}")
    dev = resolve_device(device, setting="device")
    amp = autocast_dtype_for("auto" if bf16 is None else "bf16" if bf16 else "fp32", dev)
    train_y = train_y.long()
    val_y = val_y.long()
    if num_classes is None:
        num_classes = int(max(int(train_y.max()), int(val_y.max()) if len(val_y) else 0)) + 1

    # own RNG state for init, dropout and batching: deterministic per seed, global RNG state untouched
    fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        return _train_loop(
            train_x, train_y, val_x, val_y, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            seed=seed, dev=dev, augment=augment, amp=amp, num_classes=num_classes, log_every=log_every,
            on_step=on_step,
        )


def _train_loop(train_x, train_y, val_x, val_y, *, steps, batch_size, lr, weight_decay, seed, dev, augment, amp,
                num_classes, log_every, on_step=None) -> tuple[FeatureClassifier, dict]:
    channels, image_size = int(train_x.shape[1]), int(train_x.shape[-1])
    model = FeatureClassifier(channels, image_size, num_classes)
    model.to(dev)

    xs = train_x.detach().float().to(dev)
    ys = train_y.to(dev)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    max_shift = max(1, image_size // 16)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    warmup = max(1, int(0.05 * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    logger.info(
        "training FeatureClassifier: %d train / %d val images %dx%dx%d, %d classes, %d steps, batch %d, bf16=%s, %s",
        len(xs), len(val_x), channels, image_size, image_size, num_classes, steps, batch_size, amp is not None, dev,
    )

    t0 = time.perf_counter()
    model.train()
    perm = torch.randperm(len(xs), generator=gen)
    pos = 0
    bs = min(batch_size, len(xs))
    running = 0.0
    for step in range(steps):
        if pos + bs > len(xs):
            perm = torch.randperm(len(xs), generator=gen)
            pos = 0
        idx = perm[pos : pos + bs].to(dev)
        pos += bs
        xb, yb = xs[idx], ys[idx]
        if augment:
            xb = _random_affine(xb, max_shift, gen)
        with autocast(dev, amp):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_loss = float(loss.detach())
        running += step_loss
        if on_step is not None:
            on_step(step + 1, step_loss)
        if log_every and (step + 1) % log_every == 0:
            logger.info("classifier step %d/%d loss %.4f", step + 1, steps, running / log_every)
            running = 0.0
    seconds = time.perf_counter() - t0

    model.eval()
    scale = model.calibrate_feature_scale(train_x.detach())
    val_acc = _accuracy(model, val_x.detach().float(), val_y, dev)
    train_acc = _accuracy(model, train_x.detach().float(), train_y, dev)
    logger.info(
        "FeatureClassifier: val acc %.4f, train acc %.4f, %.1f s (feature scale %.4g)",
        val_acc, train_acc, seconds, scale,
    )
    return model, {"val_accuracy": val_acc, "train_accuracy": train_acc, "steps": int(steps), "seconds": seconds}


def _plain_meta(meta: dict) -> dict:
    try:
        return json.loads(json.dumps(meta, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise MetricsError(f"classifier metadata must be plain JSON-like values (str/int/float/bool/list/dict): {e}")


def save_classifier(model: FeatureClassifier, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Save ``model``'s state_dict plus plain metadata (architecture keys are filled in from the model).

    ``meta`` should carry e.g. ``val_accuracy`` and ``data_hash`` (see :func:`tensor_hash`). The write is atomic.
    """
    if not isinstance(model, FeatureClassifier):
        raise MetricsError(f"save_classifier expects a FeatureClassifier, got {type(model).__name__}")
    merged = _plain_meta(dict(meta or {}))
    for k, v in model.config.items():
        if k in merged and merged[k] != v:
            logger.warning("save_classifier: meta[%r]=%r overridden by the model's %r", k, merged[k], v)
        merged[k] = v
    payload = {
        "format": _CLASSIFIER_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": merged,
    }
    atomic_torch_save(payload, path)
    logger.info("saved feature classifier to %s", path)


def load_classifier(path: str | os.PathLike) -> tuple[FeatureClassifier, dict]:
    """Load a classifier written by :func:`save_classifier` (``weights_only=True``). Returns ``(model, meta)``
    with the model in eval mode on the CPU. A missing or unreadable file raises :class:`MetricsError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricsError(f"feature classifier not found: {path}; {_FIX_HINT}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure means "corrupt"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MetricsError(
            f"cannot read feature classifier {path} ({type(e).__name__}: {first[:200]}); delete it and {_FIX_HINT}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != _CLASSIFIER_FORMAT:
        raise MetricsError(f"{path} is not a UNITE feature-classifier file; {_FIX_HINT}")
    meta = dict(payload.get("meta") or {})
    try:
        model = FeatureClassifier(
            int(meta["channels"]),
            int(meta["image_size"]),
            int(meta["num_classes"]),
            width=int(meta.get("width", 32)),
            feature_dim=int(meta.get("feature_dim", 128)),
        )
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MetricsError(f"feature classifier {path} is inconsistent ({first[:200]}); {_FIX_HINT}") from e
    model.eval()
    return model, meta


@torch.no_grad()
def conditional_accuracy(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to the requested class ``labels``.

    Images are converted to the classifier's channel count/resolution. The caller's module is not modified (a
    copy is used when it lives on another device; eval mode is restored to the previous state).
    """
    images = _check_images(images, "images")
    if len(images) != len(labels):
        raise MetricsError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise MetricsError("conditional_accuracy: no images")
    dev = resolve_device(device, setting="device")
    channels = getattr(classifier, "channels", images.shape[1])
    size = getattr(classifier, "image_size", images.shape[-1])
    param = next(classifier.parameters(), None)
    model = classifier if param is None or param.device == dev else copy.deepcopy(classifier).to(dev)
    was_training = model.training
    model.eval()
    try:
        correct = 0
        labels = labels.long()
        for i in range(0, len(images), batch_size):
            xb = _to_classifier_input(images[i : i + batch_size].to(dev), channels, size)
            pred = model(xb).argmax(dim=1)
            correct += int((pred == labels[i : i + batch_size].to(dev)).sum())
    finally:
        model.train(was_training)
    return correct / len(images)


# ----------------------------------------------------------------------------------------------------------------
# torch-fidelity integration
# ----------------------------------------------------------------------------------------------------------------

_OWN_CLASSIFIERS: dict[str, nn.Module] = {}
_REGISTRY_LOCK = threading.Lock()


def _fidelity():
    try:
        import torch_fidelity
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    except Exception as e:  # noqa: BLE001
        raise MetricsError(f"torch-fidelity is not importable ({type(e).__name__}: {e}); install torch-fidelity==0.4.0")
    return torch_fidelity, FEATURE_EXTRACTORS_REGISTRY


def _make_own_extractor_class():
    torch_fidelity, _ = _fidelity()

    class OwnFeatureExtractor(torch_fidelity.FeatureExtractorBase):
        """torch-fidelity wrapper around a registered :class:`FeatureClassifier` (looked up by name)."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            if name not in _OWN_CLASSIFIERS:
                raise MetricsError(f"feature extractor {name!r} was not registered with register_own_extractor")
            self.classifier = copy.deepcopy(_OWN_CLASSIFIERS[name])
            self.channels = int(self.classifier.channels)
            self.image_size = int(self.classifier.image_size)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return ("penultimate", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise MetricsError(f"own extractor expects uint8 (N, 3, H, W) input, got {getattr(x, 'shape', x)}")
            xf = _to_classifier_input(x.float() / 255.0, self.channels, self.image_size)
            if hasattr(self.classifier, "metric_features"):
                feat, logits = self.classifier.metric_features(xf)
            else:
                feat, logits = self.classifier.forward_features(xf)
            # float64: torch-fidelity computes KID's polynomial kernel in the features' dtype
            out = {"penultimate": feat.double(), "logits": logits.double()}
            return tuple(out[name] for name in self.features_list)

    return OwnFeatureExtractor


_OWN_EXTRACTOR_CLASS = None


def classifier_fingerprint(classifier: nn.Module) -> str:
    """sha256 (hex) of a classifier's architecture config and every tensor of its state_dict."""
    h = hashlib.sha256()
    cfg = getattr(classifier, "config", None)
    h.update(f"{type(classifier).__name__}|{json.dumps(cfg, sort_keys=True)}|".encode())
    for k, v in sorted(classifier.state_dict().items()):
        h.update(k.encode())
        h.update(tensor_hash(v, length=64).encode())
    return h.hexdigest()


def register_own_extractor(classifier: nn.Module) -> str:
    """Register ``classifier`` (a :class:`FeatureClassifier`) as a torch-fidelity feature extractor.

    The returned name is ``"unite-own-<16 hex of the weights hash>"``; registering the same weights again
    returns the same name without error. A frozen CPU copy of the classifier is taken now, so later training of
    ``classifier`` does not change what the registered name computes.
    """
    global _OWN_EXTRACTOR_CLASS
    if not (isinstance(classifier, nn.Module) and hasattr(classifier, "forward_features")):
        raise MetricsError(
            "register_own_extractor expects a FeatureClassifier (with forward_features), "
            f"got {type(classifier).__name__}"
        )
    for attr in ("channels", "image_size"):
        if not hasattr(classifier, attr):
            raise MetricsError(f"register_own_extractor: classifier has no attribute {attr!r}")
    _, registry = _fidelity()
    name = _OWN_PREFIX + classifier_fingerprint(classifier)[:16]
    with _REGISTRY_LOCK:
        if _OWN_EXTRACTOR_CLASS is None:
            _OWN_EXTRACTOR_CLASS = _make_own_extractor_class()
        if name in _OWN_CLASSIFIERS and name in registry:
            return name
        frozen = copy.deepcopy(classifier).cpu().eval().requires_grad_(False)
        _OWN_CLASSIFIERS[name] = frozen
        if name not in registry:
            import torch_fidelity

            try:
                torch_fidelity.register_feature_extractor(name, _OWN_EXTRACTOR_CLASS)
            except ValueError:  # registered concurrently / by an earlier import of this module: same weights
                if name not in registry:
                    raise
        logger.debug("registered torch-fidelity feature extractor %s", name)
    return name


def reference_cache_name(reference: torch.Tensor, extractor_name: str) -> str:
    """Cache key for reference statistics: the extractor name plus a hash of the reference images.

    ``extractor_name`` is what :func:`register_own_extractor` returned (it already hashes the weights) or
    :data:`INCEPTION_EXTRACTOR`. Changing one pixel of ``reference`` or the extractor changes the name.
    """
    if not torch.is_tensor(reference):
        raise MetricsError(f"reference must be a tensor, got {type(reference).__name__}")
    safe = "".join(ch if (ch.isalnum() or ch in "-_.") else "_" for ch in str(extractor_name))
    ext_hash = hashlib.sha256(str(extractor_name).encode()).hexdigest()[:8]
    return f"ref-{tensor_hash(reference)}-{safe}-{ext_hash}"


# ----------------------------------------------------------------------------------------------------------------
# files torch-fidelity would unpickle: checked without pickle first
# ----------------------------------------------------------------------------------------------------------------

#: the fix named when eval.inception_weights is refused
INCEPTION_FIX = (
    "set eval.inception_weights to torch-fidelity's inception-v3-compat weights "
    "(weights-inception-2015-12-05-6726825d.pth, a plain state dict), or re-save your file as one with "
    "torch.save(model.state_dict(), path)"
)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    for marker in ("Unsupported global:", "Unsupported operand", "Trying to load unsupported GLOBAL"):
        pos = text.find(marker)  # torch's weights-only error: the useful part is deep inside a long message
        if pos >= 0:
            return text[pos:].splitlines()[0][:limit]
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def read_pickle_free(path: str | os.PathLike, what: str, fix: str) -> bytes:
    """The bytes of a torch file that loads with ``torch.load(weights_only=True)``, else one MetricsError line.

    torch-fidelity loads Inception weights (and its own feature cache) with ``weights_only=False``, i.e. with
    unrestricted pickle, which runs whatever code the file names. The file is read once and checked with
    ``weights_only=True``; the caller hands the *same bytes* on (``io.BytesIO``), so what is unpickled later is
    exactly what was checked. A file holding pickled Python objects, a corrupt or truncated file and an unreadable
    path each end in one line naming ``what``, the path and ``fix``.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MetricsError(f"{what} {p} cannot be read ({e.strerror or type(e).__name__}): {fix}") from None
    if not data:
        raise MetricsError(f"{what} {p} is empty: {fix}")
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "unsupported GLOBAL" in str(e):
            raise MetricsError(
                f"{what} {p} holds pickled Python objects ({_first_line(e)}) and is refused, since loading it would "
                f"run code from the file: {fix}"
            ) from None
        raise MetricsError(f"{what} {p} is not a readable torch file ({_first_line(e)}): {fix}") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong format, ...: all "not a torch file"
        raise MetricsError(
            f"{what} {p} is not a readable torch file ({type(e).__name__}: {_first_line(e)}): {fix}"
        ) from None
    return data


# ----------------------------------------------------------------------------------------------------------------
# feature networks
# ----------------------------------------------------------------------------------------------------------------


def to_feature_input(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] images (B, C, H, W) -> uint8 (B, 3, H, W), what torch-fidelity's extractors take
    (``round(255 x)``; grayscale repeated as a view)."""
    u8 = (x.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


class FeatureNet:
    """A torch-fidelity feature extractor on a device: uint8 (B, 3, H, W) -> (features, logits).

    ``features`` (the extractor's FID layer) feed FID, KID and precision/recall, ``logits`` (its IS layer) the
    Inception Score: the own classifier's scaled penultimate layer and logits, or inception-v3-compat's 2048-d
    pool features and ``logits_unbiased``, exactly what ``torch_fidelity.calculate_metrics`` would extract.
    ``name`` identifies the network (it hashes the own classifier's weights) for cache keys.
    """

    def __init__(self, module: nn.Module, name: str, device: torch.device):
        self.module = module
        self.name = name
        self.device = torch.device(device)
        self._dim: int | None = None

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = self.module(images_u8.to(self.device, non_blocking=True))
        if self._dim is None:
            self._dim = int(feats.shape[1])
        return feats, logits

    @property
    def dim(self) -> int:
        """Feature dimension (one dummy image through the network the first time it is asked)."""
        if self._dim is None:
            self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        return int(self._dim)


def build_feature_net(
    extractor: str = "own",
    *,
    classifier: nn.Module | None = None,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FeatureNet:
    """The feature network of ``extractor`` ("own": ``classifier``; "inception": torch-fidelity's
    inception-v3-compat from the local file ``inception_weights``, checked without pickle first), on ``device``."""
    dev = resolve_device(device, setting="device")
    _, registry = _fidelity()
    if extractor == "own":
        if classifier is None:
            raise MetricsError(f"extractor='own' needs the dataset's feature classifier; {_FIX_HINT}")
        name = register_own_extractor(classifier)
        cls = registry[name]
        module = cls(name, [cls.get_default_feature_layer_for_metric("fid"),
                            cls.get_default_feature_layer_for_metric("isc")])
    elif extractor == "inception":
        path = None if inception_weights is None else os.fspath(inception_weights)
        if not path or not os.path.isfile(path):
            raise MetricsError(
                f"extractor='inception' needs a readable local Inception-v3 weights file: set eval.inception_weights "
                f"(got {path!r}); nothing is downloaded -- or use extractor='own'"
            )
        data = read_pickle_free(path, "eval.inception_weights", INCEPTION_FIX)
        name = INCEPTION_EXTRACTOR
        cls = registry[name]
        layers = [cls.get_default_feature_layer_for_metric("fid"), cls.get_default_feature_layer_for_metric("isc")]
        try:  # the checked bytes, not the path: nothing else is unpickled
            module = cls(name, layers, feature_extractor_weights_path=io.BytesIO(data))
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise MetricsError(
                f"eval.inception_weights {path} is not an inception-v3-compat state dict ({_first_line(e)}): "
                f"{INCEPTION_FIX}"
            ) from None
    else:
        raise MetricsError(f"unknown extractor {extractor!r}: use 'own' or 'inception'")
    module = module.to(dev).eval().requires_grad_(False)
    return FeatureNet(module, name, dev)


# ----------------------------------------------------------------------------------------------------------------
# streaming statistics: FID moments, IS per split and a bounded feature subset, mergeable across processes
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _subset_mask(n: int, size: int, seed: int) -> torch.Tensor:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.RandomState(seed).choice(n, size, replace=False)] = True
    return torch.from_numpy(mask)


@functools.lru_cache(maxsize=16)
def _isc_split_of(n: int, splits: int, seed: int) -> torch.Tensor:
    # torch-fidelity's isc_features_to_metric: features[RandomState(seed).permutation(n)], then split k holds
    # positions [k n // S, (k + 1) n // S). Image i sits at the position where the permutation names it.
    perm = np.random.RandomState(seed).permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[perm] = np.arange(n)
    bounds = np.array([k * n // splits for k in range(splits + 1)], dtype=np.int64)
    return torch.from_numpy(np.searchsorted(bounds, position, side="right") - 1)


@dataclass(frozen=True)
class StatsPlan:
    """How a set of ``n`` images (indexed 0..n-1) is summarised, identically in every process holding a part.

    Every image adds to the FID moments; with ``isc_splits > 0`` its IS logits add to the split torch-fidelity
    would put it in (its shuffle seeded by ``seed``, then contiguous chunks), so the streamed Inception Score is
    torch-fidelity's. The features of at most ``subset_size`` images (all when ``None`` or ``n <= subset_size``;
    otherwise a random choice seeded by ``seed``) are kept for KID and precision/recall, whose cost grows with
    the square of the count.
    """

    n: int
    subset_size: int | None = None
    isc_splits: int = 0
    seed: int = 2020

    def __post_init__(self):
        if self.n < 1:
            raise MetricsError(f"StatsPlan: n must be >= 1, got {self.n}")
        if self.subset_size is not None and self.subset_size < 2:
            raise MetricsError(f"StatsPlan: subset_size must be >= 2, got {self.subset_size}")

    @property
    def kept(self) -> int:
        return self.n if self.subset_size is None else min(self.n, int(self.subset_size))

    def subset_mask(self, index: torch.Tensor) -> torch.Tensor:
        if self.kept >= self.n:
            return torch.ones(len(index), dtype=torch.bool)
        return _subset_mask(self.n, self.kept, self.seed)[index.cpu()]

    def isc_split(self, index: torch.Tensor) -> torch.Tensor:
        return _isc_split_of(self.n, min(self.isc_splits, self.n), self.seed)[index.cpu()]


@dataclass
class FeatureStats:
    """Streaming statistics of one image set under one feature network.

    ``update`` adds a batch (features, logits, the images' indices in the set), ``merge`` joins the statistics
    of disjoint parts of the set (shards computed by other processes) and gives what one pass over the whole set
    gives: sums in float64, kept features ordered by index. Memory is O(D^2 + subset x D + splits x classes),
    whatever the number of images. A reference given as statistics (an ADM/JiT ``.npz``) has ``given_mu`` /
    ``given_sigma`` and no sums.
    """

    n: int = 0
    total: Optional[torch.Tensor] = None  # (D,) float64: sum of the features
    outer: Optional[torch.Tensor] = None  # (D, D) float64: sum of their outer products
    subset_index: Optional[torch.Tensor] = None  # (m,) int64
    subset: Optional[torch.Tensor] = None  # (m, D), the extractor's dtype
    isc_p: Optional[torch.Tensor] = None  # (S, C) float64: per IS split, sum of p(y|x)
    isc_plogp: Optional[torch.Tensor] = None  # (S,) float64: per split, sum of sum_y p log p
    isc_count: Optional[torch.Tensor] = None  # (S,) int64
    given_mu: Optional[np.ndarray] = None
    given_sigma: Optional[np.ndarray] = None
    _parts: list = field(default_factory=list, repr=False)

    @torch.no_grad()
    def update(self, features: torch.Tensor, logits: torch.Tensor | None, index: torch.Tensor,
               plan: StatsPlan) -> None:
        if features.dim() != 2 or len(features) != len(index):
            raise MetricsError(f"FeatureStats.update: features {tuple(features.shape)} for {len(index)} indices")
        f64 = features.detach().double()
        if self.total is None:
            d = f64.shape[1]
            self.total = torch.zeros(d, dtype=torch.float64, device=f64.device)
            self.outer = torch.zeros(d, d, dtype=torch.float64, device=f64.device)
        self.total += f64.sum(0)
        self.outer.addmm_(f64.T, f64)
        self.n += len(f64)
        index = index.detach().long().cpu()
        mask = plan.subset_mask(index)
        if bool(mask.any()):
            self._parts.append((index[mask], features.detach()[mask.to(features.device)].cpu()))
        if plan.isc_splits and logits is not None:
            lg = logits.detach().double()
            if self.isc_p is None:
                s = min(plan.isc_splits, plan.n)
                self.isc_p = torch.zeros(s, lg.shape[1], dtype=torch.float64, device=lg.device)
                self.isc_plogp = torch.zeros(s, dtype=torch.float64, device=lg.device)
                self.isc_count = torch.zeros(s, dtype=torch.int64, device=lg.device)
            split = plan.isc_split(index).to(lg.device)
            p, logp = lg.softmax(dim=1), lg.log_softmax(dim=1)
            self.isc_p.index_add_(0, split, p)
            self.isc_plogp.index_add_(0, split, (p * logp).sum(1))
            self.isc_count.index_add_(0, split, torch.ones_like(split))

    def finish(self) -> "FeatureStats":
        """Everything on the CPU, kept features joined and ordered by index (call before sending or saving)."""
        parts = list(self._parts)
        if self.subset is not None:
            parts.insert(0, (self.subset_index, self.subset))
        if parts:
            idx = torch.cat([p[0] for p in parts])
            feats = torch.cat([p[1] for p in parts])
            order = torch.argsort(idx)
            self.subset_index, self.subset = idx[order], feats[order]
        self._parts = []
        for name in ("total", "outer", "isc_p", "isc_plogp", "isc_count"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v.cpu())
        return self

    @classmethod
    def merge(cls, parts: Sequence["FeatureStats"]) -> "FeatureStats":
        parts = [p.finish() for p in parts if p is not None and p.n > 0]
        out = cls()
        for p in parts:
            if p.given_mu is not None:
                raise MetricsError("FeatureStats.merge: statistics given as mu/sigma cannot be merged")
            out.n += p.n
            for name in ("total", "outer", "isc_p", "isc_plogp", "isc_count"):
                v, acc = getattr(p, name), getattr(out, name)
                if v is not None:
                    setattr(out, name, v.clone() if acc is None else acc + v)
            if p.subset is not None:
                out._parts.append((p.subset_index, p.subset))
        if len({int(p.total.shape[0]) for p in parts if p.total is not None}) > 1:
            raise MetricsError("FeatureStats.merge: parts have different feature dimensions")
        return out.finish()

    # -- results ---------------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        if self.given_mu is not None:
            return int(self.given_mu.shape[0])
        if self.total is None:
            raise MetricsError("no images were summarised")
        return int(self.total.shape[0])

    def mu(self) -> np.ndarray:
        if self.given_mu is not None:
            return self.given_mu
        if self.n < 1:
            raise MetricsError("no images were summarised")
        return (self.total.cpu() / self.n).numpy()

    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divisor n - 1, as numpy.cov / torch-fidelity)."""
        if self.given_sigma is not None:
            return self.given_sigma
        if self.n < 2:
            raise MetricsError(f"a covariance needs at least 2 images, got {self.n}")
        mu = torch.from_numpy(self.mu())
        return ((self.outer.cpu() - self.n * torch.outer(mu, mu)) / (self.n - 1)).numpy()

    def inception_score(self) -> tuple[float, float] | None:
        """(mean, std) over the IS splits, as torch-fidelity's isc_features_to_metric computes them."""
        if self.isc_p is None:
            return None
        scores = []
        for k in range(len(self.isc_count)):
            c = int(self.isc_count[k])
            if c == 0:
                continue
            q = self.isc_p[k].cpu() / c
            mean_kl = float(self.isc_plogp[k]) / c - float((q * torch.log(q)).sum())
            scores.append(math.exp(mean_kl))
        return float(np.mean(scores)), float(np.std(scores))

    # -- files -----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """An ``.npz`` (no pickle) with ``mu`` and ``sigma`` -- the ADM/JiT reference format, usable as
        eval.reference_stats -- plus ``n``, the kept features and ``meta`` (JSON). Written atomically."""
        self.finish()
        arrays = {"mu": self.mu(), "sigma": self.sigma(), "n": np.asarray(self.n, dtype=np.int64),
                  "meta": np.asarray(json.dumps(meta or {}, sort_keys=True))}
        if self.subset is not None:
            arrays["subset"] = self.subset.numpy()
            arrays["subset_index"] = self.subset_index.numpy()
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike, *, what: str = "statistics file",
             fix: str = "") -> tuple["FeatureStats", dict]:
        """Read ``mu``/``sigma`` (and, when present, ``n``, kept features, ``meta``) from an ``.npz`` without
        pickle. Returns (stats with given_mu/given_sigma, meta)."""
        p = os.fspath(path)
        fix = fix or "delete it; it is recomputed"
        if os.path.isfile(p) and not zipfile.is_zipfile(p):
            raise MetricsError(f"{what} {p} is not an .npz (zip) file: {fix}")
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = set(z.files)
                missing = {"mu", "sigma"} - keys
                if missing:
                    found = ", ".join(sorted(keys)) or "none"
                    raise MetricsError(
                        f"{what} {p} has no {' / '.join(sorted(missing))} array (found: {found}); it must hold "
                        f"'mu' (D,) and 'sigma' (D, D) like the ADM/JiT reference batches: {fix}"
                    )
                mu = np.asarray(z["mu"], dtype=np.float64)
                sigma = np.asarray(z["sigma"], dtype=np.float64)
                n = int(z["n"]) if "n" in keys else 0
                meta = json.loads(str(z["meta"])) if "meta" in keys else {}
                subset = torch.from_numpy(np.array(z["subset"])) if "subset" in keys else None
                subset_index = torch.from_numpy(np.array(z["subset_index"])).long() if "subset_index" in keys else None
        except MetricsError:
            raise
        except FileNotFoundError:
            raise MetricsError(f"{what} {p} does not exist: {fix}") from None
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise MetricsError(f"{what} {p} holds pickled Python objects and is refused "
                                   f"(loading it would run code from the file): {fix}") from None
            raise MetricsError(f"{what} {p} is not a readable .npz ({_first_line(e)}): {fix}") from None
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise MetricsError(
                f"{what} {p} is not a readable .npz ({type(e).__name__}: {_first_line(e)}): {fix}") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise MetricsError(
                f"{what} {p}: 'mu' must be (D,) and 'sigma' (D, D), got {mu.shape} and {sigma.shape}: {fix}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise MetricsError(f"{what} {p} holds NaN or inf values: {fix}")
        stats = cls(n=n, given_mu=mu, given_sigma=sigma, subset=subset, subset_index=subset_index)
        return stats, meta


def summarise(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], net: FeatureNet, plan: StatsPlan) -> FeatureStats:
    """FeatureStats of ``(index, float [0, 1] images)`` batches under ``net``, one batch in memory at a time."""
    stats = FeatureStats()
    for index, images in batches:
        feats, logits = net(to_feature_input(images))
        stats.update(feats, logits, index, plan)
    return stats.finish()


def tensor_batches(images: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(index, images[i:i + batch_size])`` over an in-memory image tensor."""
    for start in range(0, len(images), batch_size):
        stop = min(len(images), start + batch_size)
        yield torch.arange(start, stop), images[start:stop]


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sets of statistics (torch-fidelity's fid_statistics_to_metric, in float64)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.dim != b.dim:
        raise MetricsError(f"cannot compare {a.dim}-d with {b.dim}-d feature statistics (different feature networks)")
    sa = {"mu": a.mu().astype(np.float64), "sigma": a.sigma().astype(np.float64)}
    sb = {"mu": b.mu().astype(np.float64), "sigma": b.sigma().astype(np.float64)}
    return float(fid_statistics_to_metric(sa, sb, verbose=False)[KEY_METRIC_FID])


def fidelity_from_stats(
    generated: FeatureStats,
    reference: FeatureStats,
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc: bool = True,
    prc_neighborhood: int = 3,
    isc: bool = True,
    seed: int = 2020,
    device: str | torch.device = "cpu",
) -> dict:
    """FID, KID, precision/recall and IS from statistics (keys :data:`METRIC_KEYS`; ``None`` = not computed).

    FID uses every image's moments, IS every generated image. KID and precision/recall use the kept features
    (``StatsPlan.subset_size``), through torch-fidelity's kid/prc functions with ``seed``; they are ``None``
    when either side kept fewer than 2 (a reference given only as mu/sigma). Subset size and neighbourhood are
    clamped to small counts as in :func:`fidelity_metrics`.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    out = dict.fromkeys(METRIC_KEYS)
    out["fid"] = frechet_distance(generated, reference)
    g, r = generated.subset, reference.subset
    if g is not None and r is not None and min(len(g), len(r)) >= 2:
        n_min = min(len(g), len(r))
        kid_size = min(int(kid_subset_size), n_min)
        if kid_size < int(kid_subset_size):
            logger.info("KID subset size clamped from %d to %d (kept features: generated=%d, reference=%d)",
                        kid_subset_size, kid_size, len(g), len(r))
        kid = kid_features_to_metric(g, r, kid_subsets=int(kid_subsets), kid_subset_size=kid_size,
                                     rng_seed=int(seed), verbose=False)
        out["kid_mean"], out["kid_std"] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
        if prc:
            k = int(prc_neighborhood)
            if k >= n_min:
                k = n_min - 1
                logger.info("precision/recall neighbourhood clamped from %d to %d (n=%d)", prc_neighborhood, k, n_min)
            dev = resolve_device(device, setting="device")  # cdist of the kept features: the accelerator when there is one
            m = prc_features_to_metric(g.to(dev), r.to(dev), prc_neighborhood=k, prc_batch_size=10000,
                                       save_cpu_ram=True, verbose=False)
            out["precision"], out["recall"] = m[KEY_METRIC_PRECISION], m[KEY_METRIC_RECALL]
    elif g is not None:
        logger.info("KID and precision/recall not computed: the reference has no kept features (statistics only)")
    if isc:
        score = generated.inception_score()
        if score is not None:
            out["isc_mean"], out["isc_std"] = score
    return {k: (None if v is None else float(v)) for k, v in out.items()}


def cached_stats(path: str | os.PathLike | None, meta: dict, compute) -> FeatureStats:
    """``compute()`` once, kept at ``path`` (``.npz``, no pickle) with ``meta``; a file whose meta differs is
    recomputed, an unreadable one is replaced (with a warning)."""
    if path is None:
        return compute()
    p = os.fspath(path)
    if os.path.isfile(p):
        try:
            stats, saved = FeatureStats.load(p, what="cached reference statistics")
            if saved == json.loads(json.dumps(meta, sort_keys=True)):
                logger.debug("reference statistics read from %s", p)
                return stats
            logger.info("cached reference statistics %s were made with other settings: recomputing", p)
        except MetricsError as e:
            logger.warning("%s: recomputing", e)
    stats = compute()
    stats.save(p, meta)
    logger.debug("reference statistics cached at %s", p)
    return stats


def fidelity_metrics(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    extractor: str = "own",
    classifier: nn.Module | None = None,
    inception_weights: str | os.PathLike | None = None,
    cache_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc: bool = True,
    prc_neighborhood: int = 3,
    isc: bool = True,
    isc_splits: int = 10,
    batch_size: int = 128,
    seed: int = 2020,
    device: str | torch.device = "cpu",
    subset_size: int | None = None,
    net: FeatureNet | None = None,
) -> dict:
    """FID, KID, precision/recall and IS of ``generated`` against ``reference`` (in-memory [0, 1] images).

    ``extractor="own"`` needs ``classifier`` (penultimate features for FID/KID/PRC, logits for IS);
    ``extractor="inception"`` needs ``inception_weights``, a readable local file (config ``eval.inception_weights``)
    that loads without pickle. ``net`` (a :class:`FeatureNet`) replaces both. Features are computed in batches of
    ``batch_size`` and summarised as they come (:class:`FeatureStats`); the numbers are torch-fidelity's
    (``calculate_metrics`` on the same images gives the same FID/KID/PRC/IS up to float rounding). KID and
    precision/recall use every image, or a seeded subset of ``subset_size`` per side when given.
    Reference statistics are cached under ``cache_dir`` as ``<cache_name>.npz`` only when both are given (build
    ``cache_name`` with :func:`reference_cache_name`).

    Small sample counts are handled: ``kid_subset_size`` is clamped to ``min(n_generated, n_reference)``, the
    precision/recall neighbourhood ``k`` to ``n - 1`` and the IS splits to ``n_generated``.

    Returns a dict with exactly the keys :data:`METRIC_KEYS`; metrics not requested (``prc=False``,
    ``isc=False``) are ``None``. Precision is the fraction of generated samples inside the reference manifold,
    recall the fraction of reference samples inside the generated manifold.
    """
    generated = _check_images(generated, "generated")
    reference = _check_images(reference, "reference")
    _check_range(generated, "generated")
    _check_range(reference, "reference")
    n1, n2 = len(generated), len(reference)
    if n1 < 2 or n2 < 2:
        raise MetricsError(f"FID/KID need at least 2 images per set, got generated={n1}, reference={n2}")
    cache = cache_name is not None and cache_dir is not None
    if cache_name is not None and cache_dir is None:
        logger.warning("cache_name given without cache_dir: reference statistics are not cached")
    if cache and (os.sep in cache_name or (os.altsep and os.altsep in cache_name) or cache_name.strip() != cache_name):
        raise MetricsError(f"cache_name {cache_name!r} must not contain path separators or blanks")
    if net is None:
        net = build_feature_net(extractor, classifier=classifier, inception_weights=inception_weights, device=device)
    splits = int(isc_splits)
    if isc and splits > n1:
        splits = n1
        logger.info("IS splits clamped from %d to %d (generated=%d)", isc_splits, splits, n1)
    bs = max(1, int(batch_size))
    t0 = time.perf_counter()
    gen = summarise(tensor_batches(generated, bs), net,
                    StatsPlan(n1, subset_size, isc_splits=max(1, splits) if isc else 0, seed=int(seed)))
    ref_plan = StatsPlan(n2, subset_size, seed=int(seed))
    path = os.path.join(os.fspath(cache_dir), cache_name + ".npz") if cache else None
    ref = cached_stats(path, {"extractor": net.name, "n": n2, "subset_size": subset_size, "seed": int(seed)},
                       lambda: summarise(tensor_batches(reference, bs), net, ref_plan))
    out = fidelity_from_stats(gen, ref, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, prc=prc,
                              prc_neighborhood=prc_neighborhood, isc=isc, seed=seed, device=net.device)
    logger.info(
        "fidelity metrics (%s, generated=%d, reference=%d) in %.1f s: %s",
        net.name, n1, n2, time.perf_counter() - t0, out,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# reconstruction metrics
# ----------------------------------------------------------------------------------------------------------------


def _pair(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise MetricsError(f"{what}: expected two tensors")
    if x.shape != y.shape:
        raise MetricsError(f"{what}: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 4:
        raise MetricsError(f"{what}: expected (N, C, H, W) images, got shape {tuple(x.shape)}")
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1.0: ``10 * log10(1 / mse)`` with the MSE over C, H, W.

    Identical images give ``+inf`` (not capped): aggregate with care (e.g. a median, or drop/clip infinities).
    Computed in float64, returned as float32 of shape (N,).
    """
    x, y = _pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(1.0 / mse)).float()  # mse == 0 -> +inf


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) for data range 1.0, shape (N,).

    Gaussian window 11 / sigma 1.5, ``C1 = (0.01)^2``, ``C2 = (0.03)^2``, 'valid' filtering (no padding), SSIM
    map averaged over channels and positions. Images smaller than the window use the largest odd window that
    fits (sigma unchanged). Computed in float64, returned as float32.
    """
    x, y = _pair(x, y, "ssim")
    n, c, h, w = x.shape
    win = min(int(window_size), h, w)
    if win % 2 == 0:
        win -= 1
    if win < 1:
        raise MetricsError(f"ssim: images too small ({h}x{w})")
    xd, yd = x.double(), y.double()
    g = _gaussian_window(win, sigma, torch.float64, x.device)
    kh = g.view(1, 1, win, 1).expand(c, 1, win, 1)
    kw = g.view(1, 1, 1, win).expand(c, 1, 1, win)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    c1, c2 = k1**2, k2**2
    mu_x, mu_y = filt(xd), filt(yd)
    sxx = filt(xd * xd) - mu_x**2
    syy = filt(yd * yd) - mu_y**2
    sxy = filt(xd * yd) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(dim=1).float()
