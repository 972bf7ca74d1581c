"""Stage `prepare`: the dataset the params describe, written once to data/<dataset>/ (unite_core.data's
prepare_image_data / prepare_molecule_data, with progress bars); counts and content hash in metrics/prepare.json.
"""

from __future__ import annotations

import logging
import time

from ..context import StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    out_dir = ctx.paths.dataset_dir(cfg)
    t0 = time.perf_counter()
    if cfg.modality == "molecules":
        from unite_core.data.molecule_sets import prepare_molecule_data

        manifest = prepare_molecule_data(cfg.data, out_dir, progress=ctx.reporter.progress)
        info = manifest
    else:
        from unite_core.data import prepare_image_data

        # images report their own phases (scan, decode, shards) through the reporter's bars
        manifest = prepare_image_data(cfg.data, out_dir, progress=ctx.reporter.progress)
        info = manifest["info"]
    seconds = time.perf_counter() - t0
    metrics = {
        "modality": cfg.modality,
        "dataset": cfg.data.dataset,
        "num_train": int(info["num_train"]),
        "num_val": int(info["num_val"]),
        "num_classes": int(info.get("num_classes", 0)),
        "content_hash": manifest["content_hash"],
        "seconds": round(seconds, 3),
    }
    for key in ("image_size", "channels", "max_atoms", "num_failed", "num_unreadable", "num_failed_embedding"):
        if isinstance(info.get(key), (int, float)):
            metrics[key] = info[key]
    if manifest.get("skipped_corrupt"):
        metrics["num_corrupt_skipped"] = len(manifest["skipped_corrupt"])
    if manifest.get("format"):
        metrics["format"] = manifest["format"]
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("num_") or k == "seconds"})
    ctx.tracker.set_tags({"unite.data_hash": manifest["content_hash"], "unite.dataset": cfg.data.dataset})
    log.debug("prepared %s: %d train / %d val items in %s (%.1f s)", cfg.data.dataset, metrics["num_train"],
             metrics["num_val"], out_dir, seconds)
    return metrics
