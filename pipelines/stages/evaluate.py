"""Stage `evaluate`: the numbers a paper can quote, for the trained checkpoint (models/unite.pt).

Images:
- guidance sweep over eval.cfg_scales, eval.num_samples class-balanced samples per scale (EMA weights
  unless sample.use_ema=false): gFID, KID, precision/recall, IS against the training set (or gFID against
  eval.reference_stats, an ADM/JiT-format .npz), conditional accuracy under the own classifier; the best
  scale (lowest FID) and the whole curve. Generation runs in this process or sharded over Ray workers /
  GPUs (eval.parallel, pipelines/eval_workers.py); images are summarised batch by batch (never all in memory);
- reconstruction of the validation set: rFID, PSNR, SSIM (streamed the same way);
- noise floor FID(val vs reference) and FID(uniform noise vs reference) as the floor and the ceiling;
- outs: plots/guidance_curve.csv, plots/samples.png (best scale, one row per class, at most GRID_CLASSES
  classes), plots/reconstructions.png (rows of originals above their reconstructions); all logged to the tracker.
Features: eval.feature_extractor=own (models/classifier.pt, the `classifier` stage) or inception
(torch-fidelity's inception-v3-compat from the local file eval.inception_weights, loaded only if it loads
without pickle). Reference sets of up to MAX_REFERENCE images (a seeded subset of larger ones) are read with
data.num_workers DataLoader processes; their statistics are cached under .unite_cache/fidelity/ (.npz, the
mu/sigma format eval.reference_stats reads) with a name that hashes the data content and the extractor.

Molecules: unite_core.eval_molecules.evaluate_molecules (reconstruction + validity/uniqueness/...) instead.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from unite_core.eval_images import (
    CURVE_KEYS,
    DatasetSource,
    FeatureSpec,
    dataset_images,
    evaluate_images,
    reference_with_stats_file,
)
from unite_core.devices import autocast_dtype_for, resolve_device
from unite_core.io import atomic_write, atomic_write_text
from unite_core.metrics.images import FeatureStats, MetricsError
from unite_core.model import balanced_labels
from unite_core.pictures import class_grid, pairs_grid
from unite_core.train import load_checkpoint, model_from_checkpoint

from ..context import Reporter, StageContext
from .classifier import load_checked_classifier, load_stage_data

log = logging.getLogger(__name__)

CURVE_FILE = "guidance_curve.csv"
SAMPLES_FILE = "samples.png"
RECONSTRUCTIONS_FILE = "reconstructions.png"
#: at most this many reference images are held in memory (a seeded random subset of larger sets)
MAX_REFERENCE = 50_000
SAMPLES_PER_CLASS = 10
#: samples.png shows at most this many classes (evenly spaced over the label range: 1000 ImageNet classes)
GRID_CLASSES = 10
RECONSTRUCTION_PAIRS = 50
#: tiles narrower than this are upscaled (nearest neighbour) in the PNGs: 32x32 digits are unreadable as is
MIN_TILE = 64


def outputs(ctx: StageContext) -> dict[str, Path]:
    """Every file the stage writes (image modality)."""
    p = ctx.paths.plots
    return {"curve": p / CURVE_FILE, "samples": p / SAMPLES_FILE, "reconstructions": p / RECONSTRUCTIONS_FILE}


def fidelity_cache_dir(ctx: StageContext) -> Path:
    return ctx.paths.cache / "fidelity"


def check_inception_weights(cfg) -> None:
    if cfg.eval.feature_extractor != "inception":
        return
    path = cfg.eval.inception_weights
    if not path or not os.path.isfile(path) or not os.access(path, os.R_OK) or os.path.getsize(path) == 0:
        raise MetricsError(
            f"eval.feature_extractor=inception needs eval.inception_weights=<readable local Inception-v3 weights "
            f"file for torch-fidelity's inception-v3-compat>; got {path!r} (nothing is downloaded), or use "
            "eval.feature_extractor=own"
        )


def check_reference_stats(cfg) -> None:
    """eval.reference_stats, when set, must be a readable mu/sigma .npz (checked before any expensive work)."""
    path = cfg.eval.reference_stats
    if path:
        FeatureStats.load(path, what="eval.reference_stats",
                          fix="point eval.reference_stats at an .npz with 'mu' (D,) and 'sigma' (D, D), or set it "
                              "to null to compare with the training images")


def feature_spec(ctx: StageContext, data, device) -> FeatureSpec:
    """The feature network the params ask for; the own classifier is loaded in both modes (conditional
    accuracy), required only for extractor=own."""
    cfg = ctx.cfg
    check_inception_weights(cfg)
    own = cfg.eval.feature_extractor == "own"
    classifier, _ = load_checked_classifier(ctx, data, required=own)
    return FeatureSpec(
        extractor=cfg.eval.feature_extractor, classifier=classifier,
        inception_weights=cfg.eval.inception_weights, cache_dir=str(fidelity_cache_dir(ctx)),
        kid_subset_size=cfg.eval.kid_subset_size, batch_size=min(cfg.eval.batch_size, 512), device=device,
        subset_size=cfg.eval.feature_subset,
    )


def _subset_indices(n: int, max_items: int, seed: int = 0):
    if n <= max_items:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_items].sort().values


def reference_images(data, max_items: int = MAX_REFERENCE, seed: int = 0):
    """(train images, val images) in [0, 1] in memory (small sets: `unite compare`); sets larger than
    max_items are subsampled (seeded)."""
    def take(ds):
        idx = _subset_indices(len(ds), max_items, seed)
        if idx is None:
            return dataset_images(ds)[0]
        log.info("reference: a random subset of %d of %d images", max_items, len(ds))
        return dataset_images(_Subset(ds, idx))[0]

    return take(data.train), take(data.val)


def reference_sources(ctx: StageContext, data, *, max_train: int = MAX_REFERENCE, max_val: int = MAX_REFERENCE,
                      seed: int = 0) -> tuple[DatasetSource, DatasetSource]:
    """(train, val) read batch by batch (DataLoader workers for image folders and shards), each at most
    max_* images (a seeded subset of larger sets); keyed by the data content hash for the statistics cache."""
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
                             num_workers=ctx.cfg.data.num_workers)

    return source(data.train, "train", max_train), source(data.val, "val", max_val)


def grid_indices(n: int, num_classes: int, per_class: int = SAMPLES_PER_CLASS, max_classes: int = GRID_CLASSES):
    """Sample indices kept for samples.png: the first ``per_class`` samples of up to ``max_classes`` classes."""
    labels = balanced_labels(n, num_classes)
    classes = sorted(set(labels.tolist()))
    if len(classes) > max_classes:
        pick = torch.linspace(0, len(classes) - 1, max_classes).round().long().tolist()
        classes = [classes[i] for i in pick]
    out = []
    for c in classes:
        out += (labels == c).nonzero().flatten()[:per_class].tolist()
    return out


class _Subset:
    def __init__(self, ds, idx):
        self.ds, self.idx = ds, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.ds[int(self.idx[int(i)])]


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


def write_curve(curve: list[dict], path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CURVE_KEYS))
    w.writeheader()
    for row in curve:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in CURVE_KEYS})
    return atomic_write_text(path, buf.getvalue())


def _save_png(img, path: Path) -> Path:
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def evaluate_checkpoint_images(ctx: StageContext, model, data, *, num_samples: int | None = None,
                               cfg_scales=None, device=None, write_outputs: bool = True, tracker=None,
                               sanity: bool = True, features: FeatureSpec | None = None, references=None,
                               progress: bool = True):
    """Run the full image evaluation of ``model`` on ``data``; returns (flat metrics, full result).

    ``references``: (train, val) as tensors or ImageSources (default: :func:`reference_sources`).
    Used by this stage and by `unite compare` (write_outputs=False: numbers only).
    """
    from pipelines.eval_workers import generation_runner

    cfg = ctx.cfg
    device = device or resolve_device(cfg.train.device)
    tracker = tracker if tracker is not None else ctx.tracker
    features = features or feature_spec(ctx, data, device)
    stats_file = cfg.eval.reference_stats
    if references is not None:
        train_x, val_x = references
    else:  # with reference statistics the training images serve only KID and precision/recall
        max_train = cfg.eval.feature_subset if stats_file else MAX_REFERENCE
        train_x, val_x = reference_sources(ctx, data, max_train=max_train)
    reference = reference_with_stats_file(stats_file, features, train_x) if stats_file else None
    n = int(num_samples or cfg.eval.num_samples)
    scales = list(cfg_scales or cfg.eval.cfg_scales)
    keep = grid_indices(n, int(getattr(model, "num_classes", 0))) if write_outputs else None

    reporter = ctx.reporter if progress else Reporter()  # no nested progress bars (`unite compare` has its own)
    runner = generation_runner(cfg, model, features, device, debug=bool(getattr(ctx, "debug", False)))
    try:
        with reporter.progress(f"guidance sweep ({n} samples per scale)", len(scales)) as task:
            done = []

            def on_scale(row):
                done.append(row)
                step = int(round(row["cfg_scale"] * 100))  # MLflow step axis: the guidance scale x 100
                tracker.log_metrics({f"curve_{k}": v for k, v in row.items() if k != "cfg_scale" and v is not None},
                                    step=step)
                task.update(len(done), cfg=row["cfg_scale"], fid=row["fid"])

            result = evaluate_images(
                model, train_x, val_x, features, sample_cfg=cfg.sample, cfg_scales=scales, num_samples=n,
                batch_size=cfg.eval.batch_size, device=device, seed=cfg.sample.seed,
                autocast_dtype=autocast_dtype_for(cfg.train.precision), keep_indices=keep,
                keep_reconstructions=RECONSTRUCTION_PAIRS if write_outputs else 0, on_scale=on_scale, sanity=sanity,
                runner=runner, reference=reference,
            )
    finally:
        runner.close()
    metrics = flat_metrics(result, n)
    if write_outputs:
        out = outputs(ctx)
        write_curve(result["curve"], out["curve"])
        samples = class_grid(result["samples"], result["labels"], per_class=SAMPLES_PER_CLASS, min_tile=MIN_TILE)
        _save_png(samples, out["samples"])
        rec = result["reconstruction"]
        recon = pairs_grid(rec["originals"], rec["reconstructions"], ncol=10, min_tile=MIN_TILE)
        _save_png(recon, out["reconstructions"])
        tracker.log_artifact(out["curve"], "plots")
        tracker.log_image(samples, SAMPLES_FILE)
        tracker.log_image(recon, RECONSTRUCTIONS_FILE)
        tracker.log_dict({"curve": result["curve"], "best": result["best"]}, "guidance_curve.json")
    return metrics, result


def warn_if_ema_is_young(state: dict, use_ema: bool, path) -> bool:
    """EMA weights after fewer steps than the EMA horizon 1/(1 - decay) are still mostly the initialisation:
    say so (evaluate the raw weights with sample.use_ema=false). Returns True when it warned."""
    try:
        decay = float(state["config"]["train"]["ema_decay"])
        step = int(state.get("step", 0))
    except (KeyError, TypeError, ValueError):
        return False
    horizon = 1.0 / max(1e-12, 1.0 - decay)
    if use_ema and state.get("ema") is not None and step < horizon:
        log.warning("%s: the EMA (decay %g, horizon %.0f steps) has averaged only %d steps, so its weights are "
                    "still close to the initialisation; evaluate the raw weights with sample.use_ema=false",
                    path, decay, horizon, step)
        return True
    return False


def _evaluate_molecules(ctx: StageContext, model) -> dict:
    cfg = ctx.cfg
    if importlib.util.find_spec("unite_core.eval_molecules") is None:
        raise MetricsError("modality=molecules needs unite_core.eval_molecules (evaluate_molecules), which is not installed")
    from unite_core import eval_molecules as molecules
    from unite_core.data.molecule_sets import load_prepared_molecules

    if not hasattr(molecules, "evaluate_molecules"):
        raise MetricsError("unite_core.eval_molecules has no evaluate_molecules(model, data, cfg): update the package")
    data = load_prepared_molecules(ctx.paths.dataset_dir(cfg), cfg.data)
    metrics = molecules.evaluate_molecules(model, data, cfg)
    if hasattr(molecules, "write_samples"):
        files = molecules.write_samples(model, min(64, cfg.eval.num_samples), ctx.paths.plots / "molecules", cfg)
        if files.get("png"):
            ctx.tracker.log_artifact(files["png"], "plots")
    return metrics


def run(ctx: StageContext, checkpoint: str | Path | None = None) -> dict:
    """Evaluate ``checkpoint`` (or ctx.options["checkpoint"]; default models/unite.pt, which must match the
    params' model section; an explicit path is rebuilt from its own saved config)."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    checkpoint = checkpoint if checkpoint is not None else ctx.options.get("checkpoint")
    if cfg.modality == "images":  # fail before any expensive work
        check_inception_weights(cfg)
        check_reference_stats(cfg)
    path = Path(checkpoint) if checkpoint is not None else ctx.paths.checkpoint
    state = load_checkpoint(path, None if checkpoint is not None else cfg)
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, use_ema=cfg.sample.use_ema, device=device)
    warn_if_ema_is_young(state, cfg.sample.use_ema, path)
    log.info("evaluating %s (step %s, %s weights)", path, state.get("step"),
             "EMA" if cfg.sample.use_ema and state.get("ema") is not None else "raw")
    if cfg.modality == "molecules":
        metrics = _evaluate_molecules(ctx, model)
    else:
        data = load_stage_data(ctx)
        for key in ("channels", "image_size", "num_classes"):
            if int(state["info"].get(key, -1)) != int(data.info.get(key, -2)):
                raise MetricsError(
                    f"checkpoint {path} was trained on data with {key}={state['info'].get(key)} but the prepared "
                    f"data has {key}={data.info.get(key)}: evaluate with the params it was trained with"
                )
        metrics, _ = evaluate_checkpoint_images(ctx, model, data, device=device)
        metrics["checkpoint_step"] = int(state.get("step", 0))
    metrics["seconds"] = time.perf_counter() - t0
    log.info("evaluate: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics
