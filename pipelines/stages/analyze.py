"""Stage `analyze`: the paper's analyses of a trained model, as JSON/CSV/PNG and MLflow records.

Inputs: models/unite.pt (EMA weights), the prepared data, and when present `unite compare`'s ablation
checkpoints (models/compare/*.pt) and reports/sweep.csv. Outs (always written, an empty table with its
header and a figure saying why): metrics/analyze.json, plots/{alignment, alignment_variants, cosine,
probe, compression, rate_distortion}.csv (+ .png). The numbers: unite_core.analysis.model_report (the
denoising pass uses the null class, class_mode="label" the true labels; a seeded val subset of
analysis.num_images; passes at the training precision). Options: OPTIONS (`unite analyze --help`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from unite_core.analysis import report
from unite_core.analysis.activations import CLASS_MODES
from unite_core.analysis.model_report import CSV_FILES, analyze_model, figures, find_variants
from unite_core.analysis.notebooks import execute_notebooks
from unite_core.devices import autocast_dtype_for, resolve_device
from unite_core.inputs import check_checkpoint_data
from unite_core.train import load_checkpoint, model_from_checkpoint

from ..context import StageContext
from . import stage_options

log = logging.getLogger(__name__)


#: options of run() / `unite analyze` (ctx.options) and their defaults
OPTIONS = {"checkpoint": None, "variants": None, "sweep_csv": None, "class_mode": "null",
           "probe_train_images": None, "notebooks": False}


class AnalyzeError(RuntimeError):
    """A user-facing problem with the analyze options."""


def parse_variants(items: list[str] | None) -> dict[str, Path] | None:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise AnalyzeError(f"--variant {item!r} must look like NAME=PATH, e.g. separate=models/sep.pt")
        out[name.strip()] = Path(path.strip())
    return out or None


def run(ctx: StageContext, **kwargs) -> dict:
    opts = stage_options(ctx, OPTIONS, AnalyzeError, "analyze", **kwargs)
    if opts["class_mode"] not in CLASS_MODES:
        raise AnalyzeError(f"class mode {opts['class_mode']!r} is invalid: use one of {list(CLASS_MODES)}")
    result = _analyze(ctx, checkpoint=opts["checkpoint"], variants=opts["variants"], sweep_csv=opts["sweep_csv"],
                      class_mode=opts["class_mode"], probe_train_images=opts["probe_train_images"])
    if opts["notebooks"]:  # executed into reports/notebooks/, logged to this run (they write no MLflow here)
        files = execute_notebooks(ctx.root, ctx.paths.reports / "notebooks")
        for path in files:
            ctx.tracker.log_artifact(path, "notebooks")
        result["notebooks"] = [str(p) for p in files if p.suffix == ".ipynb"]
    return result


def _analyze(ctx: StageContext, *, checkpoint, variants, sweep_csv, class_mode: str, probe_train_images) -> dict:
    cfg, paths, tracker = ctx.cfg, ctx.paths, ctx.tracker
    device = resolve_device(cfg.train.device)
    ckpt_path = Path(checkpoint) if checkpoint else paths.checkpoint
    state = load_checkpoint(ckpt_path, cfg)
    model = model_from_checkpoint(state, use_ema=True, device=device)
    data = ctx.open_data()
    check_checkpoint_data(state, data, ckpt_path)
    sweep_path = Path(sweep_csv) if sweep_csv else paths.reports / "sweep.csv"
    log.info("analyze: %s", ckpt_path)
    result, tables = analyze_model(
        state, model, data, cfg, variants=find_variants(paths.models / "compare", variants),
        sweep_rows=report.read_csv(sweep_path) if sweep_path.is_file() else None, class_mode=class_mode,
        probe_train_images=probe_train_images, device=device, autocast_dtype=autocast_dtype_for(cfg.train.precision),
        progress=ctx.reporter.progress)
    result["checkpoint"] = str(ckpt_path)

    paths.plots.mkdir(parents=True, exist_ok=True)
    written = [report.write_csv(tables[key], paths.plots / fname, cols) for key, (fname, cols) in CSV_FILES.items()]
    written += [report.save_figure(fig, paths.plots / name) for name, fig in figures(tables, sweep_path.name).items()]

    # MLflow (driver only)
    tracker.log_params({"analysis_class_mode": class_mode, "analysis_checkpoint": str(ckpt_path)})
    tracker.log_metrics({k: v for k, v in result.items() if not k.startswith("checkpoint")})
    align = tables["alignment"]
    for t in sorted({r["t"] for r in align}):  # per-layer curves: step = GE block index
        for r in (r for r in align if r["t"] == t):
            tracker.log_metrics({f"cka_t{t:g}": r["cka"], f"cknna_t{t:g}": r["cknna"]}, step=r["layer"])
    for r in (r for r in tables["probe"] if r["feature"].startswith("block_")):
        tracker.log_metrics({"probe_val_accuracy": r["val_accuracy"]}, step=r["layer"])
    for p in written:
        tracker.log_artifact(p, "plots")
    log.info("analyze: done in %.1f s (CKA mean %.3f, z0 probe %.3f)", result["seconds"],
             result["alignment"].get("cka_mean", float("nan")), result["probe"]["z0_val_accuracy"])
    return result
