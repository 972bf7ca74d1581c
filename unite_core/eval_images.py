"""Evaluation of a trained UNITE image model: generation (guidance sweep), reconstruction, noise floor.
Over 500 lines because the image sources, the sharded generation and the metric passes share one streaming design.

Pure library code: plain PyTorch + ``unite_core.metrics.images`` (torch-fidelity), logging only.

Conventions
- Every image tensor passed to or returned by this module is float ``(N, C, H, W)`` in ``[0, 1]`` (the
  metrics convention); the model's own pixel range (model.pixel_range) is handled inside (``evaluate_reconstruction``).
- Image sets are read in batches and summarised as they come (``FeatureStats``: FID moments, IS per split, a
  bounded subset of features for KID and precision/recall), so memory does not grow with the number of images:
  50,000 generated 256x256 images are never held at once, only the few kept for pictures (as uint8). A set is
  a tensor, an :class:`ImageSource` (a dataset read with DataLoader workers) or, for a reference, statistics.
- Generation uses class-balanced labels (equal count per class, see ``unite_core.model.balanced_labels``),
  batches at fixed positions (batch b holds samples [b B, (b+1) B)) and per-sample noise: sample i starts from
  noise drawn from its own generator, seeded by (seed, i). So every guidance scale starts from the same noise,
  and a run split into shards (batch b on shard b mod S, one process or Ray worker each) generates exactly the
  images of a single-process run; shard statistics merge on the driver (``ShardResult.merge``).
- Which weights are evaluated (EMA or raw) is the caller's choice: pass the model you want measured.
- gFID / KID / precision / recall / IS compare generated samples with the *training* set (or with reference
  statistics, e.g. an ADM/JiT ``.npz``); rFID compares reconstructions of the validation set with the
  validation set itself. The noise floor is FID(val vs the reference): the FID a perfect generator would get
  with this many samples and this feature network.
- Reference statistics are cached under ``cache_dir`` (``.npz``, no pickle) with a name that hashes the
  reference images and the feature extractor: changing either recomputes them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .devices import autocast
from .metrics.images import (
    INCEPTION_EXTRACTOR,
    FeatureNet,
    FeatureStats,
    MetricsError,
    StatsPlan,
    _to_classifier_input,
    build_feature_net,
    cached_stats,
    fidelity_from_stats,
    frechet_distance,
    psnr,
    reference_cache_name,
    register_own_extractor,
    ssim,
    summarise,
    tensor_batches,
    tensor_hash,
    to_feature_input,
)
from .model import balanced_labels

log = logging.getLogger(__name__)

__all__ = [
    "CURVE_KEYS",
    "PSNR_CAP_DB",
    "FeatureSpec",
    "ImageSource",
    "TensorSource",
    "DatasetSource",
    "NoiseSource",
    "as_source",
    "dataset_images",
    "sample_noise",
    "generation_batches",
    "iter_generated",
    "generate_balanced",
    "GenerationJob",
    "ShardResult",
    "run_generation_shard",
    "LocalRunner",
    "evaluate_generation",
    "evaluate_reconstruction",
    "reference_with_stats_file",
    "noise_floor",
    "fid_noise",
    "evaluate_images",
]

#: columns of one guidance-curve row (``evaluate_generation(...)["curve"]``)
CURVE_KEYS = ("cfg_scale", "fid", "kid_mean", "kid_std", "precision", "recall", "isc_mean",
              "conditional_accuracy", "seconds")
#: identical images have infinite PSNR; per-image values are capped here before averaging
PSNR_CAP_DB = 100.0
#: default number of images per side whose features are kept for KID and precision/recall (eval.feature_subset)
FEATURE_SUBSET = 10_000


# ----------------------------------------------------------------------------------------------
# Image sets read in batches
# ----------------------------------------------------------------------------------------------
class ImageSource:
    """A set of images read in batches: ``len()``, ``batches(batch_size)`` yielding (index (B,) int64,
    float [0, 1] images (B, C, H, W) on the CPU) in index order, ``shape`` (C, H, W) and ``key``, a string
    that changes when the images do (cache names)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def key(self) -> str:
        raise NotImplementedError


class TensorSource(ImageSource):
    """An in-memory [0, 1] image tensor."""

    def __init__(self, images: torch.Tensor):
        if not torch.is_tensor(images) or images.dim() != 4:
            raise MetricsError(f"expected images (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
        self.images = images
        self._key: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int):
        return tensor_batches(self.images, batch_size)

    @property
    def shape(self):
        return tuple(self.images.shape[1:])

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = tensor_hash(self.images)
        return self._key


class _DatasetBatches(torch.utils.data.Dataset):
    """Batch ``b`` of ``indices`` of an image dataset (what one DataLoader worker builds): uint8 pixels when the
    dataset offers them (``get_raw_batch``: image folders and shards), else [0, 1] floats."""

    def __init__(self, dataset, indices: np.ndarray, batch_size: int):
        self.dataset, self.indices, self.batch_size = dataset, indices, int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, b: int):
        start = int(b) * self.batch_size
        idx = self.indices[start:start + self.batch_size]
        raw = getattr(self.dataset, "get_raw_batch", None)
        if raw is not None:
            return start, raw(idx).pixels
        x, _ = self.dataset.get_batch(torch.as_tensor(idx))
        return start, ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0)


class DatasetSource(ImageSource):
    """Items ``indices`` (default: all, in order) of an image dataset (items in [-1, 1], as the data module
    gives them), read batch by batch; lazy sets (image folders, shards) are decoded by ``num_workers``
    DataLoader processes. ``key`` must identify the content (e.g. the data content hash, split and subset)."""

    def __init__(self, dataset, indices=None, *, key: str, num_workers: int = 0):
        self.dataset = dataset
        self.indices = (np.arange(len(dataset), dtype=np.int64) if indices is None
                        else np.asarray(indices, dtype=np.int64))
        if len(self.indices) == 0:
            raise MetricsError("the dataset is empty: nothing to evaluate against")
        self._key = str(key)
        self.num_workers = int(num_workers) if getattr(dataset, "lazy", False) else 0

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int):
        loader = torch.utils.data.DataLoader(
            _DatasetBatches(self.dataset, self.indices, batch_size), batch_size=None, shuffle=False,
            num_workers=self.num_workers, prefetch_factor=2 if self.num_workers else None,
        )
        for start, x in loader:
            if x.dtype == torch.uint8:
                x = x.float() / 255.0
            yield torch.arange(int(start), int(start) + len(x)), x

    @property
    def shape(self):
        x, _ = self.dataset.get_batch(torch.as_tensor(self.indices[:1]))
        return tuple(x.shape[1:])

    @property
    def key(self) -> str:
        return self._key


class NoiseSource(ImageSource):
    """``n`` uniform-noise images of ``shape``, drawn batch by batch from one generator seeded by ``seed``."""

    def __init__(self, n: int, shape: Sequence[int], seed: int = 0):
        self.n, self._shape, self.seed = int(n), tuple(int(s) for s in shape), int(seed)

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int):
        g = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, batch_size):
            b = min(batch_size, self.n - start)
            yield torch.arange(start, start + b), torch.rand((b, *self._shape), generator=g)

    @property
    def shape(self):
        return self._shape

    @property
    def key(self) -> str:
        return f"noise-{self.n}-{'x'.join(map(str, self._shape))}-{self.seed}"


def as_source(images) -> ImageSource:
    """A tensor or an ImageSource as an ImageSource."""
    if isinstance(images, ImageSource):
        return images
    if torch.is_tensor(images):
        return TensorSource(images)
    raise MetricsError(f"expected an image tensor or an ImageSource, got {type(images).__name__}")


# ----------------------------------------------------------------------------------------------
# Feature extractor choice, shared by every FID-type call
# ----------------------------------------------------------------------------------------------
@dataclass
class FeatureSpec:
    """Which network computes FID/KID/PRC/IS features, how sets are summarised, where reference statistics
    are cached.

    extractor="own" needs ``classifier`` (the dataset's FeatureClassifier); "inception" needs
    ``inception_weights`` (a local file that loads without pickle; nothing is downloaded). ``cache_dir=None``
    disables caching. ``subset_size`` bounds the images per side whose features are kept for KID and
    precision/recall (None: all); FID and IS always use every image. The network is built once, on first use.
    """

    extractor: str = "own"
    classifier: Optional[nn.Module] = None
    inception_weights: Optional[str] = None
    cache_dir: Optional[str] = None
    kid_subset_size: int = 1000
    batch_size: int = 128
    device: str | torch.device = "cpu"
    subset_size: Optional[int] = FEATURE_SUBSET
    kid_subsets: int = 100
    isc_splits: int = 10
    prc_neighborhood: int = 3
    seed: int = 2020
    _net: Optional[FeatureNet] = field(default=None, repr=False, compare=False)

    def net(self) -> FeatureNet:
        if self._net is None:
            if self.extractor not in ("own", "inception"):
                raise MetricsError(f"unknown feature extractor {self.extractor!r}: use "
                                   "eval.feature_extractor=own|inception")
            if self.extractor == "own" and self.classifier is None:
                raise MetricsError("extractor='own' needs the dataset's feature classifier (models/classifier.pt); "
                                   "run the `classifier` stage first")
            self._net = build_feature_net(self.extractor, classifier=self.classifier,
                                          inception_weights=self.inception_weights, device=self.device)
        return self._net

    def extractor_name(self) -> str:
        if self.extractor == "own":
            if self.classifier is None:
                raise MetricsError("extractor='own' needs the dataset's feature classifier (models/classifier.pt); "
                                   "run the `classifier` stage first")
            return register_own_extractor(self.classifier)
        if self.extractor == "inception":
            return INCEPTION_EXTRACTOR
        raise MetricsError(f"unknown feature extractor {self.extractor!r}: use eval.feature_extractor=own|inception")

    def cache_name(self, reference) -> Optional[str]:
        if self.cache_dir is None:
            return None
        if torch.is_tensor(reference):
            return reference_cache_name(reference, self.extractor_name())
        if isinstance(reference, TensorSource):
            return reference_cache_name(reference.images, self.extractor_name())
        name = self.extractor_name()
        safe = "".join(ch if (ch.isalnum() or ch in "-_.") else "_" for ch in name)
        return f"ref-{reference.key}-{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"

    def plan(self, n: int, *, isc: bool = False, subset_size: int | None | str = "spec") -> StatsPlan:
        size = self.subset_size if subset_size == "spec" else subset_size
        return StatsPlan(int(n), size, isc_splits=min(self.isc_splits, int(n)) if isc else 0, seed=self.seed)

    def stats(self, images, *, isc: bool = False, cache: bool = True, subset_size: int | None | str = "spec"
              ) -> FeatureStats:
        """Statistics of an image set (tensor or ImageSource); FeatureStats pass through. Reference sets
        (``cache=True``) are read from / written to the cache."""
        if isinstance(images, FeatureStats):
            return images
        source = as_source(images)
        plan = self.plan(len(source), isc=isc, subset_size=subset_size)
        net = self.net()

        def compute():
            return summarise(source.batches(self.batch_size), net, plan)

        name = self.cache_name(images if torch.is_tensor(images) else source) if cache else None
        path = None if name is None else os.path.join(self.cache_dir, name + ".npz")
        meta = {"extractor": net.name, "n": plan.n, "subset_size": plan.subset_size, "isc_splits": plan.isc_splits,
                "seed": plan.seed}
        return cached_stats(path, meta, compute)

    def compare(self, generated: FeatureStats, reference: FeatureStats, *, prc: bool = True, isc: bool = True,
                seed: int | None = None) -> dict:
        return fidelity_from_stats(
            generated, reference, kid_subset_size=self.kid_subset_size, kid_subsets=self.kid_subsets, prc=prc,
            prc_neighborhood=self.prc_neighborhood, isc=isc, seed=self.seed if seed is None else seed,
            device=self.net().device,
        )

    def metrics(self, generated, reference, *, prc: bool = True, isc: bool = True, seed: int = 2020) -> dict:
        """FID/KID/PRC/IS of ``generated`` against ``reference`` (tensors, ImageSources or statistics)."""
        gen = self.stats(generated, isc=isc, cache=False)
        return self.compare(gen, self.stats(reference), prc=prc, isc=isc, seed=seed)


def _spec(features: FeatureSpec | None, classifier: nn.Module | None, **kwargs) -> FeatureSpec:
    """`features`, else the own-classifier FeatureSpec (pass a FeatureSpec for Inception features)."""
    if features is not None:
        return features
    return FeatureSpec(classifier=classifier, **{k: v for k, v in kwargs.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def dataset_images(dataset, max_items: int | None = None, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first ``max_items``) images of an image dataset as ([0, 1] float (N, C, H, W), labels).
    In memory: for small sets (the embedded ones); large sets are read as a :class:`DatasetSource`."""
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
def sample_noise(index: torch.Tensor, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Starting noise (len(index), *shape) float32 on the CPU: sample i from its own generator, seeded by
    numpy's SeedSequence(seed, spawn_key=(i,)), so it does not depend on the batch, shard or device that
    generates it."""
    out = torch.empty((len(index), *shape), dtype=torch.float32)
    g = torch.Generator()
    entropy = int(seed) & ((1 << 64) - 1)
    for j, i in enumerate(torch.as_tensor(index).tolist()):
        lo, hi = np.random.SeedSequence(entropy, spawn_key=(int(i),)).generate_state(2, np.uint32)
        g.manual_seed(int(lo) | (int(hi) << 32))
        out[j] = torch.randn(tuple(shape), generator=g)
    return out


def generation_batches(n: int, batch_size: int, shard: int = 0, num_shards: int = 1) -> list[tuple[int, int]]:
    """Sample ranges [start, stop) of shard ``shard`` of ``num_shards``: batch b = [b B, (b+1) B) goes to
    shard b mod num_shards (round robin keeps the shards' classes and costs even)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    bs = max(1, int(batch_size))
    return [(s, min(n, s + bs)) for b, s in enumerate(range(0, n, bs)) if b % num_shards == shard]


@torch.no_grad()
def iter_generated(
    model,
    n: int,
    *,
    sample_cfg,
    cfg_scale: float | None = None,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    shard: int = 0,
    num_shards: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(index, labels, [0, 1] images on the CPU) for each batch of shard ``shard`` of ``n`` class-balanced
    samples (see :func:`generation_batches`, :func:`sample_noise`). Unconditional models get all-zero labels
    (sampled with the null class)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    dev = torch.device(device)
    scale = sample_cfg.cfg_scale if cfg_scale is None else float(cfg_scale)
    labels = balanced_labels(n, int(getattr(model, "num_classes", 0)))
    shape = (int(model.cfg.model.latent_tokens), int(model.cfg.model.latent_dim))
    with _EvalMode(model):
        for start, stop in generation_batches(n, batch_size, shard, num_shards):
            index = torch.arange(start, stop)
            y = labels[start:stop]
            noise = sample_noise(index, shape, seed).to(dev)
            images, _ = model.generate(y.to(dev), sample_cfg, cfg_scale=scale, noise=noise,
                                       autocast_dtype=autocast_dtype)
            if not torch.is_tensor(images):
                raise MetricsError("generation metrics work on image models only (the modality returned no tensor)")
            yield index, y, images.float().cpu()


@torch.no_grad()
def generate_balanced(model, n: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` class-conditional samples with class-balanced labels (sorted by class), in memory.

    ``sample_cfg`` is a ``SampleConfig`` (solver, steps, cfg_interval, norm_first, rtol, atol);
    ``cfg_scale=None`` uses ``sample_cfg.cfg_scale``. Sample i starts from its own noise (seeded by (seed, i)),
    so the same seed gives the same starting noise at every guidance scale and batch size. With ``num_shards``
    only shard ``shard``'s batches are generated (in index order); the shards' union is the whole set.
    Returns (images in [0, 1] on the CPU, labels int64 on the CPU). For large ``n`` use
    :func:`evaluate_generation`, which never holds all images.
    """
    out, labs = [], []
    for _, y, images in iter_generated(model, n, **options):  # options: those of iter_generated
        out.append(images)
        labs.append(y)
    return torch.cat(out), torch.cat(labs).cpu()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


@dataclass
class GenerationJob:
    """One guidance scale of a sweep: what a worker needs besides the model and the networks. ``keep``: the
    sample indices whose images come back (uint8) for pictures."""

    n: int
    cfg_scale: float
    sample_cfg: Any
    plan: StatsPlan
    batch_size: int = 250
    seed: int = 0
    autocast_dtype: Optional[torch.dtype] = None
    keep: tuple[int, ...] = ()


@dataclass
class ShardResult:
    """What one shard of a GenerationJob returns: feature statistics, conditional-accuracy counts and the kept
    images (uint8, with their indices). ``merge`` joins shards into the result of the whole job."""

    stats: FeatureStats
    correct: int = 0
    counted: int = 0
    kept_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    kept: Optional[torch.Tensor] = None
    images: int = 0
    seconds: float = 0.0

    @classmethod
    def merge(cls, parts: Sequence["ShardResult"]) -> "ShardResult":
        parts = list(parts)
        kept = [p for p in parts if p.kept is not None and len(p.kept)]
        idx = torch.cat([p.kept_index for p in kept]) if kept else torch.zeros(0, dtype=torch.long)
        imgs = torch.cat([p.kept for p in kept]) if kept else None
        if imgs is not None:
            order = torch.argsort(idx)
            idx, imgs = idx[order], imgs[order]
        return cls(
            stats=FeatureStats.merge([p.stats for p in parts]),
            correct=sum(p.correct for p in parts), counted=sum(p.counted for p in parts),
            kept_index=idx, kept=imgs, images=sum(p.images for p in parts),
            seconds=max((p.seconds for p in parts), default=0.0),
        )

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.counted if self.counted else None


def prepare_classifier(classifier: nn.Module | None, device) -> nn.Module | None:
    """The conditional-accuracy classifier in eval mode on ``device`` (a copy when it lives elsewhere)."""
    if classifier is None:
        return None
    dev = torch.device(device)
    param = next(classifier.parameters(), None)
    model = classifier if param is None or param.device == dev else copy.deepcopy(classifier).to(dev)
    return model.eval()


@torch.no_grad()
def run_generation_shard(model, net: FeatureNet, job: GenerationJob, *, shard: int = 0, num_shards: int = 1,
                         classifier: nn.Module | None = None, device: str | torch.device = "cpu") -> ShardResult:
    """Generate shard ``shard`` of ``job`` batch by batch and summarise it: features and IS logits of every
    image into FeatureStats (``job.plan``), classifier hits against the requested labels (conditional
    models), the ``job.keep`` images as uint8. One batch of images is in memory at a time."""
    t0 = time.perf_counter()
    stats = FeatureStats()
    keep = torch.as_tensor(sorted(set(int(i) for i in job.keep)), dtype=torch.long)
    conditional = int(getattr(model, "num_classes", 0)) > 0
    cls = classifier if conditional else None
    correct = counted = images_done = 0
    kept_idx, kept = [], []
    for index, labels, images in iter_generated(
        model, job.n, sample_cfg=job.sample_cfg, cfg_scale=job.cfg_scale, batch_size=job.batch_size, device=device,
        seed=job.seed, autocast_dtype=job.autocast_dtype, shard=shard, num_shards=num_shards,
    ):
        feats, logits = net(to_feature_input(images))
        stats.update(feats, logits, index, job.plan)
        if cls is not None:
            p = next(cls.parameters())
            x = _to_classifier_input(images.to(p.device), int(cls.channels), int(cls.image_size))
            correct += int((cls(x).argmax(dim=1).cpu() == labels).sum())
            counted += len(labels)
        if len(keep):
            sel = torch.isin(index, keep)
            if bool(sel.any()):
                kept_idx.append(index[sel])
                kept.append(_to_uint8(images[sel]))
        images_done += len(index)
    return ShardResult(
        stats=stats.finish(), correct=correct, counted=counted,
        kept_index=torch.cat(kept_idx) if kept_idx else torch.zeros(0, dtype=torch.long),
        kept=torch.cat(kept) if kept else None, images=images_done, seconds=time.perf_counter() - t0,
    )


class LocalRunner:
    """Runs GenerationJobs in this process. With ``num_shards > 1`` it runs the shards one after the other and
    merges them, which is what the Ray runner does across workers (a test of the sharding)."""

    def __init__(self, model, net: FeatureNet, *, classifier: nn.Module | None = None,
                 device: str | torch.device = "cpu", num_shards: int = 1):
        self.model, self.net, self.device, self.num_shards = model, net, torch.device(device), int(num_shards)
        self.classifier = prepare_classifier(classifier, self.device)

    def __call__(self, job: GenerationJob) -> ShardResult:
        parts = [run_generation_shard(self.model, self.net, job, shard=s, num_shards=self.num_shards,
                                      classifier=self.classifier, device=self.device)
                 for s in range(self.num_shards)]
        return parts[0] if len(parts) == 1 else ShardResult.merge(parts)

    def close(self) -> None:
        pass


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def evaluate_generation(
    model,
    reference_images,
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
    kid_subset_size: int | None = None,
    keep_samples: bool = False,
    keep_indices: Sequence[int] | None = None,
    on_scale: Callable[[dict], None] | None = None,
    runner: Callable[[GenerationJob], ShardResult] | None = None,
) -> dict[str, Any]:
    """Guidance sweep: for every scale, ``n`` class-balanced samples against ``reference_images`` (a tensor, an
    ImageSource or FeatureStats, e.g. from an ADM/JiT ``.npz``), streamed: no more than one batch of generated
    images is in memory.

    Returns ``{"curve": [row per scale], "best": row with the lowest FID}``; a row has the keys
    :data:`CURVE_KEYS` (``conditional_accuracy`` is None without a classifier or for unconditional models;
    ``seconds`` is generation + metrics time for that scale). Kept images of the best scale come back as
    ``"samples"`` ([0, 1] floats from uint8), ``"labels"`` and ``"sample_index"``: every sample with
    ``keep_samples`` (small n), else those of ``keep_indices``. ``runner`` runs a GenerationJob (default: this
    process, :class:`LocalRunner`; the `evaluate` stage passes a Ray runner for several workers/GPUs).
    ``on_scale(row)`` is called after each scale (progress logging, tracking).
    """
    if not cfg_scales:
        raise ValueError("evaluate_generation: cfg_scales is empty (eval.cfg_scales)")
    if n < 2:
        raise MetricsError(f"FID needs at least 2 generated images, got n={n}")
    spec = _spec(features, classifier, kid_subset_size=kid_subset_size, device=device)
    ref = spec.stats(reference_images)
    cls = classifier if classifier is not None else spec.classifier
    if runner is None:
        runner = LocalRunner(model, spec.net(), classifier=cls, device=device)
    keep = tuple(range(n)) if keep_samples else tuple(int(i) for i in (keep_indices or ()))
    all_labels = balanced_labels(n, int(getattr(model, "num_classes", 0)))
    curve: list[dict] = []
    best_row, best = None, None
    for scale in cfg_scales:
        t0 = time.perf_counter()
        job = GenerationJob(n=int(n), cfg_scale=float(scale), sample_cfg=sample_cfg, plan=spec.plan(n, isc=True),
                            batch_size=int(batch_size), seed=int(seed), autocast_dtype=autocast_dtype, keep=keep)
        res = runner(job)
        if res.images != n:
            raise MetricsError(f"generation returned {res.images} of {n} samples: a shard is missing")
        t_gen = time.perf_counter() - t0
        m = spec.compare(res.stats, ref)
        row = {
            "cfg_scale": float(scale),
            "fid": m["fid"], "kid_mean": m["kid_mean"], "kid_std": m["kid_std"],
            "precision": m["precision"], "recall": m["recall"], "isc_mean": m["isc_mean"],
            "conditional_accuracy": res.accuracy,
            "seconds": time.perf_counter() - t0,
        }
        curve.append(row)
        log.info("cfg %.2f: FID %.3f, IS %s, cond. acc %s, %.1f s (generation and features %.1f s)",
                 scale, row["fid"], row["isc_mean"], row["conditional_accuracy"], row["seconds"], t_gen)
        if _finite(row["fid"]) and (best_row is None or row["fid"] < best_row["fid"]):
            best_row, best = row, res
        if on_scale is not None:
            on_scale(dict(row))
    if best_row is None:
        raise MetricsError("no guidance scale gave a finite FID (samples contain NaN?): check the checkpoint")
    result: dict[str, Any] = {"curve": curve, "best": dict(best_row)}
    if keep and best.kept is not None:
        result["samples"] = best.kept.float() / 255.0
        result["labels"] = all_labels[best.kept_index]
        result["sample_index"] = best.kept_index
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
    return torch.cat([_reconstruct_batch(model, images[s:s + batch_size], gen, dev, autocast_dtype)
                      for s in range(0, len(images), batch_size)])


def _reconstruct_batch(model, x: torch.Tensor, gen, dev, autocast_dtype):
    with _EvalMode(model):
        x = model.modality.from_unit(x.to(dev).float())
        with autocast(dev, autocast_dtype):
            decoded = model.reconstruct(x, gen)
        return model.modality.postprocess(decoded)


@torch.no_grad()
def evaluate_reconstruction(
    model,
    val_images,
    classifier: nn.Module | None = None,
    *,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    features: FeatureSpec | None = None,
    kid_subset_size: int | None = None,
    keep: int = 0,
    return_stats: bool = False,
) -> dict[str, Any]:
    """rFID (reconstructions vs the originals), PSNR (dB, mean over images, each capped at
    :data:`PSNR_CAP_DB`) and SSIM (mean) on ``val_images`` ([0, 1] tensor or ImageSource), streamed: one batch
    of originals and reconstructions in memory at a time.

    With ``keep > 0`` the result also holds ``"originals"`` and ``"reconstructions"``: ``keep`` images at
    evenly spaced positions of ``val_images`` (datasets stored class by class still show every class).
    ``return_stats`` adds ``"val_stats"``, the originals' FeatureStats (the noise floor needs them).
    """
    spec = _spec(features, classifier, kid_subset_size=kid_subset_size, device=device)
    source = as_source(val_images)
    n = len(source)
    if n < 2:
        raise MetricsError(f"rFID needs at least 2 validation images, got {n}")
    net, plan = spec.net(), spec.plan(n)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    pick = torch.linspace(0, n - 1, min(int(keep), n)).round().long() if keep else torch.zeros(0, dtype=torch.long)
    t0 = time.perf_counter()
    rec_stats, val_stats = FeatureStats(), FeatureStats()
    psnr_sum = ssim_sum = 0.0
    originals, recons = [], []
    for index, x in source.batches(batch_size):
        r = _reconstruct_batch(model, x, gen, dev, autocast_dtype)
        for stats, images in ((rec_stats, r), (val_stats, x)):
            feats, _ = net(to_feature_input(images))
            stats.update(feats, None, index, plan)
        psnr_sum += float(psnr(r, x).clamp(max=PSNR_CAP_DB).double().sum())
        ssim_sum += float(ssim(r, x).double().sum())
        if len(pick):
            sel = torch.isin(index, pick)
            originals.append(x[sel])
            recons.append(r[sel])
    rec_stats.finish(), val_stats.finish()
    out: dict[str, Any] = {
        "rfid": frechet_distance(rec_stats, val_stats),
        "psnr": psnr_sum / n,
        "ssim": ssim_sum / n,
        "seconds": time.perf_counter() - t0,
    }
    log.info("reconstruction: rFID %.3f, PSNR %.2f dB, SSIM %.4f (%d images, %.1f s)",
             out["rfid"], out["psnr"], out["ssim"], n, out["seconds"])
    if len(pick):
        out["originals"] = torch.cat(originals)
        out["reconstructions"] = torch.cat(recons)
    if return_stats:
        out["val_stats"] = val_stats
    return out


# ----------------------------------------------------------------------------------------------
# References given as statistics
# ----------------------------------------------------------------------------------------------
def reference_with_stats_file(path: str | os.PathLike, features: FeatureSpec, train_images=None) -> FeatureStats:
    """Reference statistics from an ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D) -- the format of the ADM /
    JiT reference batches (e.g. VIRTUAL_imagenet256_labeled.npz: Inception pool features, so
    eval.feature_extractor=inception) or of this project's cache. FID uses them; KID and precision/recall need
    features, not moments: those come from up to ``features.subset_size`` images of ``train_images`` (a tensor
    or ImageSource; without it they are not computed). The file's dimension must match the feature network's."""
    fix = ("eval.reference_stats must name an .npz with 'mu' (D,) and 'sigma' (D, D) computed with the feature "
           "network in use (ADM/JiT reference batches hold Inception pool features: eval.feature_extractor=inception)")
    stats, _ = FeatureStats.load(path, what="eval.reference_stats", fix=fix)
    dim = features.net().dim
    if stats.dim != dim:
        raise MetricsError(
            f"eval.reference_stats {os.fspath(path)} holds {stats.dim}-d statistics but the feature network "
            f"({features.net().name}) gives {dim}-d features: {fix}"
        )
    if train_images is not None:
        sub = features.stats(train_images)
        stats.subset, stats.subset_index = sub.subset, sub.subset_index
    log.info("reference statistics from %s (%s images; KID/PRC against %s kept training features)",
             os.fspath(path), stats.n or "an unknown number of", 0 if stats.subset is None else len(stats.subset))
    return stats


# ----------------------------------------------------------------------------------------------
# Sanity references
# ----------------------------------------------------------------------------------------------
def noise_floor(
    train_images,
    val_images,
    classifier: nn.Module | None = None,
    *,
    features: FeatureSpec | None = None,
    kid_subset_size: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """FID of the validation set against the training set (or reference statistics): what a perfect
    generator would score with this many samples and this feature network (the floor gFID should be read
    against)."""
    spec = _spec(features, classifier, kid_subset_size=kid_subset_size, device=device)
    return frechet_distance(spec.stats(val_images, cache=False), spec.stats(train_images))


def fid_noise(
    train_images,
    classifier: nn.Module | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    features: FeatureSpec | None = None,
    kid_subset_size: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """FID of uniform noise images (``n``, default min(1000, len(train))) against the training set (or
    reference statistics; then give ``n`` and ``shape``): the ceiling a useless generator reaches."""
    spec = _spec(features, classifier, kid_subset_size=kid_subset_size, device=device)
    if isinstance(train_images, FeatureStats):
        if n is None or shape is None:
            raise ValueError("fid_noise against statistics needs n and shape")
    else:
        src = as_source(train_images)
        n = int(n or min(1000, len(src)))
        shape = shape or src.shape
    noise = NoiseSource(int(n), shape, seed)
    return frechet_distance(spec.stats(noise, cache=False), spec.stats(train_images))


# ----------------------------------------------------------------------------------------------
# Everything at once (what the `evaluate` stage and `unite compare` run)
# ----------------------------------------------------------------------------------------------
def evaluate_images(
    model,
    train_images,
    val_images,
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
    keep_indices: Sequence[int] | None = None,
    keep_reconstructions: int = 0,
    sanity: bool = True,
    on_scale: Callable[[dict], None] | None = None,
    runner: Callable[[GenerationJob], ShardResult] | None = None,
    reference: FeatureStats | None = None,
) -> dict[str, Any]:
    """Guidance sweep + reconstruction + (optionally) noise floor and noise FID.

    ``train_images`` / ``val_images`` are tensors or ImageSources; ``reference`` (e.g. from
    :func:`reference_with_stats_file`) replaces the training-set statistics. The noise FID uses
    min(num_samples, features.subset_size, len(train)) noise images (it is a sanity ceiling).
    Returns ``{"curve", "best", "reconstruction", "noise_floor_fid", "noise_fid"}`` (+ kept images).
    """
    ref = reference if reference is not None else features.stats(train_images)
    gen = evaluate_generation(
        model, ref, features.classifier, cfg_scales=cfg_scales, n=num_samples, sample_cfg=sample_cfg,
        batch_size=batch_size, device=device, seed=seed, autocast_dtype=autocast_dtype, features=features,
        keep_samples=keep_samples, keep_indices=keep_indices, on_scale=on_scale, runner=runner,
    )
    rec = evaluate_reconstruction(
        model, val_images, features=features, batch_size=batch_size, device=device, seed=seed,
        autocast_dtype=autocast_dtype, keep=keep_reconstructions, return_stats=sanity,
    )
    val_stats = rec.pop("val_stats", None)
    out: dict[str, Any] = {**gen, "reconstruction": rec}
    if sanity:
        out["noise_floor_fid"] = frechet_distance(val_stats, ref)
        src = as_source(train_images)
        n_noise = min(int(num_samples), len(src), int(features.subset_size or len(src)))
        out["noise_fid"] = fid_noise(ref, features=features, n=n_noise, shape=src.shape)
    return out


# ----------------------------------------------------------------------------------------------
# A trained model's evaluation: references from a data module, the flat metrics, the curve file
# ----------------------------------------------------------------------------------------------
#: at most this many reference images are read (a seeded random subset of larger sets)
MAX_REFERENCE = 50_000


def _subset_indices(n: int, max_items: int, seed: int = 0):
    if n <= max_items:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_items].sort().values


def in_memory_references(data, max_items: int = MAX_REFERENCE, seed: int = 0):
    """(train, val) images of a data module in [0, 1] in memory (`unite compare`), a seeded subset of larger sets."""
    def take(ds):
        idx = _subset_indices(len(ds), max_items, seed)
        if idx is None:
            return dataset_images(ds)[0]
        log.info("reference: a random subset of %d of %d images", max_items, len(ds))
        return dataset_images(torch.utils.data.Subset(ds, idx.tolist()))[0]

    return take(data.train), take(data.val)


def reference_sources(data, *, max_train: int = MAX_REFERENCE, max_val: int = MAX_REFERENCE, seed: int = 0,
                      num_workers: int = 0) -> tuple[DatasetSource, DatasetSource]:
    """(train, val) read batch by batch, each at most max_* images (a seeded subset of larger sets), keyed by
    the data content hash for the statistics cache."""
    content = str(data.info.get("content_hash") or "")
    if not content:
        raise MetricsError("the prepared data has no content hash: run `unite prepare` again")

    def source(ds, split, max_items):
        idx = _subset_indices(len(ds), max_items, seed)
        n = len(ds) if idx is None else len(idx)
        if idx is not None:
            log.info("%s reference: a random subset of %d of %d images", split, n, len(ds))
        key = f"{content[:16]}-{split}-{n}-{seed}"
        return DatasetSource(ds, None if idx is None else idx.numpy(), key=key,
                             num_workers=num_workers)

    return source(data.train, "train", max_train), source(data.val, "val", max_val)


def flat_metrics(result: dict[str, Any], num_samples: int) -> dict[str, float]:
    """The scalar metrics of an evaluate_images result (what metrics/evaluate.json holds)."""
    best, rec = result["best"], result["reconstruction"]
    out = {
        "gfid": best["fid"],
        "best_cfg_scale": best["cfg_scale"],
        "kid_mean": best["kid_mean"],
        "kid_std": best["kid_std"],
        "precision": best["precision"],
        "recall": best["recall"],
        "isc_mean": best["isc_mean"],
        "conditional_accuracy": best["conditional_accuracy"],
        "rfid": rec["rfid"],
        "psnr": rec["psnr"],
        "ssim": rec["ssim"],
        "noise_floor_fid": result.get("noise_floor_fid"),
        "noise_fid": result.get("noise_fid"),
        "num_samples": num_samples,
    }
    accs = [r["conditional_accuracy"] for r in result["curve"] if r["conditional_accuracy"] is not None]
    if accs:
        out["conditional_accuracy_max"] = max(accs)
    return {k: v for k, v in out.items() if v is not None}
