"""`unite compare`: UNITE against its ablations and the two-stage baseline, at equal budget.

Each variant is the params (the embedded default unless you pass others) with a few overrides
(:data:`VARIANTS`), trained in-process with unite_core.train.Trainer (the two-stage baseline with
unite_core.two_stage) and evaluated with the same evaluation as the `evaluate` stage (guidance sweep, best
gFID, rFID/PSNR/SSIM, conditional accuracy, IS). Results: reports/compare.csv (one row per variant),
reports/compare.md (a markdown table + a note on the paper's four directions), one MLflow child run per
variant (tag unite.variant), and flat metrics returned to the caller.

Budget (``budget``):
- "time" (default): every variant trains for ``minutes`` of wall-clock (train.steps still caps the step
  count and sets the cosine schedule); the two-stage baseline splits the same minutes between its stages
  (``tokenizer_fraction`` to stage 1, the rest to stage 2).
- "steps": every network trains train.steps optimizer steps, without a time limit (the two-stage baseline:
  train.steps for the tokenizer and train.steps for the denoiser).

Resumable: a variant whose row in reports/compare.csv carries the same params hash (variant config, budget,
evaluation settings, data and classifier) is not redone; a finished training whose evaluation did not
complete is evaluated from its checkpoint (models/compare/<variant>-<hash>.pt) without retraining.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from unite_core.config import Config, config_from_dict
from unite_core.io import atomic_write_text
from unite_core.metrics.images import classifier_fingerprint
from unite_core.train import Trainer, load_checkpoint, model_from_checkpoint, resolve_device
from unite_core.two_stage import TwoStageBudget, train_two_stage

from ..context import StageContext
from ..tracking import stage_run
from .classifier import load_checked_classifier, load_stage_data, train_and_save
from .evaluate import evaluate_checkpoint_images, feature_spec, reference_images, warn_if_ema_is_young

log = logging.getLogger(__name__)

#: variant name -> overrides of the params (dotted keys). "two_stage" is trained by unite_core.two_stage.
VARIANTS: dict[str, dict[str, Any]] = {
    "unite": {},
    "two_stage": {},
    "separate_weights": {"model.weight_sharing": "separate"},
    "no_stop_grad": {"flow.stop_grad": False},
    "no_noise_aug": {"loss.decoder_noise": False},
    "flow_minibatches_1": {"flow.minibatches": 1},
    "no_shift": {"flow.shift": None},
}
DEFAULT_VARIANTS = tuple(VARIANTS)
BUDGETS = ("time", "steps")

#: the paper's directions: (label, the variant that should be better (lower gFID), the one it beats)
DIRECTIONS = (
    ("UNITE <= two-stage (gFID)", "unite", "two_stage"),
    ("stop-grad <= no stop-grad (gFID)", "unite", "no_stop_grad"),
    ("noise augmentation <= none (gFID)", "unite", "no_noise_aug"),
    ("M=3 flow mini-batches <= M=1 (gFID)", "unite", "flow_minibatches_1"),
)

CSV_COLUMNS = (
    "variant", "gfid", "best_cfg_scale", "rfid", "psnr", "ssim", "conditional_accuracy", "isc_mean", "kid_mean",
    "precision", "recall", "train_seconds", "steps", "eval_seconds", "device", "budget", "minutes", "num_samples",
    "overrides", "details", "params_hash",
)
NUMERIC = {"gfid", "best_cfg_scale", "rfid", "psnr", "ssim", "conditional_accuracy", "isc_mean", "kid_mean",
           "precision", "recall", "train_seconds", "steps", "eval_seconds", "minutes", "num_samples"}


class CompareError(ValueError):
    """A user-facing problem with the comparison's options."""


# ----------------------------------------------------------------------------------------------
# Variant configs and hashes
# ----------------------------------------------------------------------------------------------
def parse_variants(text: str | None) -> list[str]:
    if text is None or not str(text).strip():
        return list(DEFAULT_VARIANTS)
    names = [v.strip() for v in str(text).split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise CompareError(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)} (comma-separated)")
    return list(dict.fromkeys(names))


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


def variant_config(cfg: Config, name: str, *, budget: str, minutes: Optional[float], steps: Optional[int]) -> Config:
    data = cfg.to_dict()
    overrides = dict(VARIANTS[name])
    if steps is not None:
        overrides["train.steps"] = int(steps)
        overrides["train.warmup_steps"] = min(cfg.train.warmup_steps, max(0, int(steps) - 1))
    overrides["train.time_limit_minutes"] = float(minutes) if budget == "time" else None
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return config_from_dict(data)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_hash(vcfg: Config, name: str, *, budget: str, minutes: Optional[float], tokenizer_fraction: float,
                  data_hash: str = "") -> str:
    """What defines a variant's trained checkpoint (models/compare/<variant>-<this>.pt)."""
    d = vcfg.to_dict()
    relevant = {k: d[k] for k in ("modality", "data", "model", "flow", "loss", "train")}
    return _hash({
        "variant": name, "config": relevant, "budget": budget, "minutes": minutes if budget == "time" else None,
        "tokenizer_fraction": tokenizer_fraction if name == "two_stage" else None, "data": data_hash,
    })


def variant_hash(train_hash: str, vcfg: Config, *, num_samples: int, scales: list[float], data_hash: str,
                 classifier_hash: str) -> str:
    """What defines a row of the table: the training plus every evaluation setting."""
    d = vcfg.to_dict()
    evaluation = {k: d["eval"][k] for k in ("feature_extractor", "inception_weights", "kid_subset_size")}
    return _hash({"train": train_hash, "sample": d["sample"], "eval": evaluation, "num_samples": num_samples,
                  "scales": scales, "data": data_hash, "classifier": classifier_hash})


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def read_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("variant"):
                rows[row["variant"]] = {k: _parse(k, v) for k, v in row.items()}
    return rows


def _parse(key: str, value: str):
    if key in NUMERIC:
        if value in ("", None):
            return None
        try:
            return float(value)
        except ValueError:
            return None
    return value


def write_rows(rows: dict[str, dict], path: Path, order: list[str]) -> None:
    names = [v for v in order if v in rows] + sorted(v for v in rows if v not in order)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS))
    w.writeheader()
    for name in names:
        r = rows[name]
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def device_label(device) -> str:
    """Where a variant trained, for the table: "cpu (<arch>, <threads> threads)" or "cuda (<GPU name>)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def _fmt(v, digits=2, suffix=""):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}{suffix}"


def _minutes(seconds):
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min"


def collapsed(row: dict, num_classes: int | None) -> bool:
    """Class-independent samples: conditional accuracy at most 1.5x chance (then gFID compares nothing)."""
    acc = row.get("conditional_accuracy")
    return bool(num_classes) and acc is not None and acc <= 1.5 / num_classes


def directions(rows: dict[str, dict], num_classes: int | None = None) -> list[dict]:
    """For each of the paper's directions: measured gFIDs and whether the run reproduces it.

    "inconclusive" when the variant that should win produced class-independent samples
    (:func:`collapsed`): the budget did not train it, so its gFID compares nothing. An ablation that
    collapses while that variant learned at the same budget has failed where it succeeded, which
    is the direction (the ablation's gFID is the larger, the verdict follows from the numbers)."""
    out = []
    for label, better, worse in DIRECTIONS:
        a = rows.get(better, {}).get("gfid")
        b = rows.get(worse, {}).get("gfid")
        if a is None or b is None:
            verdict = "not measured"
        elif collapsed(rows[better], num_classes):
            verdict = "inconclusive"
        else:
            verdict = "reproduced" if a <= b else "not reproduced"
        out.append({"direction": label, "better": better, "worse": worse, "gfid_better": a, "gfid_worse": b,
                    "verdict": verdict})
    return out


def render_markdown(rows: dict[str, dict], order: list[str], meta: dict) -> str:
    names = [v for v in order if v in rows] + sorted(v for v in rows if v not in order)
    lines = [
        "# UNITE vs ablations and the two-stage baseline",
        "",
        f"Data: {meta.get('dataset')}; features: {meta.get('feature_extractor')}; "
        f"{meta.get('num_samples')} class-balanced samples per guidance scale, scales {meta.get('scales')}; "
        f"{meta.get('weights')} weights; budget: {meta.get('budget_text')}.",
        "",
        "| variant | gFID (best scale) | rFID | PSNR (dB) | cond. acc. | IS | train time | steps | device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = rows[name]
        gfid = f"{_fmt(r.get('gfid'))} (w={_fmt(r.get('best_cfg_scale'), 1)})"
        acc = "n/a" if r.get("conditional_accuracy") is None else f"{100 * r['conditional_accuracy']:.1f}%"
        steps = "n/a" if r.get("steps") is None else f"{int(r['steps'])}"
        if r.get("details"):
            steps += f" ({r['details']})"
        lines.append(
            f"| {name} | {gfid} | {_fmt(r.get('rfid'))} | {_fmt(r.get('psnr'))} | {acc} | "
            f"{_fmt(r.get('isc_mean'))} | {_minutes(r.get('train_seconds'))} | {steps} | {r.get('device') or 'n/a'} |"
        )
    lines += ["", f"Noise floor FID(val vs train) with these features: {_fmt(meta.get('noise_floor_fid'))} "
              "(what a perfect generator scores; gFID differences of that size are within sampling noise).", ""]
    flat = [n for n in names if collapsed(rows[n], meta.get("num_classes"))]
    if flat:
        lines += [f"Warning: class-independent samples (conditional accuracy at chance) from {', '.join(flat)}. "
                  "Where the variant each direction favours is among them, its generator did not train in this "
                  "budget and the direction is inconclusive (train longer: --minutes / --steps); an ablation "
                  "that collapsed where that variant learned has failed at the same budget.", ""]
    lines.append("The paper's directions (lower gFID is better):")
    lines.append("")
    for d in directions(rows, meta.get("num_classes")):
        if d["verdict"] == "not measured":
            lines.append(f"- {d['direction']}: not measured (run the variants `{d['better']}` and `{d['worse']}`).")
            continue
        diff = d["gfid_worse"] - d["gfid_better"]
        lines.append(
            f"- {d['direction']}: **{d['verdict']}** ({d['better']} {_fmt(d['gfid_better'])} vs "
            f"{d['worse']} {_fmt(d['gfid_worse'])}, difference {diff:+.2f})."
        )
    m = meta.get("minibatches")
    if m is not None and m != 3:
        lines.append(f"- note: the `unite` variant uses flow.minibatches={m} from the params, not 3.")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# One variant
# ----------------------------------------------------------------------------------------------
def _train_variant(name: str, vcfg: Config, data, device, ckpt: Path, *, budget: str, minutes: Optional[float],
                   tokenizer_fraction: float, on_log: Callable | None) -> dict:
    if name == "two_stage":
        b = TwoStageBudget(minutes=minutes if budget == "time" else None, tokenizer_fraction=tokenizer_fraction)
        r = train_two_stage(vcfg, data.info, data.train, val_set=data.val, budget=b, device=device,
                            checkpoint_path=ckpt,
                            on_log=None if on_log is None else (lambda stage, step, rec: on_log(step, {
                                f"{stage}_{k}": v for k, v in rec.items()})))
        return {"train_seconds": r.seconds, "steps": r.steps,
                "details": f"tokenizer {r.tokenizer_steps} + denoiser {r.denoiser_steps}"}
    trainer = Trainer(vcfg, data.info, data.train, device, val_set=data.val)
    limit = minutes * 60.0 if budget == "time" else math.inf
    r = trainer.run(vcfg.train.steps, on_log=on_log, checkpoint_path=ckpt, time_limit_s=limit)
    return {"train_seconds": r.seconds, "steps": r.step, "details": ""}


def run_variant(ctx: StageContext, name: str, vcfg: Config, data, *, hash_: str, train_hash: str, budget: str,
                minutes: Optional[float], num_samples: int, scales: list[float], tokenizer_fraction: float,
                features, references, device, tracker) -> dict:
    folder = ctx.paths.models / "compare"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / f"{name}-{train_hash}.pt"
    done = ckpt.with_suffix(".json")
    if ckpt.is_file() and done.is_file():
        train_info = json.loads(done.read_text())
        log.info("compare: %s already trained (%s): evaluating only", name, ckpt.name)
    else:
        log.info("compare: training %s (%s)", name, VARIANTS[name] or "the params as they are")
        for stale in folder.glob(f"{name}-*.pt"):
            stale.unlink()
        for stale in folder.glob(f"{name}-*.json"):
            stale.unlink()
        history: list[dict] = []

        def on_log(step, record):
            history.append({"step": step, **{f"train_{k}": v for k, v in record.items() if k != "step"}})

        train_info = _train_variant(name, vcfg, data, device, ckpt, budget=budget, minutes=minutes,
                                    tokenizer_fraction=tokenizer_fraction, on_log=on_log)
        tracker.log_metric_history(history)
        atomic_write_text(done, json.dumps(train_info))
    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state, use_ema=ctx.cfg.sample.use_ema, device=device)
    warn_if_ema_is_young(state, ctx.cfg.sample.use_ema, f"compare variant {name}")
    t0 = time.perf_counter()
    metrics, _ = evaluate_checkpoint_images(
        ctx, model, data, num_samples=num_samples, cfg_scales=scales, device=device, write_outputs=False,
        tracker=tracker, sanity=False, features=features, references=references, progress=False,
    )
    row = {
        "variant": name, **{k: metrics.get(k) for k in ("gfid", "best_cfg_scale", "rfid", "psnr", "ssim",
                                                        "conditional_accuracy", "isc_mean", "kid_mean",
                                                        "precision", "recall")},
        "train_seconds": train_info["train_seconds"], "steps": train_info["steps"],
        "eval_seconds": time.perf_counter() - t0, "device": device_label(device), "budget": budget,
        "minutes": minutes if budget == "time" else None, "num_samples": num_samples,
        "overrides": json.dumps(VARIANTS[name]) if name != "two_stage" else "two-stage baseline",
        "details": train_info.get("details", ""), "params_hash": hash_,
    }
    tracker.log_params({"compare.variant": name, "compare.overrides": row["overrides"], "compare.budget": budget,
                        "compare.minutes": row["minutes"], "compare.num_samples": num_samples})
    tracker.log_metrics({k: v for k, v in row.items() if k in NUMERIC and v is not None})
    return row


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def report_paths(ctx: StageContext) -> dict[str, Path]:
    return {"csv": ctx.paths.reports / "compare.csv", "md": ctx.paths.reports / "compare.md"}


#: options of run() / `unite compare` and their defaults (None: from the params)
OPTIONS = {"variants": None, "minutes": None, "samples": None, "scales": None, "budget": "time", "steps": None,
           "tokenizer_fraction": 0.5}


def run(ctx: StageContext, **options) -> dict:
    """Options (keyword arguments, else ctx.options, else :data:`OPTIONS`): variants (comma list or list),
    minutes (per variant; default train.time_limit_minutes), samples (per guidance scale; default
    eval.num_samples), scales (comma list or list; default eval.cfg_scales), budget ("time" | "steps"),
    steps (override train.steps), tokenizer_fraction (two-stage: stage 1's share of the budget)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise CompareError(f"unknown compare option(s) {sorted(unknown)}: known are {sorted(OPTIONS)}")
    opts = {k: options.get(k, ctx.options.get(k)) for k in OPTIONS}
    opts = {k: (OPTIONS[k] if v is None else v) for k, v in opts.items()}
    variants, minutes, samples, scales = opts["variants"], opts["minutes"], opts["samples"], opts["scales"]
    budget, steps, tokenizer_fraction = opts["budget"], opts["steps"], float(opts["tokenizer_fraction"])
    cfg = ctx.cfg
    if cfg.modality != "images":
        raise CompareError("unite compare evaluates image models (gFID, rFID, ...); use modality=images")
    if budget not in BUDGETS:
        raise CompareError(f"budget={budget!r}: use one of {', '.join(BUDGETS)}")
    names = parse_variants(variants) if not isinstance(variants, list) else parse_variants(",".join(variants))
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
    data = load_stage_data(ctx)
    classifier, _ = load_checked_classifier(ctx, data, required=False)
    if classifier is None and cfg.eval.feature_extractor == "own":
        log.info("compare: no feature classifier yet; training it (the `classifier` stage)")
        train_and_save(ctx, data)
    features = feature_spec(ctx, data, device)
    references = reference_images(data)
    data_hash = str(data.info.get("content_hash", ""))
    cls_hash = classifier_fingerprint(features.classifier)[:16] if features.classifier is not None else ""

    paths = report_paths(ctx)
    rows = read_rows(paths["csv"])
    order = list(DEFAULT_VARIANTS)
    base_params = cfg.to_dict()
    ran, skipped = [], []
    with ctx.reporter.progress(f"compare ({len(names)} variants)", len(names)) as task:
        for i, name in enumerate(names):
            vcfg = variant_config(cfg, name, budget=budget, minutes=minutes, steps=steps)
            th = training_hash(vcfg, name, budget=budget, minutes=minutes, tokenizer_fraction=tokenizer_fraction,
                               data_hash=data_hash)
            h = variant_hash(th, vcfg, num_samples=num_samples, scales=scale_list, data_hash=data_hash,
                             classifier_hash=cls_hash)
            if rows.get(name, {}).get("params_hash") == h:
                log.info("compare: %s is done (params hash %s): skipped", name, h)
                skipped.append(name)
                continue
            with stage_run(ctx.root, cfg.tracking.experiment, f"compare-{name}", base_params,
                           enabled=cfg.tracking.enabled, extra_tags={"unite.variant": name},
                           strict=cfg.tracking.strict) as tracker:
                task.update(i, variant=name)
                rows[name] = run_variant(ctx, name, vcfg, data, hash_=h, train_hash=th, budget=budget, minutes=minutes,
                                         num_samples=num_samples, scales=scale_list,
                                         tokenizer_fraction=tokenizer_fraction, features=features,
                                         references=references, device=device, tracker=tracker)
            ran.append(name)
            write_rows(rows, paths["csv"], order)  # progress survives an interruption
            task.update(i + 1, variant=name, gfid=rows[name].get("gfid"))

    from unite_core.evaluate import noise_floor

    floor = noise_floor(references[0], references[1], features=features)
    meta = {
        "dataset": cfg.data.dataset, "feature_extractor": cfg.eval.feature_extractor, "num_samples": num_samples,
        "scales": ", ".join(f"{s:g}" for s in scale_list),
        "weights": "EMA" if cfg.sample.use_ema else "raw",
        "budget_text": (f"{minutes:g} min of training wall-clock per variant (two-stage: "
                        f"{tokenizer_fraction:.0%} tokenizer / {1 - tokenizer_fraction:.0%} denoiser), "
                        f"at most train.steps={steps or cfg.train.steps} steps")
        if budget == "time" else f"train.steps={steps or cfg.train.steps} optimizer steps per network",
        "noise_floor_fid": floor, "minibatches": cfg.flow.minibatches,
        "num_classes": int(data.info.get("num_classes", 0)),
    }
    write_rows(rows, paths["csv"], order)
    atomic_write_text(paths["md"], render_markdown(rows, order, meta))
    ctx.tracker.log_artifact(paths["md"], "reports")
    ctx.tracker.log_artifact(paths["csv"], "reports")

    metrics: dict[str, Any] = {"noise_floor_fid": floor, "variants_run": len(ran), "variants_skipped": len(skipped)}
    for name, r in rows.items():
        for k in ("gfid", "rfid", "psnr", "conditional_accuracy", "isc_mean", "train_seconds", "steps"):
            if r.get(k) is not None:
                metrics[f"{name}_{k}"] = r[k]
    for d in directions(rows, meta["num_classes"]):
        if d["verdict"] in ("reproduced", "not reproduced"):
            metrics[f"direction_{d['better']}_vs_{d['worse']}"] = 1.0 if d["verdict"] == "reproduced" else 0.0
    log.info("compare: ran %s, skipped %s -> %s", ran, skipped, paths["md"])
    return metrics
