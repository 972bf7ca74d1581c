"""Stage `compare` (`unite compare`): UNITE against its ablations and the two-stage baseline, at equal budget.

Each variant (unite_core.ablations.VARIANTS) is trained once per seed (train.seed, +1, ...) and evaluated
like the `evaluate` stage; results in reports/compare.csv (a row per variant and seed), reports/compare.md
(mean +- std and a verdict per paper direction: unite_core.analysis.claims) and one MLflow child run each.
Budget "time" (`minutes` per variant; two-stage splits them by `tokenizer_fraction`) or "steps". `jobs` > 1
trains the missing runs in parallel processes first. Resumable: a row with the same params hash is kept;
a finished training is evaluated from models/compare/<variant>-s<seed>-<hash>.pt.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from unite_core.ablations import (DEFAULT_VARIANTS, VARIANTS, AblationError, PlannedRun, check_budget, device_label,
                                  parse_scales, parse_variants, plan_runs, train_in_processes, variant_overrides)
from unite_core.analysis.claims import (NUMERIC, budget_text, flat_metrics, read_rows, render_markdown, table_row,
                                       write_rows)
from unite_core.devices import resolve_device
from unite_core.eval_images import in_memory_references, noise_floor
from unite_core.inputs import data_hash
from unite_core.io import atomic_write_text
from unite_core.metrics.images import classifier_fingerprint
from unite_core.model import count_parameters
from unite_core.train import load_checkpoint, model_from_checkpoint, warn_if_ema_is_young

from ..context import StageContext
from ..evaluation import evaluate_checkpoint_images
from ..tracking import stage_run
from . import stage_options

log = logging.getLogger(__name__)

#: options of run() / `unite compare` and their defaults (None: from the params)
OPTIONS = {"variants": None, "minutes": None, "samples": None, "scales": None, "budget": "time", "steps": None,
           "tokenizer_fraction": 0.5, "seeds": 3, "jobs": 1}


def report_paths(ctx: StageContext) -> dict[str, Path]:
    return {"csv": ctx.paths.reports / "compare.csv", "md": ctx.paths.reports / "compare.md"}


def run_variant(ctx: StageContext, run: PlannedRun, data, *, overrides: dict, budget: str, num_samples: int,
                scales: list[float], tokenizer_fraction: float, features, references, device, tracker) -> dict:
    """Train (unless trained) and evaluate one (variant, seed) in its MLflow run; its table row."""
    train_info = run.ensure_trained(ctx.paths.models, data, device, budget=budget, tokenizer_fraction=tokenizer_fraction)
    tracker.log_metric_history(train_info.pop("history", []))
    state = load_checkpoint(run.checkpoint(ctx.paths.models))
    model = model_from_checkpoint(state, use_ema=ctx.cfg.sample.use_ema, device=device)
    warn_if_ema_is_young(state, ctx.cfg.sample.use_ema, f"compare variant {run.name} seed {run.seed}")
    t0 = time.perf_counter()
    metrics, _ = evaluate_checkpoint_images(
        ctx, model, data, num_samples=num_samples, cfg_scales=scales, device=device, tracker=tracker, sanity=False,
        features=features, references=references, progress=False)
    row = table_row(
        run.name, run.seed, metrics, {"device": device_label(device), **train_info},
        parameters=count_parameters(model), eval_seconds=time.perf_counter() - t0, budget=budget,
        minutes=run.cfg.train.time_limit_minutes if budget == "time" else None, num_samples=num_samples,
        overrides="two-stage baseline" if VARIANTS[run.name].two_stage else json.dumps(overrides),
        params_hash=run.row_hash)
    tracker.log_params({"compare.variant": run.name, "compare.seed": run.seed, "compare.overrides": row["overrides"],
                        "compare.budget": budget, "compare.minutes": row["minutes"],
                        "compare.num_samples": num_samples})
    tracker.log_metrics({k: v for k, v in row.items() if k in NUMERIC and v is not None})
    return row


def run(ctx: StageContext, **options) -> dict:
    """Options (keyword arguments, else ctx.options, else :data:`OPTIONS`): those of `unite compare --help`;
    variants and scales may also be lists."""
    opts = stage_options(ctx, OPTIONS, AblationError, "compare", **options)
    cfg = ctx.cfg
    if cfg.modality != "images":
        raise AblationError("unite compare evaluates image models (gFID, rFID, ...); use modality=images")
    budget, steps, tokenizer_fraction = opts["budget"], opts["steps"], float(opts["tokenizer_fraction"])
    seeds, jobs = int(opts["seeds"]), int(opts["jobs"])
    names = parse_variants(opts["variants"])
    scales = parse_scales(opts["scales"]) or list(cfg.eval.cfg_scales)
    minutes = float(opts["minutes"] if opts["minutes"] is not None else (cfg.train.time_limit_minutes or 10.0))
    num_samples = int(opts["samples"] or cfg.eval.num_samples)
    check_budget(budget, minutes=minutes, tokenizer_fraction=tokenizer_fraction, seeds=seeds, jobs=jobs,
                 num_samples=num_samples)

    device = resolve_device(cfg.train.device)
    data = ctx.open_data()
    classifier, _ = ctx.classifier(data, required=False)
    if classifier is None and cfg.eval.feature_extractor == "own":
        log.info("compare: no feature classifier yet; training it (the `classifier` stage)")
        ctx.train_classifier(data)
    features = ctx.feature_spec(data, device)
    references = in_memory_references(data)
    cls_hash = classifier_fingerprint(features.classifier)[:16] if features.classifier is not None else ""

    paths = report_paths(ctx)
    rows = read_rows(paths["csv"])
    order = list(DEFAULT_VARIANTS)
    every = plan_runs(cfg, names, seeds, budget=budget, minutes=minutes, steps=steps,
                      tokenizer_fraction=tokenizer_fraction, num_samples=num_samples, scales=scales,
                      data_hash=data_hash(data), classifier_hash=cls_hash)
    skipped = [(r.name, r.seed) for r in every if rows.get((r.name, r.seed), {}).get("params_hash") == r.row_hash]
    for name, seed in skipped:
        log.info("compare: %s seed %d is done (same params hash): skipped", name, seed)
    plan = [r for r in every if (r.name, r.seed) not in skipped]
    untrained = [r for r in plan if not r.trained(ctx.paths.models)]
    if jobs > 1 and len(untrained) > 1:
        train_in_processes(cfg, untrained, min(jobs, len(untrained)), models_dir=ctx.paths.models,
                           data_dir=ctx.paths.dataset_dir(cfg), cache_dir=ctx.paths.cache / "data", budget=budget,
                           tokenizer_fraction=tokenizer_fraction)
    ran = []
    with ctx.reporter.progress(f"compare ({len(plan)} runs: {len(names)} variants x {seeds} seeds)",
                               len(plan)) as task:
        for i, r in enumerate(plan):
            with stage_run(ctx.root, cfg.tracking.experiment, f"compare-{r.name}-s{r.seed}", cfg.to_dict(),
                           enabled=cfg.tracking.enabled, extra_tags={"unite.variant": r.name, "unite.seed": str(r.seed)},
                           strict=cfg.tracking.strict) as tracker:
                task.update(i, variant=f"{r.name} s{r.seed}")
                rows[(r.name, r.seed)] = run_variant(
                    ctx, r, data, overrides=variant_overrides(cfg, r.name, budget=budget, steps=steps, minutes=minutes),
                    budget=budget, num_samples=num_samples, scales=scales, tokenizer_fraction=tokenizer_fraction,
                    features=features, references=references, device=device, tracker=tracker)
            ran.append((r.name, r.seed))
            write_rows(rows, paths["csv"], order)  # progress survives an interruption
            task.update(i + 1, variant=f"{r.name} s{r.seed}", gfid=rows[(r.name, r.seed)].get("gfid"))

    floor = noise_floor(references[0], references[1], features=features)
    meta = {
        "dataset": cfg.data.dataset, "feature_extractor": cfg.eval.feature_extractor, "num_samples": num_samples,
        "scales": ", ".join(f"{s:g}" for s in scales), "weights": "EMA" if cfg.sample.use_ema else "raw",
        "budget_text": budget_text(budget, minutes=minutes, steps=steps or cfg.train.steps,
                                   tokenizer_fraction=tokenizer_fraction,
                                   doubled=[n for n in names if VARIANTS[n].budget_factor != 1.0]),
        "noise_floor_fid": floor, "minibatches": cfg.flow.minibatches,
        "num_classes": int(data.info.get("num_classes", 0)),
    }
    write_rows(rows, paths["csv"], order)
    atomic_write_text(paths["md"], render_markdown(rows, order, meta))
    ctx.tracker.log_artifact(paths["md"], "reports")
    ctx.tracker.log_artifact(paths["csv"], "reports")
    log.info("compare: ran %s, skipped %s -> %s", ran, skipped, paths["md"])
    return {"noise_floor_fid": floor, "variants_run": len(ran), "variants_skipped": len(skipped),
            **flat_metrics(rows, meta["num_classes"])}
