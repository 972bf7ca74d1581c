"""Stage `prepare`: the dataset the params describe, written once to data/<dataset>/ (unite_core.inputs.prepare,
with progress bars); counts and content hash in metrics/prepare.json.
"""

from __future__ import annotations

import time

from unite_core.inputs import prepare

from ..context import StageContext


def run(ctx: StageContext) -> dict:
    t0 = time.perf_counter()
    manifest, metrics = prepare(ctx.cfg, ctx.paths.dataset_dir(ctx.cfg), progress=ctx.reporter.progress)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("num_") or k == "seconds"})
    ctx.tracker.set_tags({"unite.data_hash": manifest["content_hash"], "unite.dataset": ctx.cfg.data.dataset})
    return metrics
