"""The ablation switches: UNITE's variants as changes of the params, and how one variant trains.

A `Variant` is a set of dotted overrides (or a function of the params that returns them), a budget factor
(unite_2x_steps trains twice the steps or minutes) and whether it is the two-stage baseline (trained by
unite_core.two_stage). `variant_config` turns the params into one variant's config for a budget in steps
or wall-clock minutes; `train_variant` trains it to a checkpoint. A comparison's plan (`plan_runs`) is one
`PlannedRun` per variant and seed, named by the hash of its training (its checkpoint) and of its table row
(training plus evaluation settings); `train_in_processes` trains several at once. `unite compare`
(pipelines) runs them; analysis/claims.py turns their results into the paper's verdicts.
"""

from __future__ import annotations

import json
import logging
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from .config import Config, config_from_dict
from .io import atomic_write_json, stable_hash
from .train import Trainer
from .two_stage import TwoStageBudget, train_two_stage

log = logging.getLogger(__name__)

BUDGETS = ("time", "steps")


@dataclass(frozen=True)
class Variant:
    overrides: Mapping[str, Any] | Callable[[Config], dict[str, Any]] = field(default_factory=dict)
    budget_factor: float = 1.0  # x train.steps (and x the minutes of a time budget)
    two_stage: bool = False


def _double_depth(cfg: Config) -> dict[str, Any]:
    """A shared GE with the parameters of separate weights: twice the depth at the same width."""
    depth, width, heads = cfg.model.ge_dims()
    return {"model.ge_size": "custom", "model.ge_depth": 2 * depth, "model.ge_width": width, "model.ge_heads": heads}


VARIANTS: dict[str, Variant] = {
    "unite": Variant(),
    "two_stage": Variant(two_stage=True),
    "separate_weights": Variant({"model.weight_sharing": "separate"}),
    "unite_param_matched": Variant(_double_depth),
    "unite_2x_steps": Variant(budget_factor=2.0),
    "separate_weights_2x_steps": Variant({"model.weight_sharing": "separate"}, budget_factor=2.0),
    "no_stop_grad": Variant({"flow.stop_grad": False}),
    "no_noise_aug": Variant({"loss.decoder_noise": False}),
    "flow_minibatches_1": Variant({"flow.minibatches": 1}),
    "no_shift": Variant({"flow.shift": None}),
}
DEFAULT_VARIANTS = tuple(VARIANTS)


class AblationError(ValueError):
    """An unknown variant or budget; the message lists the choices."""


def parse_variants(text: str | list[str] | None) -> list[str]:
    """Comma-separated names (or a list) -> known variant names, in order, once each; None: all."""
    items = text if isinstance(text, list) else str(text or "").split(",")
    names = [v.strip() for v in items if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise AblationError(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)} (comma-separated)")
    return list(dict.fromkeys(names)) or list(DEFAULT_VARIANTS)


def variant_overrides(cfg: Config, name: str, *, budget: str, steps: Optional[int] = None,
                      minutes: Optional[float] = None) -> dict[str, Any]:
    """The dotted overrides that make variant ``name`` from ``cfg`` (the budget only where it differs)."""
    v = VARIANTS[name]
    out = dict(v.overrides(cfg) if callable(v.overrides) else v.overrides)
    if v.budget_factor != 1.0:
        out["train.steps"] = int(v.budget_factor * int(steps or cfg.train.steps))
        if budget == "time":
            out["train.time_limit_minutes"] = float(minutes) * v.budget_factor
    return out


def variant_config(cfg: Config, name: str, *, budget: str, minutes: Optional[float], steps: Optional[int],
                   seed: Optional[int] = None) -> Config:
    """Variant ``name`` of ``cfg`` trained for ``steps`` (default train.steps) or ``minutes`` x its factor."""
    if budget not in BUDGETS:
        raise AblationError(f"budget={budget!r}: use one of {', '.join(BUDGETS)}")
    overrides = variant_overrides(cfg, name, budget=budget, steps=steps, minutes=minutes)
    n = int(overrides.get("train.steps", steps if steps is not None else cfg.train.steps))
    overrides["train.steps"] = n
    overrides["train.warmup_steps"] = min(cfg.train.warmup_steps, max(0, n - 1))
    factor = VARIANTS[name].budget_factor
    overrides["train.time_limit_minutes"] = float(minutes) * factor if budget == "time" else None
    if seed is not None:
        overrides["train.seed"] = int(seed)
    return config_from_dict(cfg.to_dict(), overrides)


def parse_scales(text: str | list | None) -> Optional[list[float]]:
    """'1,2,3' (or a list) -> guidance scales; None or '' -> None (the params' eval.cfg_scales)."""
    if text is None or isinstance(text, str) and not text.strip():
        return None
    try:
        scales = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    except ValueError:
        raise AblationError(f"--scales {text!r} must be a comma-separated list of numbers, e.g. 1.0,2.0,3.0") from None
    if not scales or any(s < 0 for s in scales):
        raise AblationError(f"--scales {text!r} must hold non-negative guidance scales")
    return scales


def check_budget(budget: str, *, minutes: float, tokenizer_fraction: float, seeds: int, jobs: int,
                 num_samples: int) -> None:
    """The comparison's options, each checked with a message that names the fix."""
    if budget not in BUDGETS:
        raise AblationError(f"budget={budget!r}: use one of {', '.join(BUDGETS)}")
    if seeds < 1 or jobs < 1:
        raise AblationError(f"--seeds={seeds} and --jobs={jobs} must be >= 1")
    if budget == "time" and minutes <= 0:
        raise AblationError(f"--minutes={minutes} must be > 0")
    if not 0.0 < float(tokenizer_fraction) < 1.0:
        raise AblationError(f"--tokenizer-fraction={tokenizer_fraction} must lie strictly between 0 and 1")
    if num_samples < 2:
        raise AblationError(f"--samples={num_samples} must be >= 2")


@dataclass(frozen=True)
class PlannedRun:
    """One (variant, seed) of a comparison: its config, the hash of its training (the checkpoint's name) and
    the hash of its table row (training plus every evaluation setting)."""
    name: str
    seed: int
    cfg: Config
    train_hash: str
    row_hash: str

    def checkpoint(self, models_dir: Path) -> Path:
        """models/compare/<variant>-s<seed>-<train hash>.pt (its info .json beside it)."""
        return Path(models_dir) / "compare" / f"{self.name}-s{self.seed}-{self.train_hash}.pt"

    def trained(self, models_dir: Path) -> bool:
        ckpt = self.checkpoint(models_dir)
        return ckpt.is_file() and ckpt.with_suffix(".json").is_file()

    def ensure_trained(self, models_dir: Path, data, device, *, budget: str, tokenizer_fraction: float) -> dict:
        """Train this run unless its checkpoint and info are there; its info (seconds, steps, device, curve)."""
        ckpt = self.checkpoint(models_dir)
        if self.trained(models_dir):
            log.info("compare: %s seed %d already trained (%s): evaluating only", self.name, self.seed, ckpt.name)
            return json.loads(ckpt.with_suffix(".json").read_text())
        log.info("compare: training %s seed %d", self.name, self.seed)
        return train_variant(self.name, self.cfg, data, device, ckpt, budget=budget,
                             tokenizer_fraction=tokenizer_fraction)


def plan_runs(cfg: Config, names: list[str], seeds: int, *, budget: str, minutes: float, steps: Optional[int],
              tokenizer_fraction: float, num_samples: int, scales: list[float], data_hash: str,
              classifier_hash: str) -> list[PlannedRun]:
    """Every (variant, seed) of a comparison, seeds train.seed, train.seed + 1, ..."""
    plan = []
    for name in names:
        for seed in range(cfg.train.seed, cfg.train.seed + seeds):
            vcfg = variant_config(cfg, name, budget=budget, minutes=minutes, steps=steps, seed=seed)
            d = vcfg.to_dict()
            train_hash = stable_hash({
                "variant": name, "config": {k: d[k] for k in ("modality", "data", "model", "flow", "loss", "train")},
                "budget": budget, "minutes": vcfg.train.time_limit_minutes if budget == "time" else None,
                "tokenizer_fraction": tokenizer_fraction if VARIANTS[name].two_stage else None, "data": data_hash,
            })
            row_hash = stable_hash({
                "train": train_hash, "sample": d["sample"], "num_samples": num_samples, "scales": scales,
                "eval": {k: d["eval"][k] for k in ("feature_extractor", "inception_weights", "kid_subset_size")},
                "data": data_hash, "classifier": classifier_hash})
            plan.append(PlannedRun(name, seed, vcfg, train_hash, row_hash))
    return plan


def device_label(device) -> str:
    """Where a variant trained: "cpu (<arch>, <threads> threads)" or "cuda (<GPU name>)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def train_variant(name: str, vcfg: Config, data, device, ckpt: Path, *, budget: str,
                  tokenizer_fraction: float = 0.5) -> dict:
    """Train variant ``name`` (config ``vcfg``) to ``ckpt``, replacing older checkpoints of the same variant
    and seed; its info (seconds, steps, device, loss curve) is written beside it as .json and returned."""
    ckpt = Path(ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    stem = ckpt.stem.rsplit("-", 1)[0]  # <variant>-s<seed>
    for stale in [*ckpt.parent.glob(f"{stem}-*.pt"), *ckpt.parent.glob(f"{stem}-*.json")]:
        stale.unlink()
    history: list[dict] = []

    def on_log(step, record, prefix=""):
        history.append({"step": step, **{f"train_{prefix}{k}": v for k, v in record.items() if k != "step"}})

    limit_min = vcfg.train.time_limit_minutes if budget == "time" else None
    if VARIANTS[name].two_stage:
        r = train_two_stage(vcfg, data.info, data.train, val_set=data.val, device=device, checkpoint_path=ckpt,
                            budget=TwoStageBudget(minutes=limit_min, tokenizer_fraction=tokenizer_fraction),
                            on_log=lambda stage, step, rec: on_log(step, rec, f"{stage}_"))
        info = {"train_seconds": r.seconds, "steps": r.steps,
                "details": f"tokenizer {r.tokenizer_steps} + denoiser {r.denoiser_steps}"}
    else:
        trainer = Trainer(vcfg, data.info, data.train, device, val_set=data.val)
        r = trainer.run(vcfg.train.steps, on_log=on_log, checkpoint_path=ckpt,
                        time_limit_s=limit_min * 60.0 if limit_min else math.inf)
        info = {"train_seconds": r.seconds, "steps": r.step, "details": ""}
    info.update(device=device_label(device), history=history)
    atomic_write_json(ckpt.with_suffix(".json"), info, indent=None)
    return info


def _train_in_process(job: dict) -> str:
    """A spawned process of `train_in_processes`: loads the data itself and trains one (variant, seed)."""
    from .devices import resolve_device
    from .inputs import open_data

    torch.set_num_threads(job["threads"])
    run, cfg = job["run"], job["cfg"]
    train_variant(run.name, run.cfg, open_data(cfg, job["data_dir"], job["cache_dir"]),
                  resolve_device(cfg.train.device), run.checkpoint(job["models_dir"]), budget=job["budget"],
                  tokenizer_fraction=job["tokenizer_fraction"])
    return f"{run.name} seed {run.seed}"


def train_in_processes(cfg: Config, runs: list[PlannedRun], processes: int, *, models_dir: Path, data_dir: Path,
                       cache_dir: Path, budget: str, tokenizer_fraction: float) -> None:
    """Train `runs` in `processes` spawned processes (each loads the data; CPU threads are split among them,
    GPU runs share the device)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from .devices import resolve_device

    cpu = resolve_device(cfg.train.device).type == "cpu"
    threads = max(1, (os.cpu_count() or 1) // processes) if cpu else max(1, torch.get_num_threads())
    jobs = [{"run": r, "cfg": cfg, "threads": threads, "models_dir": models_dir, "data_dir": data_dir,
             "cache_dir": cache_dir, "budget": budget, "tokenizer_fraction": tokenizer_fraction} for r in runs]
    log.info("compare: training %d runs in %d processes (%d threads each)", len(jobs), processes, threads)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in pool.map(_train_in_process, jobs):
            log.info("compare: trained %s", done)
