"""Stage `train`: train UNITE on the prepared data (pipelines.distributed: Ray Train with distributed.num_workers
>= 1, else in-process; an interrupted run resumes, a finished one is exported without training).

Outs: models/unite.pt (no optimiser state: that stays in ray_results/<run>/), plots/train_curve.csv,
plots/train_reconstructions.png (val images above their EMA reconstructions). MLflow: the live per-step
curve, the CSV, the grid, and the EMA model as MLflow model `model` (class labels in, images out).
"""

from __future__ import annotations

from pathlib import Path

from unite_core.io import atomic_write

from ..context import StageContext

CURVE_FILE = "train_curve.csv"
RECON_FILE = "train_reconstructions.png"
RECON_IMAGES = 10


def run(ctx: StageContext) -> dict:
    from unite_core.analysis.report import write_csv
    from unite_core.runs import curve_columns, export_checkpoint, training_metrics

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
    metrics = training_metrics(history, summary, cfg.train.batch_size)

    curve = write_csv(history, ctx.paths.plots / CURVE_FILE, curve_columns(history))
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
    return metrics
