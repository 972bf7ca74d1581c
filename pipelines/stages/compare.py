"""Stage `compare` (`unite compare`): UNITE against its ablations and the two-stage baseline, at equal budget.
Over 500 lines because the variants, the resumable results table and its report are one feature.

Each variant (VARIANTS: overrides of the params) is trained once per seed (train.seed, +1, ...) and
evaluated like the `evaluate` stage; results in reports/compare.csv (a row per variant and seed),
reports/compare.md (mean +- std and a verdict per paper direction, see `directions`) and one MLflow child
run each. Budget "time" (`minutes` per variant; two-stage splits them by `tokenizer_fraction`) or "steps".
`jobs` > 1 trains the missing runs in parallel processes first. Resumable: a row with the same params hash
is kept; a finished training is evaluated from models/compare/<variant>-s<seed>-<hash>.pt.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from unite_core.config import Config, config_from_dict
from unite_core.io import atomic_write_text
from unite_core.metrics.images import classifier_fingerprint
from unite_core.model import count_parameters
from unite_core.devices import resolve_device
from unite_core.train import Trainer, load_checkpoint, model_from_checkpoint
from unite_core.two_stage import TwoStageBudget, train_two_stage

from ..context import StageContext
from ..evaluation import evaluate_checkpoint_images, reference_images, warn_if_ema_is_young
from ..inputs import feature_spec, load_checked_classifier, open_data, train_classifier
from ..tracking import stage_run
from . import short_hash, stage_options

log = logging.getLogger(__name__)


def _double_budget(cfg: Config, steps: Optional[int], minutes: Optional[float]) -> dict[str, Any]:
    return {"train.steps": 2 * int(steps or cfg.train.steps), "_minutes_factor": 2.0}


def _double_depth(cfg: Config, steps: Optional[int], minutes: Optional[float]) -> dict[str, Any]:
    depth, width, heads = cfg.model.ge_dims()
    return {"model.ge_size": "custom", "model.ge_depth": 2 * depth, "model.ge_width": width, "model.ge_heads": heads}


#: variant name -> overrides of the params (dotted keys), or a function (cfg, steps, minutes) -> overrides
#: ("_minutes_factor" scales a time budget). "two_stage" is trained by unite_core.two_stage.
VARIANTS: dict[str, dict[str, Any] | Callable[..., dict[str, Any]]] = {
    "unite": {},
    "two_stage": {},
    "separate_weights": {"model.weight_sharing": "separate"},
    "unite_param_matched": _double_depth,
    "unite_2x_steps": _double_budget,
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
    ("UNITE with 2x steps <= two-stage (gFID)", "unite_2x_steps", "two_stage"),
    ("shared weights <= separate weights (gFID)", "unite", "separate_weights"),
    ("shared, parameter-matched <= separate weights (gFID)", "unite_param_matched", "separate_weights"),
    ("stop-grad <= no stop-grad (gFID)", "unite", "no_stop_grad"),
    ("noise augmentation <= none (gFID)", "unite", "no_noise_aug"),
    ("M=3 flow mini-batches <= M=1 (gFID)", "unite", "flow_minibatches_1"),
)

CSV_COLUMNS = (
    "variant", "seed", "gfid", "best_cfg_scale", "rfid", "psnr", "ssim", "conditional_accuracy", "isc_mean",
    "kid_mean", "precision", "recall", "parameters", "train_seconds", "steps", "eval_seconds", "device", "budget",
    "minutes", "num_samples", "overrides", "details", "params_hash",
)
NUMERIC = {"seed", "gfid", "best_cfg_scale", "rfid", "psnr", "ssim", "conditional_accuracy", "isc_mean",
           "kid_mean", "precision", "recall", "parameters", "train_seconds", "steps", "eval_seconds", "minutes",
           "num_samples"}
#: the metrics summarised as mean +- std over seeds
SUMMARY = ("gfid", "rfid", "psnr", "conditional_accuracy", "isc_mean", "train_seconds", "steps", "parameters")


class CompareError(ValueError):
    """A user-facing problem with the comparison's options."""


# --- Variant configs and hashes ---
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


def variant_overrides(cfg: Config, name: str, *, steps: Optional[int] = None,
                      minutes: Optional[float] = None) -> dict[str, Any]:
    """The dotted overrides that make variant ``name`` from ``cfg`` (without the budget)."""
    spec = VARIANTS[name]
    return dict(spec(cfg, steps, minutes) if callable(spec) else spec)


def variant_config(cfg: Config, name: str, *, budget: str, minutes: Optional[float], steps: Optional[int],
                   seed: Optional[int] = None) -> Config:
    overrides = variant_overrides(cfg, name, steps=steps, minutes=minutes)
    factor = float(overrides.pop("_minutes_factor", 1.0))
    n = int(overrides.get("train.steps", steps if steps is not None else cfg.train.steps))
    overrides["train.steps"] = n
    overrides["train.warmup_steps"] = min(cfg.train.warmup_steps, max(0, n - 1))
    overrides["train.time_limit_minutes"] = float(minutes) * factor if budget == "time" else None
    if seed is not None:
        overrides["train.seed"] = int(seed)
    return config_from_dict(cfg.to_dict(), overrides)


def training_hash(vcfg: Config, name: str, *, budget: str, minutes: Optional[float], tokenizer_fraction: float,
                  data_hash: str = "") -> str:
    """What defines a variant's trained checkpoint (models/compare/<variant>-s<seed>-<this>.pt)."""
    d = vcfg.to_dict()
    relevant = {k: d[k] for k in ("modality", "data", "model", "flow", "loss", "train")}
    return short_hash({
        "variant": name, "config": relevant, "budget": budget,
        "minutes": vcfg.train.time_limit_minutes if budget == "time" else None,
        "tokenizer_fraction": tokenizer_fraction if name == "two_stage" else None, "data": data_hash,
    })


def variant_hash(train_hash: str, vcfg: Config, *, num_samples: int, scales: list[float], data_hash: str,
                 classifier_hash: str) -> str:
    """What defines a row of the table: the training plus every evaluation setting."""
    d = vcfg.to_dict()
    evaluation = {k: d["eval"][k] for k in ("feature_extractor", "inception_weights", "kid_subset_size")}
    return short_hash({"train": train_hash, "sample": d["sample"], "eval": evaluation, "num_samples": num_samples,
                  "scales": scales, "data": data_hash, "classifier": classifier_hash})


# --- Files ---
Key = tuple  # (variant, seed)


def read_rows(path: Path) -> dict[Key, dict]:
    """reports/compare.csv as {(variant, seed): row}; a file from before seeds counts as seed 0."""
    if not path.is_file():
        return {}
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("variant"):
                parsed = {k: _parse(k, v) for k, v in row.items()}
                parsed["seed"] = int(parsed.get("seed") or 0)
                rows[(row["variant"], parsed["seed"])] = parsed
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


def _ordered(keys, order: list[str]) -> list[Key]:
    rank = {v: i for i, v in enumerate(order)}
    return sorted(keys, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))


def write_rows(rows: dict[Key, dict], path: Path, order: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS))
    w.writeheader()
    for key in _ordered(rows, order):
        r = rows[key]
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def device_label(device) -> str:
    """Where a variant trained, for the table: "cpu (<arch>, <threads> threads)" or "cuda (<GPU name>)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def summarize(rows: dict[Key, dict]) -> dict[str, dict]:
    """{variant: {"seeds": n, "<metric>": mean, "<metric>_std": std over seeds (None with one seed)}}."""
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(k[0] for k in rows):
        group = [r for k, r in rows.items() if k[0] == variant]
        s: dict[str, Any] = {"seeds": len(group), "device": group[0].get("device")}
        for metric in SUMMARY:
            values = [float(r[metric]) for r in group if r.get(metric) is not None and math.isfinite(float(r[metric]))]
            s[metric] = statistics.fmean(values) if values else None
            s[f"{metric}_std"] = statistics.stdev(values) if len(values) >= 2 else None
        out[variant] = s
    return out


def _fmt(v, digits=2, suffix=""):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}{suffix}"


def _pm(s: dict, metric: str, digits=2, scale=1.0, suffix="") -> str:
    mean, std = s.get(metric), s.get(f"{metric}_std")
    if mean is None:
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "") + suffix


def _minutes(seconds):
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def collapsed(row: dict, num_classes: int | None) -> bool:
    """Class-independent samples: conditional accuracy at most 1.5x chance (then gFID compares nothing)."""
    acc = row.get("conditional_accuracy")
    return bool(num_classes) and acc is not None and acc <= 1.5 / num_classes


def directions(summary: dict[str, dict], num_classes: int | None = None) -> list[dict]:
    """For each paper direction, the mean gFIDs of :func:`summarize`'s output and a verdict: "reproduced" /
    "reversed" when the favoured variant's mean is lower / higher by more than the spread (sum of the two stds
    over seeds); "not resolved" within the spread or with fewer than two seeds a side; "inconclusive" when
    the favoured variant's samples are class-independent (:func:`collapsed`: the budget did not train it)."""
    out = []
    for label, better, worse in DIRECTIONS:
        a, b = summary.get(better, {}), summary.get(worse, {})
        ga, gb = a.get("gfid"), b.get("gfid")
        spread = None
        if ga is None or gb is None:
            verdict = "not measured"
        elif collapsed(a, num_classes):
            verdict = "inconclusive"
        elif a.get("gfid_std") is None or b.get("gfid_std") is None:
            verdict = "not resolved"
        else:
            spread = a["gfid_std"] + b["gfid_std"]
            verdict = "not resolved" if abs(gb - ga) <= spread else ("reproduced" if ga < gb else "reversed")
        out.append({"direction": label, "better": better, "worse": worse, "gfid_better": ga, "gfid_worse": gb,
                    "spread": spread, "seeds_better": a.get("seeds", 1 if ga is not None else 0),
                    "seeds_worse": b.get("seeds", 1 if gb is not None else 0), "verdict": verdict})
    return out


def render_markdown(rows: dict[Key, dict], order: list[str], meta: dict) -> str:
    summary = summarize(rows)
    names = [v for v in order if v in summary] + sorted(v for v in summary if v not in order)
    lines = [
        "# UNITE vs ablations and the two-stage baseline",
        "",
        f"Data: {meta.get('dataset')}; features: {meta.get('feature_extractor')}; "
        f"{meta.get('num_samples')} class-balanced samples per guidance scale, scales {meta.get('scales')}; "
        f"{meta.get('weights')} weights; budget: {meta.get('budget_text')}.",
        "",
        "Mean ± standard deviation over seeds (each seed's gFID at its best guidance scale):",
        "",
        "| variant | seeds | gFID | rFID | PSNR (dB) | cond. acc. (%) | IS | parameters | train time | steps | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = summary[name]
        params = "n/a" if s.get("parameters") is None else f"{s['parameters'] / 1e6:.2f} M"
        lines.append(
            f"| {name} | {s['seeds']} | {_pm(s, 'gfid')} | {_pm(s, 'rfid')} | {_pm(s, 'psnr')} | "
            f"{_pm(s, 'conditional_accuracy', 1, 100.0)} | {_pm(s, 'isc_mean')} | {params} | "
            f"{_minutes(s.get('train_seconds'))} | {_fmt(s.get('steps'), 0)} | {s.get('device') or 'n/a'} |"
        )
    lines += ["", "Every run:", "",
              "| variant | seed | gFID (best scale) | rFID | PSNR (dB) | cond. acc. | steps | train time | device |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key in _ordered(rows, order):
        r = rows[key]
        acc = "n/a" if r.get("conditional_accuracy") is None else f"{100 * r['conditional_accuracy']:.1f}%"
        steps = "n/a" if r.get("steps") is None else f"{int(r['steps'])}"
        if r.get("details"):
            steps += f" ({r['details']})"
        lines.append(
            f"| {key[0]} | {key[1]} | {_fmt(r.get('gfid'))} (w={_fmt(r.get('best_cfg_scale'), 1)}) | "
            f"{_fmt(r.get('rfid'))} | {_fmt(r.get('psnr'))} | {acc} | {steps} | {_minutes(r.get('train_seconds'))} | "
            f"{r.get('device') or 'n/a'} |")
    lines += ["", f"Noise floor FID(val vs train) with these features: {_fmt(meta.get('noise_floor_fid'))} "
              "(what a perfect generator scores; gFID differences of that size are within sampling noise).", ""]
    num_classes = meta.get("num_classes")
    flat = [n for n in names if collapsed(summary[n], num_classes)]
    if flat:
        lines += [f"Warning: class-independent samples (conditional accuracy at chance) from {', '.join(flat)}. "
                  "Where the variant each direction favours is among them, its generator did not train in this "
                  "budget and the direction is inconclusive (train longer: --minutes / --steps); an ablation "
                  "that collapsed where that variant learned has failed at the same budget.", ""]
    lines += ["The paper's directions (lower gFID is better; a difference of the means within the seed spread, "
              "the sum of the two standard deviations, is not resolved):", ""]
    for d in directions(summary, num_classes):
        if d["verdict"] == "not measured":
            lines.append(f"- {d['direction']}: not measured (run the variants `{d['better']}` and `{d['worse']}`).")
            continue
        diff = d["gfid_worse"] - d["gfid_better"]
        why = (f"spread {d['spread']:.2f}" if d["spread"] is not None
               else f"seeds {d['seeds_better']} and {d['seeds_worse']}: a spread needs two or more each")
        lines.append(
            f"- {d['direction']}: **{d['verdict']}** ({d['better']} {_pm(summary[d['better']], 'gfid')} vs "
            f"{d['worse']} {_pm(summary[d['worse']], 'gfid')}, difference {diff:+.2f}; {why})."
        )
    m = meta.get("minibatches")
    if m is not None and m != 3:
        lines.append(f"- note: the `unite` variant uses flow.minibatches={m} from the params, not 3.")
    lines.append("")
    return "\n".join(lines)


# --- One variant and seed ---
def _train_variant(name: str, vcfg: Config, data, device, ckpt: Path, *, budget: str, minutes: Optional[float],
                   tokenizer_fraction: float, on_log: Callable | None) -> dict:
    limit_min = vcfg.train.time_limit_minutes if budget == "time" else None
    if name == "two_stage":
        b = TwoStageBudget(minutes=limit_min, tokenizer_fraction=tokenizer_fraction)
        r = train_two_stage(vcfg, data.info, data.train, val_set=data.val, budget=b, device=device,
                            checkpoint_path=ckpt,
                            on_log=None if on_log is None else (lambda stage, step, rec: on_log(step, {
                                f"{stage}_{k}": v for k, v in rec.items()})))
        return {"train_seconds": r.seconds, "steps": r.steps,
                "details": f"tokenizer {r.tokenizer_steps} + denoiser {r.denoiser_steps}"}
    trainer = Trainer(vcfg, data.info, data.train, device, val_set=data.val)
    limit = limit_min * 60.0 if limit_min else math.inf
    r = trainer.run(vcfg.train.steps, on_log=on_log, checkpoint_path=ckpt, time_limit_s=limit)
    return {"train_seconds": r.seconds, "steps": r.step, "details": ""}


def _paths(ctx_models: Path, name: str, seed: int, train_hash: str) -> tuple[Path, Path]:
    ckpt = ctx_models / "compare" / f"{name}-s{seed}-{train_hash}.pt"
    return ckpt, ckpt.with_suffix(".json")


def train_one(name: str, seed: int, vcfg: Config, data, device, ckpt: Path, *, budget: str,
              minutes: Optional[float], tokenizer_fraction: float) -> dict:
    """Train one (variant, seed) to ``ckpt``; its info (time, steps, device, curve) goes next to it as .json."""
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*ckpt.parent.glob(f"{name}-s{seed}-*.pt"), *ckpt.parent.glob(f"{name}-s{seed}-*.json")]:
        stale.unlink()
    history: list[dict] = []

    def on_log(step, record):
        history.append({"step": step, **{f"train_{k}": v for k, v in record.items() if k != "step"}})

    info = _train_variant(name, vcfg, data, device, ckpt, budget=budget, minutes=minutes,
                          tokenizer_fraction=tokenizer_fraction, on_log=on_log)
    info.update(device=device_label(device), history=history)
    atomic_write_text(ckpt.with_suffix(".json"), json.dumps(info))
    return info


def _train_in_process(job: dict) -> str:
    """A worker process of ``jobs > 1``: loads the data itself and trains one (variant, seed)."""
    torch.set_num_threads(job["threads"])
    ctx = StageContext(cfg=job["cfg"], root=Path(job["root"]))
    data = open_data(ctx)
    train_one(job["name"], job["seed"], job["vcfg"], data, resolve_device(job["cfg"].train.device), Path(job["ckpt"]),
              budget=job["budget"], minutes=job["minutes"], tokenizer_fraction=job["tokenizer_fraction"])
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
                overrides: dict, budget: str, minutes: Optional[float], num_samples: int, scales: list[float],
                tokenizer_fraction: float, features, references, device, tracker) -> dict:
    ckpt, done = _paths(ctx.paths.models, name, seed, train_hash)
    if ckpt.is_file() and done.is_file():
        train_info = json.loads(done.read_text())
        log.info("compare: %s seed %d already trained (%s): evaluating only", name, seed, ckpt.name)
    else:
        log.info("compare: training %s seed %d (%s)", name, seed, overrides or "the params as they are")
        train_info = train_one(name, seed, vcfg, data, device, ckpt, budget=budget, minutes=minutes,
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
        "overrides": json.dumps(overrides) if name != "two_stage" else "two-stage baseline",
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
    data = open_data(ctx)
    classifier, _ = load_checked_classifier(ctx, data, required=False)
    if classifier is None and cfg.eval.feature_extractor == "own":
        log.info("compare: no feature classifier yet; training it (the `classifier` stage)")
        train_classifier(ctx, data)
    features = feature_spec(ctx, data, device)
    references = reference_images(data)
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
            th = training_hash(vcfg, name, budget=budget, minutes=minutes, tokenizer_fraction=tokenizer_fraction,
                               data_hash=data_hash)
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
                              "budget": budget, "minutes": minutes, "tokenizer_fraction": tokenizer_fraction}
                             for n, s, v, th, _ in untrained], min(jobs, len(untrained)))
    ran = []
    with ctx.reporter.progress(f"compare ({len(plan)} runs: {len(names)} variants x {seeds} seeds)",
                               len(plan)) as task:
        for i, (name, seed, vcfg, th, h) in enumerate(plan):
            with stage_run(ctx.root, cfg.tracking.experiment, f"compare-{name}-s{seed}", base_params,
                           enabled=cfg.tracking.enabled, extra_tags={"unite.variant": name, "unite.seed": str(seed)},
                           strict=cfg.tracking.strict) as tracker:
                task.update(i, variant=f"{name} s{seed}")
                overrides = variant_overrides(cfg, name, steps=steps, minutes=minutes)
                if overrides.pop("_minutes_factor", 1.0) != 1.0 and budget == "time":
                    overrides["train.time_limit_minutes"] = vcfg.train.time_limit_minutes
                rows[(name, seed)] = run_variant(
                    ctx, name, seed, vcfg, data, hash_=h, train_hash=th, overrides=overrides, budget=budget,
                    minutes=minutes,
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
    meta["budget_text"] += "; unite_2x_steps: twice that" if "unite_2x_steps" in names else ""
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
