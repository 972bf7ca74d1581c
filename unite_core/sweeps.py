"""A sweep's trials: which settings each trial trains, its config, what is measured of it, the best params.

`sweep.space` maps dotted params keys to value lists; `search: grid` takes every combination `num_samples`
times (repeat r with train.seed + r), `search: random` draws `num_samples` (seeded by train.seed). A trial
trains `steps` steps with EVAL_ROUNDS evaluations + checkpoints and an EMA horizon of at most a tenth of its
steps. `trial_row` reads a trial's newest checkpoint into its row of sweep.csv, `measure_trial` adds the
latent rate, rFID and gFID; `write_reports` writes sweep.csv, the trade-off figure and best_params.yaml (the
params file with the best trial's values), `sweep_summary` metrics/sweep.json. Ray Tune runs the trials
(pipelines/stages/sweep.py).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .config import Config, ConfigError, apply_overrides, config_from_dict
from .io import atomic_write_text, stable_hash

log = logging.getLogger(__name__)

EVAL_ROUNDS = 4
CSV_NAME, TRADEOFF_NAME, BEST_NAME = "sweep.csv", "sweep_tradeoff.png", "best_params.yaml"  # in reports/
FIXED_COLUMNS = (
    "trial", "status", "steps", "val_psnr", "rfid", "rate_floats", "bits_per_image", "bits_per_dim_mean",
    "gfid", "conditional_accuracy", "latent_tokens", "latent_dim", "flow_minibatches", "best_reported",
    "train_seconds", "wall_seconds", "mlflow_run_id", "run_dir",
)
DONE = ("finished", "stopped")  # a row with these statuses is not trained again by a resumed sweep


class SweepError(RuntimeError):
    """A user-facing sweep problem (bad space, existing sweep, interrupted); the message says what to do."""


def trial_overrides(cfg: Config, trials: int | None = None) -> list[dict[str, Any]]:
    """The sweep's trials as a list of {dotted key: value} (see the module docstring)."""
    s = cfg.sweep
    space = {k: list(v) for k, v in s.space.items()}
    if not space:
        raise SweepError("sweep.space is empty: give it dotted keys and value lists, e.g. "
                         "sweep.space={model.latent_tokens: [4, 16]}")
    for k, v in space.items():
        if not v:
            raise SweepError(f"sweep.space.{k} has no values: give it a list such as [4, 16]")
    keys = list(space)
    out: list[dict[str, Any]] = []
    if s.search == "grid":
        for r in range(s.num_samples):
            for combo in itertools.product(*(space[k] for k in keys)):
                o = dict(zip(keys, combo))
                if s.num_samples > 1 and "train.seed" not in o:
                    o["train.seed"] = cfg.train.seed + r
                out.append(o)
    else:
        rng = np.random.default_rng(cfg.train.seed)
        for _ in range(trials or s.num_samples):
            out.append({k: space[k][int(rng.integers(len(space[k])))] for k in keys})
    return out if trials is None else out[:trials]


def trial_config(cfg: Config, overrides: dict[str, Any], steps: int) -> Config:
    """One trial's config: the params, the overrides, `steps` training steps with EVAL_ROUNDS evaluations
    + checkpoints (at multiples of train.log_every), and at least one Ray Train worker."""
    for k in overrides:
        try:
            functools.reduce(getattr, k.split("."), cfg)
        except AttributeError:
            raise SweepError(f"sweep.space key '{k}' is not a params key (e.g. model.latent_tokens): fix "
                             "sweep.space") from None
    d = apply_overrides(cfg.to_dict(), overrides)
    t = d["train"]
    log_every = max(1, min(int(t["log_every"]), steps))
    every = max(1, math.ceil(steps / EVAL_ROUNDS))
    every = max(log_every, math.ceil(every / log_every) * log_every)
    fixed = {"train.steps": steps, "train.log_every": log_every, "train.eval_every": every,
             "train.checkpoint_every": every,
             "distributed.num_workers": max(1, int(d["distributed"]["num_workers"]))}
    if t["warmup_steps"] >= steps:
        fixed["train.warmup_steps"] = steps // 10
    if 1.0 / (1.0 - t["ema_decay"]) > steps / 10:  # else the evaluated (EMA) weights are mostly the initial ones
        fixed["train.ema_decay"] = max(0.0, 1.0 - 10.0 / steps)
    try:
        return config_from_dict(d, fixed)
    except ConfigError as exc:
        raise SweepError(f"sweep trial {overrides}: {exc}") from None


def sweep_key(cfg: Config, trials: list[dict[str, Any]], steps: int) -> str:
    """What names a sweep: what its trials train and how they are scheduled."""
    d = cfg.to_dict()
    return stable_hash({
        "base": {k: d[k] for k in ("modality", "data", "model", "flow", "loss", "train")}, "trials": trials,
        "steps": steps,
        "scheduler": {k: d["sweep"][k] for k in ("scheduler", "metric", "mode", "grace_period", "reduction_factor")},
    }, 10)


def trial_name(index: int, overrides: dict[str, Any]) -> str:
    return f"t{index:03d}-{stable_hash(overrides, 6)}"


def describe(overrides: dict[str, Any]) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())


def measure_trial(model, data, trial_cfg: Config, *, classifier=None, features=None, reference=None,
                  kid_subset_size: int = 1000, gfid_samples: int = 0, gfid_scale: float = 1.0) -> dict:
    """What a sweep row holds of a trained trial: the latent rate (bits per image over up to 1000 val items),
    rFID of their reconstructions (with ``classifier``) and gFID + conditional accuracy of ``gfid_samples``
    samples at guidance ``gfid_scale`` against ``reference`` statistics (with ``features``, images only)."""
    from .analysis import latent_rate
    from .analysis.activations import tokenization_features
    from .eval_images import dataset_images, evaluate_generation, evaluate_reconstruction

    n = min(len(data.val), 1000)
    _, z0, _ = tokenization_features(model, data.val, torch.arange(n), seed=0)
    rate = latent_rate(z0, step=0.1)
    row: dict[str, Any] = {"bits_per_image": rate["bits_per_image"], "bits_per_dim_mean": rate["bits_per_dim_mean"]}
    if classifier is not None:
        try:
            images, _ = dataset_images(data.val, max_items=n)
            row["rfid"] = evaluate_reconstruction(model, images, classifier,
                                                  kid_subset_size=min(n, kid_subset_size))["rfid"]
        except Exception as exc:  # noqa: BLE001 - rFID is a bonus column
            log.warning("sweep: rFID failed (%s)", exc)
    if gfid_samples > 0 and features is not None and trial_cfg.modality == "images":
        res = evaluate_generation(model, reference, features.classifier, cfg_scales=[gfid_scale], n=gfid_samples,
                                  sample_cfg=trial_cfg.sample, features=features, seed=trial_cfg.sample.seed)
        row.update(gfid=res["best"]["fid"], conditional_accuracy=res["best"]["conditional_accuracy"])
    return row


def trial_row(trial_cfg: Config, run_dir: Path, status: str) -> tuple[dict, dict | None]:
    """A trial's row from its settings and its newest checkpoint ('stopped' when the scheduler ended it early,
    'no_checkpoint' when it has none), and that checkpoint's state (None without one). val_psnr is the newest
    validation record, made by Trainer.evaluate (the first 500 val images with the EMA weights)."""
    from .runs import latest_checkpoint, read_state

    m = trial_cfg.model
    row: dict[str, Any] = {"status": status, "run_dir": str(run_dir), "latent_tokens": m.latent_tokens,
                           "latent_dim": m.latent_dim, "flow_minibatches": trial_cfg.flow.minibatches,
                           "rate_floats": m.latent_tokens * m.latent_dim}
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        row["status"] = "error" if status == "error" else "no_checkpoint"
        return row, None
    row.update(steps=ckpt.step, train_seconds=round(float(ckpt.meta.get("train_seconds", 0.0)), 2))
    if status == "finished" and ckpt.step < trial_cfg.train.steps and not ckpt.meta.get("stopped_early"):
        row["status"] = "stopped"
    state = read_state(ckpt.path)
    evaluated = [r for r in state.get("history", []) if isinstance(r.get("val_psnr"), (int, float))]
    row["val_psnr"] = evaluated[-1]["val_psnr"] if evaluated else None
    return row, state


def best_row(rows, metric: str, mode: str) -> dict | None:
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric]) if scored else None


def write_reports(rows: list[dict], trials: list[dict], reports: Path, *, sweep: str, metric: str, mode: str,
                  params_doc: dict, steps: int) -> None:
    """sweep.csv (a row per trial, in trial order), sweep_tradeoff.png (with gFID columns) and best_params.yaml;
    `trials`: {"index", "name", "overrides"} in order."""
    from .analysis.report import plot_tradeoff, save_figure, write_csv

    keys = list(dict.fromkeys(k for t in trials for k in t["overrides"]))
    order = {t["name"]: t["index"] for t in trials}
    rows = sorted(rows, key=lambda r: order.get(r["trial"], 1e9))
    write_csv(rows, Path(reports) / CSV_NAME, ["trial", *keys, *FIXED_COLUMNS[1:], "sweep"])
    if any(isinstance(r.get("gfid"), float) for r in rows):
        save_figure(plot_tradeoff(rows, keys, title=f"Sweep {sweep}: reconstruction vs generation"),
                    Path(reports) / TRADEOFF_NAME)
    best = best_row(rows, metric, mode)
    if best is not None:
        overrides = next(t["overrides"] for t in trials if t["name"] == best["trial"])
        write_best_params(Path(reports) / BEST_NAME, params_doc, overrides, best, sweep, metric, steps)


def sweep_summary(sweep: str, rows, trials: list[dict], *, metric: str, mode: str, steps: int, concurrency: int,
                  reports: Path, seconds: float) -> dict:
    """metrics/sweep.json: trials finished, the best trial, its metric and its settings (best.<key>)."""
    rows = list(rows)
    best = best_row(rows, metric, mode)
    done = sum(1 for t in trials if any(r["trial"] == t["name"] and r.get("status") in DONE for r in rows))
    summary = {"sweep": sweep, "trials": len(trials), "finished": done, "steps_per_trial": steps,
               "concurrency": concurrency, "best_trial": best["trial"] if best else None,
               f"best_{metric}": best.get(metric) if best else None, "wall_seconds": round(seconds, 2),
               "csv": str(Path(reports) / CSV_NAME), "best_params": str(Path(reports) / BEST_NAME) if best else None}
    if best:
        overrides = next(t["overrides"] for t in trials if t["name"] == best["trial"])
        summary.update({f"best.{k}": v for k, v in overrides.items()})
    return summary


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_best_params(path: Path, params_doc: dict, overrides: dict, row: dict, sweep: str, metric: str,
                      steps: int) -> Path:
    """The params file with the best trial's values (train.steps left as the params say)."""
    doc = apply_overrides(json.loads(json.dumps(params_doc)), overrides)
    config_from_dict(doc)  # still valid params
    sets = " ".join(f"-S '{k}={json.dumps(v)}'" for k, v in overrides.items())
    header = (
        f"# Best trial of sweep {sweep}: {row['trial']} ({describe(overrides)}), {metric} = "
        f"{fmt(row.get(metric))} after {row.get('steps')} of {steps} sweep steps.\n"
        "# Written by `unite sweep`: your params file with the best trial's values (train.steps as in your params,\n"
        "# not the sweep's shorter trial budget). Train it as a DVC experiment, either with the changed keys:\n"
        f"#   dvc exp run {sets}\n"
        "# or by making this file the params (dvc exp run reads params.yaml):\n"
        "#   cp reports/best_params.yaml params.yaml && dvc exp run\n"
    )
    return atomic_write_text(path, header + yaml.safe_dump(doc, sort_keys=False))
