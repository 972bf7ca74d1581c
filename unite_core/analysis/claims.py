"""The paper's claims as verdicts: the comparison table of UNITE's variants over seeds.

One row per (variant, seed) in a CSV (reports/compare.csv of `unite compare`); `summarize` gives mean and
standard deviation over seeds; `directions` judges each of the paper's directions by the seed spread;
`render_markdown` writes the report. Pure: rows in, numbers and text out (plus the CSV reader/writer).
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from .report import write_csv

#: the paper's directions: (label, the variant that should be better (lower gFID), the one it beats)
DIRECTIONS = (
    ("UNITE <= two-stage (gFID)", "unite", "two_stage"),
    ("UNITE with 2x steps <= two-stage (gFID)", "unite_2x_steps", "two_stage"),
    ("shared weights <= separate weights (gFID)", "unite", "separate_weights"),
    ("shared, parameter-matched <= separate weights (gFID)", "unite_param_matched", "separate_weights"),
    ("shared <= separate weights, both 2x steps (gFID)", "unite_2x_steps", "separate_weights_2x_steps"),
    ("stop-grad <= no stop-grad (gFID)", "unite", "no_stop_grad"),
    ("noise augmentation <= none (gFID)", "unite", "no_noise_aug"),
    ("M=3 flow mini-batches <= M=1 (gFID)", "unite", "flow_minibatches_1"),
    ("timestep shift <= none (gFID)", "unite", "no_shift"),
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
Key = tuple  # (variant, seed)


def table_row(name: str, seed: int, metrics: dict, train_info: dict, **columns: Any) -> dict:
    """One run's row: its evaluation `metrics` (flat, as eval_images.flat_metrics), its training info
    (seconds, steps, device, details) and the other CSV_COLUMNS given by name."""
    return {"variant": name, "seed": seed,
            **{k: metrics.get(k) for k in ("gfid", "best_cfg_scale", "rfid", "psnr", "ssim", "conditional_accuracy",
                                           "isc_mean", "kid_mean", "precision", "recall")},
            "train_seconds": train_info["train_seconds"], "steps": train_info["steps"],
            "device": train_info.get("device"), "details": train_info.get("details", ""), **columns}


def read_rows(path: Path) -> dict[Key, dict]:
    """The table as {(variant, seed): row}, numbers parsed; a file from before seeds counts as seed 0."""
    if not Path(path).is_file():
        return {}
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("variant"):
                parsed = {k: _number(v) if k in NUMERIC else v for k, v in row.items()}
                parsed["seed"] = int(parsed.get("seed") or 0)
                rows[(row["variant"], parsed["seed"])] = parsed
    return rows


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in ("", None) else None
    except ValueError:
        return None


def ordered(keys, order: list[str]) -> list[Key]:
    rank = {v: i for i, v in enumerate(order)}
    return sorted(keys, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))


def write_rows(rows: dict[Key, dict], path: Path, order: list[str]) -> Path:
    return write_csv([rows[k] for k in ordered(rows, order)], path, CSV_COLUMNS)


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


def flat_metrics(rows: dict[Key, dict], num_classes: int | None = None) -> dict[str, float]:
    """The table as flat numbers (metrics/compare.json, MLflow): <variant>_<metric> means (and _std for gFID,
    rFID, PSNR), and direction_<better>_vs_<worse> = 1 reproduced, -1 reversed, 0 not resolved."""
    summary, out = summarize(rows), {}
    for name, s in summary.items():
        for k in ("gfid", "rfid", "psnr", "conditional_accuracy", "isc_mean", "train_seconds", "steps"):
            if s.get(k) is not None:
                out[f"{name}_{k}"] = s[k]
            if s.get(f"{k}_std") is not None and k in ("gfid", "rfid", "psnr"):
                out[f"{name}_{k}_std"] = s[f"{k}_std"]
    for d in directions(summary, num_classes):
        if d["verdict"] in ("reproduced", "reversed", "not resolved"):
            out[f"direction_{d['better']}_vs_{d['worse']}"] = {"reproduced": 1.0, "reversed": -1.0}.get(d["verdict"], 0.0)
    return out


def budget_text(budget: str, *, minutes: float, steps: int, tokenizer_fraction: float, doubled: list[str]) -> str:
    """The report's budget line: equal wall-clock (two-stage split) or equal optimizer steps per network."""
    text = (f"{minutes:g} min of training wall-clock per variant (two-stage: {tokenizer_fraction:.0%} tokenizer / "
            f"{1 - tokenizer_fraction:.0%} denoiser), at most train.steps={steps} steps" if budget == "time"
            else f"train.steps={steps} optimizer steps per network")
    return text + (f"; {', '.join(doubled)}: twice that" if doubled else "")


def _fmt(v, digits=2):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _pm(s: dict, metric: str, digits=2, scale=1.0) -> str:
    mean, std = s.get(metric), s.get(f"{metric}_std")
    if mean is None:
        return "n/a"
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def _minutes(seconds):
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def render_markdown(rows: dict[Key, dict], order: list[str], meta: dict) -> str:
    """The report: mean ± std per variant, every run, the noise floor, and a verdict per direction."""
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
    for key in ordered(rows, order):
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
