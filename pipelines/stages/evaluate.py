"""Stage `evaluate`: the numbers a paper can quote, for the trained checkpoint (models/unite.pt).

Images: pipelines.evaluation (guidance sweep, reconstruction, noise floor; plots/guidance_curve.csv,
samples.png, reconstructions.png) with eval.feature_extractor=own (models/classifier.pt) or inception
(eval.inception_weights). Molecules: unite_core.eval_molecules.evaluate_molecules.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from unite_core.devices import resolve_device
from unite_core.inputs import check_checkpoint_data, check_inception_weights, check_reference_stats
from unite_core.train import load_checkpoint, model_from_checkpoint, warn_if_ema_is_young

from ..context import StageContext
from ..evaluation import evaluate_checkpoint_images

log = logging.getLogger(__name__)

CURVE_FILE = "guidance_curve.csv"
SAMPLES_FILE = "samples.png"
RECONSTRUCTIONS_FILE = "reconstructions.png"


def outputs(ctx: StageContext) -> dict[str, Path]:
    p = ctx.paths.plots
    return {"curve": p / CURVE_FILE, "samples": p / SAMPLES_FILE, "reconstructions": p / RECONSTRUCTIONS_FILE}


def _evaluate_molecules(ctx: StageContext, model) -> dict:
    from unite_core import eval_molecules as molecules

    cfg = ctx.cfg
    metrics = molecules.evaluate_molecules(model, ctx.open_data(), cfg)
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
        data = ctx.open_data()
        check_checkpoint_data(state, data, path)
        metrics, _ = evaluate_checkpoint_images(ctx, model, data, device=device, outputs=outputs(ctx))
        metrics["checkpoint_step"] = int(state.get("step", 0))
    metrics["seconds"] = time.perf_counter() - t0
    log.info("evaluate: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics
