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
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from unite_core.ablations import (BUDGETS, DEFAULT_VARIANTS, VARIANTS, device_label, parse_variants, train_variant, variant_config,
                                  variant_overrides)
from unite_core.analysis.claims import NUMERIC, directions, read_rows, render_markdown, summarize, write_rows
from unite_core.config import Config
from unite_core.devices import resolve_device
from unite_core.io import atomic_write_text, stable_hash
from unite_core.metrics.images import classifier_fingerprint
from unite_core.model import count_parameters
from unite_core.eval_images import in_memory_references
from unite_core.train import load_checkpoint, model_from_checkpoint, warn_if_ema_is_young

from ..context import StageContext
from ..evaluation import evaluate_checkpoint_images
from ..tracking import stage_run
from . import stage_options

log = logging.getLogger(__name__)


class CompareError(ValueError):
    """A user-facing problem with the comparison's options."""


def parse_scales(text: str | None) -> Optional[list[float]]:
    if text is None or not str(text).strip():
        return None
    try:
        scales = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CompareError(f"--scales {text!r} must be a comma-separated list of numbers, e.g. 1.0,2.0,3.0") from None
    if not scales or any(s < 0 for s in scales):
        raise CompareError(f"--scales {text!r} must hold non-negative guidance scales")
    return scales


def training_hash(vcfg: Config, name: str, *, budget: str, tokenizer_fraction: float, data_hash: str = "") -> str:
    """What defines a variant's trained checkpoint (models/compare/<variant>-s<seed>-<this>.pt)."""
    d = vcfg.to_dict()
    relevant = {k: d[k] for k in ("modality", "data", "model", "flow", "loss", "train")}
    return stable_hash({
        "variant": name, "config": relevant, "budget": budget,
        "minutes": vcfg.train.time_limit_minutes if budget == "time" else None,
        "tokenizer_fraction": tokenizer_fraction if VARIANTS[name].two_stage else None, "data": data_hash,
    })


def variant_hash(train_hash: str, vcfg: Config, *, num_samples: int, scales: list[float], data_hash: str,
                 classifier_hash: str) -> str:
    """What defines a row of the table: the training plus every evaluation setting."""
    d = vcfg.to_dict()
    evaluation = {k: d["eval"][k] for k in ("feature_extractor", "inception_weights", "kid_subset_size")}
    return stable_hash({"train": train_hash, "sample": d["sample"], "eval": evaluation, "num_samples": num_samples,
                  "scales": scales, "data": data_hash, "classifier": classifier_hash})


# --- One variant and seed ---
def _paths(ctx_models: Path, name: str, seed: int, train_hash: str) -> tuple[Path, Path]:
    ckpt = ctx_models / "compare" / f"{name}-s{seed}-{train_hash}.pt"
    return ckpt, ckpt.with_suffix(".json")


def _train_in_process(job: dict) -> str:
    """A worker process of ``jobs > 1``: loads the data itself and trains one (variant, seed)."""
    torch.set_num_threads(job["threads"])
    ctx = StageContext(cfg=job["cfg"], root=Path(job["root"]))
    data = ctx.open_data()
    train_variant(job["name"], job["vcfg"], data, resolve_device(job["cfg"].train.device), Path(job["ckpt"]),
                  budget=job["budget"], tokenizer_fraction=job["tokenizer_fraction"])
    return f"{job['name']} seed {job['seed']}"


def train_parallel(ctx: StageContext, jobs: list[dict], processes: int) -> None:
    """Run the missing trainings in ``processes`` spawned processes (threads split on the CPU)."""
    device = resolve_device(ctx.cfg.train.device)
    threads = max(1, (os.cpu_count() or 1) // processes) if device.type == "cpu" else max(1, torch.get_num_threads())
    for j in jobs:
        j.update(cfg=ctx.cfg, root=str(ctx.root), threads=threads)
    log.info("compare: training %d runs in %d processes (%d threads each)", len(jobs), processes, threads)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in pool.map(_train_in_process, jobs):
            log.info("compare: trained %s", done)


def run_variant(ctx: StageContext, name: str, seed: int, vcfg: Config, data, *, hash_: str, train_hash: str,
                overrides: dict, budget: str, num_samples: int, scales: list[float],
                tokenizer_fraction: float, features, references, device, tracker) -> dict:
    ckpt, done = _paths(ctx.paths.models, name, seed, train_hash)
    if ckpt.is_file() and done.is_file():
        train_info = json.loads(done.read_text())
        log.info("compare: %s seed %d already trained (%s): evaluating only", name, seed, ckpt.name)
    else:
        log.info("compare: training %s seed %d (%s)", name, seed, overrides or "the params as they are")
        train_info = train_variant(name, vcfg, data, device, ckpt, budget=budget,
                                   tokenizer_fraction=tokenizer_fraction)
    tracker.log_metric_history(train_info.pop("history", []))
    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state, use_ema=ctx.cfg.sample.use_ema, device=device)
    warn_if_ema_is_young(state, ctx.cfg.sample.use_ema, f"compare variant {name} seed {seed}")
    t0 = time.perf_counter()
    metrics, _ = evaluate_checkpoint_images(
        ctx, model, data, num_samples=num_samples, cfg_scales=scales, device=device, tracker=tracker, sanity=False,
        features=features, references=references, progress=False)
    row = {
        "variant": name, "seed": seed,
        **{k: metrics.get(k) for k in ("gfid", "best_cfg_scale", "rfid", "psnr", "ssim", "conditional_accuracy",
                                       "isc_mean", "kid_mean", "precision", "recall")},
        "parameters": count_parameters(model),
        "train_seconds": train_info["train_seconds"], "steps": train_info["steps"],
        "eval_seconds": time.perf_counter() - t0, "device": train_info.get("device") or device_label(device),
        "budget": budget, "minutes": vcfg.train.time_limit_minutes if budget == "time" else None,
        "num_samples": num_samples,
        "overrides": "two-stage baseline" if VARIANTS[name].two_stage else json.dumps(overrides),
        "details": train_info.get("details", ""), "params_hash": hash_,
    }
    tracker.log_params({"compare.variant": name, "compare.seed": seed, "compare.overrides": row["overrides"],
                        "compare.budget": budget, "compare.minutes": row["minutes"],
                        "compare.num_samples": num_samples})
    tracker.log_metrics({k: v for k, v in row.items() if k in NUMERIC and v is not None})
    return row


# --- The stage ---
def report_paths(ctx: StageContext) -> dict[str, Path]:
    return {"csv": ctx.paths.reports / "compare.csv", "md": ctx.paths.reports / "compare.md"}


#: options of run() / `unite compare` and their defaults (None: from the params)
OPTIONS = {"variants": None, "minutes": None, "samples": None, "scales": None, "budget": "time", "steps": None,
           "tokenizer_fraction": 0.5, "seeds": 3, "jobs": 1}


def run(ctx: StageContext, **options) -> dict:
    """Options (keyword arguments, else ctx.options, else :data:`OPTIONS`): those of `unite compare --help`;
    variants and scales may also be lists."""
    opts = stage_options(ctx, OPTIONS, CompareError, "compare", **options)
    variants, minutes, samples, scales = opts["variants"], opts["minutes"], opts["samples"], opts["scales"]
    budget, steps, tokenizer_fraction = opts["budget"], opts["steps"], float(opts["tokenizer_fraction"])
    seeds, jobs = int(opts["seeds"]), int(opts["jobs"])
    cfg = ctx.cfg
    if cfg.modality != "images":
        raise CompareError("unite compare evaluates image models (gFID, rFID, ...); use modality=images")
    if budget not in BUDGETS:
        raise CompareError(f"budget={budget!r}: use one of {', '.join(BUDGETS)}")
    if seeds < 1 or jobs < 1:
        raise CompareError(f"--seeds={seeds} and --jobs={jobs} must be >= 1")
    names = parse_variants(variants)
    scale_list = parse_scales(scales) if isinstance(scales, str) or scales is None else [float(s) for s in scales]
    scale_list = scale_list or list(cfg.eval.cfg_scales)
    minutes = float(minutes if minutes is not None else (cfg.train.time_limit_minutes or 10.0))
    if budget == "time" and minutes <= 0:
        raise CompareError(f"--minutes={minutes} must be > 0")
    if not 0.0 < float(tokenizer_fraction) < 1.0:
        raise CompareError(f"--tokenizer-fraction={tokenizer_fraction} must lie strictly between 0 and 1")
    num_samples = int(samples or cfg.eval.num_samples)
    if num_samples < 2:
        raise CompareError(f"--samples={num_samples} must be >= 2")

    device = resolve_device(cfg.train.device)
    data = ctx.open_data()
    classifier, _ = ctx.classifier(data, required=False)
    if classifier is None and cfg.eval.feature_extractor == "own":
        log.info("compare: no feature classifier yet; training it (the `classifier` stage)")
        ctx.train_classifier(data)
    features = ctx.feature_spec(data, device)
    references = in_memory_references(data)
    data_hash = str(data.info.get("content_hash", ""))
    cls_hash = classifier_fingerprint(features.classifier)[:16] if features.classifier is not None else ""

    paths = report_paths(ctx)
    rows = read_rows(paths["csv"])
    order = list(DEFAULT_VARIANTS)
    base_params = cfg.to_dict()
    plan = []  # (name, seed, vcfg, train hash, row hash) of every (variant, seed) to run
    skipped = []
    for name in names:
        for seed in range(cfg.train.seed, cfg.train.seed + seeds):
            vcfg = variant_config(cfg, name, budget=budget, minutes=minutes, steps=steps, seed=seed)
            th = training_hash(vcfg, name, budget=budget, tokenizer_fraction=tokenizer_fraction, data_hash=data_hash)
            h = variant_hash(th, vcfg, num_samples=num_samples, scales=scale_list, data_hash=data_hash,
                             classifier_hash=cls_hash)
            if rows.get((name, seed), {}).get("params_hash") == h:
                log.info("compare: %s seed %d is done (params hash %s): skipped", name, seed, h)
                skipped.append((name, seed))
            else:
                plan.append((name, seed, vcfg, th, h))
    untrained = [p for p in plan if not all(f.is_file() for f in _paths(ctx.paths.models, p[0], p[1], p[3]))]
    if jobs > 1 and len(untrained) > 1:
        train_parallel(ctx, [{"name": n, "seed": s, "vcfg": v, "ckpt": str(_paths(ctx.paths.models, n, s, th)[0]),
                              "budget": budget, "tokenizer_fraction": tokenizer_fraction}
                             for n, s, v, th, _ in untrained], min(jobs, len(untrained)))
    ran = []
    with ctx.reporter.progress(f"compare ({len(plan)} runs: {len(names)} variants x {seeds} seeds)",
                               len(plan)) as task:
        for i, (name, seed, vcfg, th, h) in enumerate(plan):
            with stage_run(ctx.root, cfg.tracking.experiment, f"compare-{name}-s{seed}", base_params,
                           enabled=cfg.tracking.enabled, extra_tags={"unite.variant": name, "unite.seed": str(seed)},
                           strict=cfg.tracking.strict) as tracker:
                task.update(i, variant=f"{name} s{seed}")
                overrides = variant_overrides(cfg, name, budget=budget, steps=steps, minutes=minutes)
                rows[(name, seed)] = run_variant(
                    ctx, name, seed, vcfg, data, hash_=h, train_hash=th, overrides=overrides, budget=budget,
                    num_samples=num_samples, scales=scale_list, tokenizer_fraction=tokenizer_fraction,
                    features=features, references=references, device=device, tracker=tracker)
            ran.append((name, seed))
            write_rows(rows, paths["csv"], order)  # progress survives an interruption
            task.update(i + 1, variant=f"{name} s{seed}", gfid=rows[(name, seed)].get("gfid"))

    from unite_core.eval_images import noise_floor

    floor = noise_floor(references[0], references[1], features=features)
    steps_text = f"train.steps={steps or cfg.train.steps}"
    meta = {
        "dataset": cfg.data.dataset, "feature_extractor": cfg.eval.feature_extractor, "num_samples": num_samples,
        "scales": ", ".join(f"{s:g}" for s in scale_list),
        "weights": "EMA" if cfg.sample.use_ema else "raw",
        "budget_text": (f"{minutes:g} min of training wall-clock per variant (two-stage: "
                        f"{tokenizer_fraction:.0%} tokenizer / {1 - tokenizer_fraction:.0%} denoiser), "
                        f"at most {steps_text} steps")
        if budget == "time" else f"{steps_text} optimizer steps per network",
        "noise_floor_fid": floor, "minibatches": cfg.flow.minibatches,
        "num_classes": int(data.info.get("num_classes", 0)),
    }
    doubled = [n for n in names if VARIANTS[n].budget_factor != 1.0]
    meta["budget_text"] += f"; {', '.join(doubled)}: twice that" if doubled else ""
    write_rows(rows, paths["csv"], order)
    atomic_write_text(paths["md"], render_markdown(rows, order, meta))
    ctx.tracker.log_artifact(paths["md"], "reports")
    ctx.tracker.log_artifact(paths["csv"], "reports")

    metrics: dict[str, Any] = {"noise_floor_fid": floor, "variants_run": len(ran), "variants_skipped": len(skipped)}
    summary = summarize(rows)
    for name, s in summary.items():
        for k in ("gfid", "rfid", "psnr", "conditional_accuracy", "isc_mean", "train_seconds", "steps"):
            if s.get(k) is not None:
                metrics[f"{name}_{k}"] = s[k]
            if s.get(f"{k}_std") is not None and k in ("gfid", "rfid", "psnr"):
                metrics[f"{name}_{k}_std"] = s[f"{k}_std"]
    for d in directions(summary, meta["num_classes"]):
        if d["verdict"] in ("reproduced", "reversed", "not resolved"):
            metrics[f"direction_{d['better']}_vs_{d['worse']}"] = {"reproduced": 1.0, "reversed": -1.0}.get(
                d["verdict"], 0.0)
    log.info("compare: ran %s, skipped %s -> %s", ran, skipped, paths["md"])
    return metrics
