"""Stage `train`: train UNITE on the prepared data (pipelines.distributed: Ray Train with distributed.num_workers
>= 1, else in-process; an interrupted run resumes, a finished one is exported without training).

Outs: models/unite.pt (no optimiser state: that stays in ray_results/<run>/), plots/train_curve.csv,
plots/train_reconstructions.png (val images above their EMA reconstructions). MLflow: the live per-step
curve, the CSV, the grid, and the EMA model as MLflow model `model` (class labels in, images out).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from unite_core.io import atomic_write, atomic_write_text

from ..context import StageContext

log = logging.getLogger(__name__)

CURVE_FILE = "train_curve.csv"
RECON_FILE = "train_reconstructions.png"
CURVE_COLUMNS = ("step", "time_s", "loss", "recon", "flow", "lr", "val_psnr")
RECON_IMAGES = 10


def curve_csv(history: list[dict]) -> str:
    """CSV text: CURVE_COLUMNS first, then every other key in first-seen order; blanks where absent."""
    keys = [k for k in CURVE_COLUMNS if any(k in r for r in history)]
    for r in history:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def summarize(history: list[dict], summary: dict, batch_size: int) -> dict:
    last = history[-1] if history else {}
    evals = [r for r in history if any(k.startswith("val_") for k in r)]
    tail = history[-max(1, len(history) // 10):] if history else []
    losses = [r["loss"] for r in tail if isinstance(r.get("loss"), (int, float))]
    seconds = float(summary["train_seconds"]) or float(last.get("time_s", 0.0))
    metrics = {
        "final_loss": last.get("loss"),
        "final_loss_avg": sum(losses) / len(losses) if losses else None,
        "final_recon": last.get("recon"),
        "final_flow": last.get("flow"),
        "steps": int(summary["final_step"]),
        "steps_requested": int(summary["steps_requested"]),
        "stopped_early": bool(summary["stopped_early"]),
        "seconds": round(seconds, 3),
        "samples_per_s": round(summary["final_step"] * batch_size / seconds, 2) if seconds > 0 else None,
        "wall_seconds": round(float(summary["wall_seconds"]), 3),
        "startup_seconds": round(float(summary.get("startup_seconds", 0.0)), 3),
        "workers": int(summary["workers"]),
        "trained_now": bool(summary["trained_now"]),
        "run_name": summary["run_name"],
    }
    if evals:
        metrics.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
    return metrics


def run(ctx: StageContext) -> dict:
    from unite_core.runs import export_checkpoint

    from ..distributed import train_in_process, train_with_ray
    from ..tracking import LiveMetrics

    cfg = ctx.cfg
    data_dir = ctx.paths.dataset_dir(cfg)
    live = LiveMetrics(ctx.tracker)
    if cfg.distributed.num_workers == 0:
        summary = train_in_process(ctx, data_dir, live=live)
    else:
        summary = train_with_ray(ctx, data_dir, live=live)
    state = export_checkpoint(Path(summary["checkpoint_dir"]), ctx.paths.checkpoint)
    history = list(state.get("history", []))
    metrics = summarize(history, summary, cfg.train.batch_size)

    curve = atomic_write_text(ctx.paths.plots / CURVE_FILE, curve_csv(history))
    tracker = ctx.tracker
    tracker.set_tags({"unite.run_name": summary["run_name"], "unite.trained_now": str(summary["trained_now"]).lower()})
    tracker.log_metric_history(live.missing(history))  # what the live logging did not send (a reused run)
    tracker.log_artifact(curve, "plots")
    if cfg.modality == "images":
        from unite_core.data import load_prepared
        from unite_core.pictures import reconstruction_grid
        from unite_core.train import model_from_checkpoint

        grid = reconstruction_grid(model_from_checkpoint(state, use_ema=True), load_prepared(data_dir).val, RECON_IMAGES)
        out = ctx.paths.plots / RECON_FILE
        atomic_write(out, lambda f: grid.save(f, format="PNG"))
        tracker.log_image(grid, RECON_FILE)
    tracker.log_generator_model(state, step=metrics["steps"])
    verb = "trained" if summary["trained_now"] else "reused the finished run"
    log.debug("%s %s: step %d/%d, final loss %s, val_psnr %s -> %s", verb, summary["run_name"], metrics["steps"],
             metrics["steps_requested"], _fmt(metrics["final_loss"]), _fmt(metrics.get("val_psnr")),
             ctx.paths.checkpoint)
    return metrics


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
