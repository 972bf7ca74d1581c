"""`unite sweep`: a Ray Tune sweep whose trials train through the same Ray Train path as `unite train`.

Search space: params.yaml `sweep.space` maps dotted keys to value lists (`model.latent_tokens: [4, 16]`).
The trial list is made explicit up front and fed to Tune as one grid (so a resumed sweep sees the
same trials):
- `search: grid`   every combination, `num_samples` times (repeat r uses train.seed + r);
- `search: random` `num_samples` draws (one value per key, seeded by train.seed).
`--trials N` keeps the first N. Every trial config passes the params validation before anything starts.
Trials are short, so their EMA horizon 1/(1 - train.ema_decay) is capped at a tenth of the trial's steps
(the evaluated weights are the EMA weights, as in `unite train`).

A trial (`sweep_trial`, a Tune function) builds and fits a `TorchTrainer` running
`pipelines.distributed.ray_worker` (the `unite train` worker loop) with
`ray.tune.integration.ray_train.TuneReportCallback()`, so each Ray Train report (every checkpoint) is
a Tune result; the scheduler (`asha` on `sweep.metric`/`sweep.mode`, time attribute = training step,
`grace_period` in evaluation rounds) can stop weak trials early. Trials train `sweep.steps` steps
(`--steps`), evaluating and checkpointing four times. The train run of trial T lives in
`ray_results/sweeps/<sweep>/runs/<T>/` (checkpoints + metrics.jsonl, exactly like `unite train`);
Tune's own state in `ray_results/sweeps/<sweep>/tune/`.

Only this driver process writes to MLflow: the sweep is the `sweep` child run of the pipeline run
(created by the stage runner), every trial one child run under it (tags unite.sweep, unite.trial)
with its params, its training curve (read from the trial's metrics.jsonl as the trial reports, each
step logged once) and its final metrics. When a trial ends, the driver evaluates its last checkpoint
(EMA weights) on the validation set: PSNR, the latent rate (K*d floats and the empirical entropy of
the quantised latent in bits per image) and rFID when the dataset's feature classifier
(models/classifier.pt) exists.

Results: reports/sweep.csv (one row per trial) and reports/best_params.yaml (the params file with
the best trial's values, ready for `dvc exp run`), rewritten as trials finish.

Interruption: Ctrl-C (or SIGUSR1) stops the sweep after saving Tune's state; `unite sweep --resume`
restores it with `Tuner.restore`: finished trials are not run again, an unfinished trial resumes
its train run from its last checkpoint. A plain `unite sweep` refuses to overwrite an existing
sweep of the same settings (use --resume, or --fresh to start over).

Resources (2-core machines): a trial reserves almost no CPU itself (it only waits on its trainer);
its Ray Train workers reserve `distributed.cpus_per_worker` each. A local cluster gets
concurrency x (workers x cpus_per_worker) + 2 logical CPUs (or `distributed.num_cpus`), leaving spare
CPUs so that the worker groups of stopped trials can be released while new ones start.

Test-only: UNITE_TEST_SWEEP_INTERRUPT_AFTER=N makes the driver interrupt itself (SIGUSR1, as Tune's
Ctrl-C handling) once N trials have finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray import tune

from unite_core.config import Config, ConfigError, config_from_dict
from unite_core.io import atomic_write_text

from . import distributed
from .context import StageContext

log = logging.getLogger(__name__)

INVOCATIONS_FILE = "invocations.log"  # one line per start of a trial's training (counts trainings)
INTERRUPT_ENV = "UNITE_TEST_SWEEP_INTERRUPT_AFTER"
TRIAL_CPU = 0.01
EVAL_ROUNDS = 4
CSV_NAME = "sweep.csv"
TRADEOFF_NAME = "sweep_tradeoff.png"
BEST_NAME = "best_params.yaml"
FIXED_COLUMNS = (
    "trial", "status", "steps", "val_psnr", "rfid", "rate_floats", "bits_per_image", "bits_per_dim_mean",
    "gfid", "conditional_accuracy", "latent_tokens", "latent_dim", "flow_minibatches", "best_reported",
    "train_seconds", "wall_seconds",
    "mlflow_run_id", "run_dir",
)


class SweepError(RuntimeError):
    """A user-facing sweep problem (bad space, existing sweep, interrupted); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Trial list
# ----------------------------------------------------------------------------------------------
def _short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _get_dotted(d: dict, key: str, default=None):
    node: Any = d
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


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
        combos = list(itertools.product(*(space[k] for k in keys)))
        for r in range(s.num_samples):
            for combo in combos:
                o = dict(zip(keys, combo))
                if s.num_samples > 1 and "train.seed" not in o:
                    o["train.seed"] = cfg.train.seed + r
                out.append(o)
    else:
        rng = np.random.default_rng(cfg.train.seed)
        for _ in range(trials or s.num_samples):
            out.append({k: space[k][int(rng.integers(len(space[k])))] for k in keys})
    if trials is not None:
        out = out[:trials]
    return out


def trial_config(cfg: Config, overrides: dict[str, Any], steps: int) -> dict:
    """The validated config dict of one trial: the params, the overrides, `steps` training steps with
    EVAL_ROUNDS evaluations + checkpoints (at multiples of train.log_every)."""
    d = cfg.to_dict()
    for k, v in overrides.items():
        if _get_dotted(d, k, _MISSING) is _MISSING:
            raise SweepError(f"sweep.space key '{k}' is not a params key (e.g. model.latent_tokens): fix sweep.space")
        _set_dotted(d, k, v)
    t = d["train"]
    t["steps"] = steps
    log_every = max(1, min(int(t["log_every"]), steps))
    every = max(1, math.ceil(steps / EVAL_ROUNDS))
    every = max(log_every, math.ceil(every / log_every) * log_every)
    t["log_every"], t["eval_every"], t["checkpoint_every"] = log_every, every, every
    if t["warmup_steps"] >= steps:
        t["warmup_steps"] = steps // 10
    # a trial is short: keep the EMA horizon 1/(1 - decay) within a tenth of it, else the evaluated
    # (EMA) weights are mostly the initial ones
    if 1.0 / (1.0 - t["ema_decay"]) > steps / 10:
        t["ema_decay"] = max(0.0, 1.0 - 10.0 / steps)
    d["distributed"]["num_workers"] = max(1, int(d["distributed"]["num_workers"]))
    try:
        return config_from_dict(d).to_dict()
    except ConfigError as exc:
        raise SweepError(f"sweep trial {overrides}: {exc}") from None


_MISSING = object()


def trial_name(index: int, overrides: dict[str, Any]) -> str:
    return f"t{index:03d}-{_short_hash(overrides, 6)}"


def describe(overrides: dict[str, Any]) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())


def sweep_name(cfg: Config, specs: list[dict], steps: int) -> str:
    """Deterministic name of a sweep: what the trials train and how they are scheduled."""
    d = cfg.to_dict()
    key = {
        "base": {k: d[k] for k in ("modality", "data", "model", "flow", "loss", "train")},
        "trials": [s["overrides"] for s in specs],
        "steps": steps,
        "scheduler": {k: d["sweep"][k] for k in ("scheduler", "metric", "mode", "grace_period", "reduction_factor")},
    }
    exp = os.environ.get("DVC_EXP_NAME")
    prefix = f"sweep-{exp}-" if exp else "sweep-"
    return prefix + _short_hash(key, 10)


# ----------------------------------------------------------------------------------------------
# Trial side (runs in Ray processes; must live in the installed package)
# ----------------------------------------------------------------------------------------------
def _latest_val_metrics(records: Path) -> dict:
    """The val_* numbers of the newest record in a metrics.jsonl that has them."""
    try:
        lines = records.read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        vals = {k: v for k, v in rec.items() if k.startswith("val_") and isinstance(v, (int, float))}
        if vals:
            return vals
    return {}


def sweep_worker(config: dict) -> None:
    """`distributed.ray_worker`, with the latest validation metrics added to every report.

    Adapter: ray_worker reports {"step", "final", "loss"}; the scheduler needs the validation metric.
    Rank 0 appends its log records (evaluations included; eval_every == checkpoint_every here) to
    metrics.jsonl before it reports, so the newest val_* values there belong to this report.
    """
    import ray.train

    records = Path(config["run_dir"]) / distributed.RECORDS_FILE
    original = ray.train.report

    def report(metrics, *args, **kwargs):
        return original({**metrics, **_latest_val_metrics(records)}, *args, **kwargs)

    ray.train.report = report
    try:
        distributed.ray_worker(config)
    finally:
        ray.train.report = original


def sweep_trial(config: dict, setup: dict) -> None:
    """One Tune trial: fit a TorchTrainer (the `unite train` worker loop) that reports to Tune."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = config["trial"]
    cfg = setup["trial_cfgs"][spec["name"]]
    d = cfg["distributed"]
    runs = Path(setup["runs_dir"])
    run_dir = runs / spec["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = distributed.latest_checkpoint(run_dir)
    with open(run_dir / INVOCATIONS_FILE, "a") as f:
        f.write(json.dumps({"time": time.time(), "resume_step": previous.step if previous else 0}) + "\n")
    trainer = TorchTrainer(
        sweep_worker,
        train_loop_config={
            "cfg": cfg,
            "data_dir": setup["data_dir"],
            "run_dir": str(run_dir),
            "resume_dir": str(previous.path) if previous else None,
            "cpus_per_worker": d["cpus_per_worker"],
            "use_gpu": d["use_gpu"],
            "crash_at": None,
        },
        torch_config=TorchConfig(backend="nccl" if d["use_gpu"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=d["num_workers"], use_gpu=d["use_gpu"],
                                     resources_per_worker={"CPU": d["cpus_per_worker"]}),
        run_config=RunConfig(
            storage_path=str(runs),
            name=spec["name"],
            failure_config=FailureConfig(max_failures=d["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=distributed.KEEP_CHECKPOINTS),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# ----------------------------------------------------------------------------------------------
# Driver side: evaluation of finished trials, MLflow, result files
# ----------------------------------------------------------------------------------------------
_DRIVERS: dict[str, "SweepDriver"] = {}


class SweepCallback(tune.Callback):
    """Forwards Tune's events to the live driver of this sweep (looked up by name).

    Only the name is kept (Tune pickles its callbacks into the experiment state; the driver with its
    MLflow client, data and progress bar is rebuilt by `unite sweep --resume` and registered again).
    """

    def __init__(self, name: str):
        self.name = name

    def _call(self, method: str, *args) -> None:
        drv = _DRIVERS.get(self.name)
        if drv is None:
            return
        try:
            getattr(drv, method)(*args)
        except Exception:  # noqa: BLE001 - a logging/evaluation problem must not stop the other trials
            log.exception("sweep: %s failed (the sweep goes on; rerun with --resume to redo the results)", method)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._call("trial_started", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._call("trial_result", trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._call("trial_finished", trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._call("trial_finished", trial, "error")


class SweepDriver:
    """Everything the sweep does in the driver process: MLflow runs, evaluation, sweep.csv."""

    def __init__(self, ctx: StageContext, name: str, specs: list[dict], trial_cfgs: dict[str, dict],
                 runs_dir: Path, steps: int, params_doc: dict, task=None, fresh: bool = False):
        self.ctx, self.name, self.specs, self.trial_cfgs = ctx, name, specs, trial_cfgs
        self.by_name = {s["name"]: s for s in specs}
        self.runs_dir, self.steps, self.params_doc, self.task = runs_dir, steps, params_doc, task
        self.cfg = ctx.cfg
        self.rows: dict[str, dict] = {}
        self.best_reported: dict[str, float] = {}
        self.finished_now = 0
        self.interrupt_after = int(os.environ.get(INTERRUPT_ENV, "0") or 0)
        self.tracker = ctx.tracker
        self.client = getattr(self.tracker, "client", None)
        self.trial_runs: dict[str, str] = {}
        self.logged_step: dict[str, int] = {}
        self._data = None
        self._classifier = None
        self._features = None  # FeatureSpec for the trials' gFID (False: unavailable)
        self._reference = None
        self._load_previous(fresh)

    # --- state carried over from an interrupted sweep -----------------------------------------
    def _load_previous(self, fresh: bool = False) -> None:
        """Rows and MLflow trial runs of an earlier (interrupted) run of this sweep; with `fresh`, the
        old trial runs are soft-deleted instead (restorable in the UI)."""
        path = self.ctx.paths.reports / CSV_NAME
        if path.is_file() and not fresh:
            from unite_core.analysis.report import read_csv

            for row in read_csv(path):
                if row.get("trial") in self.by_name and row.get("sweep") == self.name:
                    self.rows[row["trial"]] = row
        if self.client is None:
            return
        exp_id = self.client.get_run(self.tracker.run_id).info.experiment_id
        from mlflow.entities import ViewType

        found = self.client.search_runs([exp_id], filter_string=f"tags.`unite.sweep` = '{self.name}' and "
                                        "tags.`unite.stage` = 'sweep_trial'", run_view_type=ViewType.ACTIVE_ONLY,
                                        max_results=1000)
        for run in found:
            trial = run.data.tags.get("unite.trial")
            if trial not in self.by_name:
                continue
            if fresh or trial in self.trial_runs:  # keep the newest; an older duplicate is removed
                self.client.delete_run(run.info.run_id)
                continue
            self.trial_runs[trial] = run.info.run_id
            self.logged_step[trial] = int(run.data.tags.get("unite.logged_step", "0"))
            if run.data.tags.get("mlflow.parentRunId") != self.tracker.run_id:
                # re-parent under this (resumed) sweep run: the stage runner retires the old one
                self.client.set_tag(run.info.run_id, "mlflow.parentRunId", self.tracker.run_id)

    # --- helpers ---------------------------------------------------------------------------------
    def _trial_key(self, trial) -> str:
        return trial.config["trial"]["name"]

    def _tracker(self, name: str):
        from .tracking import NullTracker, Tracker, source_tags

        if self.client is None:
            return NullTracker()
        run_id = self.trial_runs.get(name)
        if run_id is None:
            spec = self.by_name[name]
            exp_id = self.client.get_run(self.tracker.run_id).info.experiment_id
            run = self.client.create_run(exp_id, run_name=f"{name} {describe(spec['overrides'])}", tags={
                **source_tags(self.ctx.root, self.trial_cfgs[name]),
                "mlflow.parentRunId": self.tracker.run_id, "unite.stage": "sweep_trial",
                "unite.sweep": self.name, "unite.trial": name,
            })
            run_id = run.info.run_id
            self.trial_runs[name] = run_id
            tr = Tracker(run_id, self.client, self.tracker.health)
            tr.log_params({"sweep.trial": name, "sweep.name": self.name,
                           **{f"sweep.override.{k}": v for k, v in spec["overrides"].items()}})
            tr.log_params(self.trial_cfgs[name])
        return Tracker(run_id, self.client, self.tracker.health)

    def _log_curve(self, name: str) -> None:
        """Log the trial's metrics.jsonl records that MLflow does not have yet (each step once)."""
        records = self.runs_dir / name / distributed.RECORDS_FILE
        if self.client is None or not records.is_file():
            return
        done = self.logged_step.get(name, 0)
        new = []
        for line in records.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if int(rec.get("step", 0)) > done:
                new.append(rec)
        if not new:
            return
        tr = self._tracker(name)
        tr.log_metric_history(new)
        self.logged_step[name] = max(int(r["step"]) for r in new)
        tr.set_tags({"unite.logged_step": str(self.logged_step[name])})

    # --- Tune events -------------------------------------------------------------------------------
    def trial_started(self, trial) -> None:
        name = self._trial_key(trial)
        tr = self._tracker(name)
        if self.client is not None:
            self.client.update_run(tr.run_id, status="RUNNING")
        log.info("sweep: trial %s (%s) started", name, describe(self.by_name[name]["overrides"]))

    def trial_result(self, trial, result: dict) -> None:
        name = self._trial_key(trial)
        metric = self.cfg.sweep.metric
        v = result.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            prev = self.best_reported.get(name)
            better = prev is None or (v > prev if self.cfg.sweep.mode == "max" else v < prev)
            self.best_reported[name] = v if better else prev
        self._log_curve(name)

    def trial_finished(self, trial, status: str) -> None:
        self.finish(self._trial_key(trial), status, trial)

    def finish(self, name: str, status: str, trial=None) -> None:
        """Log the rest of the curve, evaluate the newest checkpoint, write the row and the files."""
        self._log_curve(name)
        row = self.evaluate(name, status, trial)
        self.rows[name] = row
        tr = self._tracker(name)
        # final numbers under their own names (the curve already has val_psnr at the training steps)
        tr.log_metrics({f"final_{k}": v for k, v in row.items() if k in (
            "val_psnr", "rfid", "rate_floats", "bits_per_image", "bits_per_dim_mean", "train_seconds")},
            step=int(row.get("steps") or 0))
        if self.client is not None:
            self.client.set_terminated(tr.run_id, "FINISHED" if status == "finished" else "FAILED")
        self.write_results()
        self.finished_now += 1
        if self.task is not None:
            self.task.update(len([r for r in self.rows.values() if r.get("status") in ("finished", "stopped")]),
                             **self._progress_fields())
        log.info("sweep: trial %s %s: val PSNR %s dB, rate %s floats / %s bits per image", name, row["status"],
                 _fmt(row.get("val_psnr")), row.get("rate_floats"), _fmt(row.get("bits_per_image")))
        if self.interrupt_after and self.finished_now >= self.interrupt_after:
            log.warning("%s=%d: interrupting the sweep (test-only)", INTERRUPT_ENV, self.interrupt_after)
            self.interrupt_after = 0
            os.kill(os.getpid(), signal.SIGUSR1)

    def _progress_fields(self) -> dict:
        best = self.best_row()
        return {"best": f"{best['trial']} {self.cfg.sweep.metric} {_fmt(best.get(self.cfg.sweep.metric))}"} if best else {}

    # --- evaluation of a finished trial ----------------------------------------------------------
    def _load_data(self):
        if self._data is None:
            from .stages.analyze import load_data

            self._data = load_data(self.ctx)
            if self.cfg.modality == "images":
                try:
                    from .stages.classifier import load_checked_classifier

                    self._classifier, _ = load_checked_classifier(self.ctx, self._data, required=False)
                except Exception as exc:  # noqa: BLE001 - rFID is optional
                    log.warning("sweep: no rFID (%s)", exc)
                    self._classifier = None
        return self._data

    def evaluate(self, name: str, status: str, trial=None) -> dict:
        """Row of sweep.csv for a trial: its settings and the evaluation of its newest checkpoint."""
        import torch

        from unite_core.analysis import latent_rate
        from unite_core.analysis.activations import tokenization_features
        from unite_core.train import fetch, model_from_checkpoint

        spec = self.by_name[name]
        cfg = self.trial_cfgs[name]
        run_dir = self.runs_dir / name
        row: dict[str, Any] = {"sweep": self.name, "trial": name, "status": status, "run_dir": str(run_dir),
                               "mlflow_run_id": self.trial_runs.get(name), **spec["overrides"]}
        m = cfg["model"]
        row.update(latent_tokens=m["latent_tokens"], latent_dim=m["latent_dim"],
                   flow_minibatches=cfg["flow"]["minibatches"], rate_floats=m["latent_tokens"] * m["latent_dim"],
                   best_reported=self.best_reported.get(name))
        ckpt = distributed.latest_checkpoint(run_dir)
        if trial is not None:
            row["wall_seconds"] = round(float(trial.last_result.get("time_total_s", 0.0) or 0.0), 2)
        if ckpt is None:
            row["status"] = "error" if status == "error" else "no_checkpoint"
            return row
        row["steps"] = ckpt.step
        row["train_seconds"] = round(float(ckpt.meta.get("train_seconds", 0.0)), 2)
        if status == "finished" and ckpt.step < cfg["train"]["steps"] and not ckpt.meta.get("stopped_early"):
            row["status"] = "stopped"  # by the scheduler
        data = self._load_data()
        state = distributed.read_state(ckpt.path)
        model = model_from_checkpoint(state, use_ema=True, device="cpu")
        n = min(len(data.val), 1000)
        idx = torch.arange(n)
        _, z0, _ = tokenization_features(model, data.val, idx, seed=0)
        rate = latent_rate(z0, step=0.1)
        row["bits_per_image"] = rate["bits_per_image"]
        row["bits_per_dim_mean"] = rate["bits_per_dim_mean"]
        with torch.no_grad():
            totals, count = 0.0, 0
            gen = torch.Generator().manual_seed(12345)
            for start in range(0, n, 250):
                chunk = idx[start:start + 250]
                obs, _ = model.modality.unpack(fetch(data.val, chunk))
                decoded = model.reconstruct(obs, gen)
                totals += model.modality.recon_metrics(decoded.float(), obs)["psnr"] * len(chunk)
                count += len(chunk)
        row["val_psnr"] = totals / max(1, count)
        if self._classifier is not None:
            try:
                from unite_core.eval_images import dataset_images, evaluate_reconstruction

                images, _ = dataset_images(data.val, max_items=n)
                rec = evaluate_reconstruction(model, images, self._classifier,
                                              kid_subset_size=min(n, self.cfg.eval.kid_subset_size))
                row["rfid"] = rec["rfid"]
            except Exception as exc:  # noqa: BLE001 - rFID is a bonus column
                log.warning("sweep: rFID of %s failed (%s)", name, exc)
        if self.cfg.sweep.gfid_samples > 0 and self.cfg.modality == "images":
            row.update(self._gfid(model, config_from_dict(cfg)))
        return row

    def _gfid(self, model, trial_cfg: Config) -> dict:
        """gFID (and conditional accuracy) of sweep.gfid_samples samples at guidance sweep.gfid_scale against
        the training images, with the evaluation's feature network; {} (one warning) when it is missing."""
        from unite_core.eval_images import evaluate_generation

        from .stages.evaluate import feature_spec, reference_images

        if self._features is None:
            try:
                self._features = feature_spec(self.ctx, self._data, "cpu")
                self._reference = self._features.stats(reference_images(self._data)[0])
            except Exception as exc:  # noqa: BLE001 - a missing classifier/Inception file: no gFID column
                log.warning("sweep: no gFID (%s)", exc)
                self._features = False
        if not self._features:
            return {}
        s = self.cfg.sweep
        res = evaluate_generation(model, self._reference, self._features.classifier, cfg_scales=[s.gfid_scale],
                                  n=s.gfid_samples, sample_cfg=trial_cfg.sample, features=self._features,
                                  seed=trial_cfg.sample.seed)
        return {"gfid": res["best"]["fid"], "conditional_accuracy": res["best"]["conditional_accuracy"]}

    # --- result files --------------------------------------------------------------------------------
    def best_row(self) -> dict | None:
        metric, mode = self.cfg.sweep.metric, self.cfg.sweep.mode
        scored = [r for r in self.rows.values() if isinstance(r.get(metric), (int, float))
                  and math.isfinite(r[metric])]
        if not scored:
            return None
        return (max if mode == "max" else min)(scored, key=lambda r: r[metric])

    def write_results(self) -> None:
        from unite_core.analysis.report import write_csv

        keys = list(dict.fromkeys(k for s in self.specs for k in s["overrides"]))
        order = {s["name"]: s["index"] for s in self.specs}
        rows = sorted(self.rows.values(), key=lambda r: order.get(r["trial"], 1e9))
        cols = ["trial", *keys, *[c for c in FIXED_COLUMNS if c != "trial"], "sweep"]
        write_csv(rows, self.ctx.paths.reports / CSV_NAME, cols)
        if any(isinstance(r.get("gfid"), float) for r in rows):
            from unite_core.analysis.report import plot_tradeoff, save_figure

            save_figure(plot_tradeoff(rows, keys, title=f"Sweep {self.name}: reconstruction vs generation"),
                        self.ctx.paths.reports / TRADEOFF_NAME)
        best = self.best_row()
        if best is not None:
            write_best_params(self.ctx.paths.reports / BEST_NAME, self.params_doc,
                              self.by_name[best["trial"]]["overrides"], best, self.name, self.cfg.sweep.metric,
                              self.steps)


def write_best_params(path: Path, params_doc: dict, overrides: dict, row: dict, sweep: str, metric: str,
                      steps: int) -> Path:
    """The params file with the best trial's values (train.steps left as the params say)."""
    doc = json.loads(json.dumps(params_doc))
    for k, v in overrides.items():
        _set_dotted(doc, k, v)
    config_from_dict(doc)  # still valid params
    sets = " ".join(f"-S '{k}={json.dumps(v)}'" for k, v in overrides.items())
    header = (
        f"# Best trial of sweep {sweep}: {row['trial']} ({describe(overrides)}), {metric} = "
        f"{_fmt(row.get(metric))} after {row.get('steps')} of {steps} sweep steps.\n"
        "# Written by `unite sweep`: your params file with the best trial's values (train.steps as in your params,\n"
        "# not the sweep's shorter trial budget). Train it as a DVC experiment, either with the changed keys:\n"
        f"#   dvc exp run {sets}\n"
        "# or by making this file the params (dvc exp run reads params.yaml):\n"
        "#   cp reports/best_params.yaml params.yaml && dvc exp run\n"
    )
    return atomic_write_text(path, header + yaml.safe_dump(doc, sort_keys=False))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
OPTIONS = {"trials": None, "concurrency": None, "steps": None, "resume": False, "fresh": False}


def _params_doc(ctx: StageContext) -> dict:
    """The params file as the user wrote it (plus --set overrides), for best_params.yaml."""
    from unite_core.config import apply_overrides

    doc: dict = {}
    if ctx.params_path is not None and Path(ctx.params_path).is_file():
        doc = yaml.safe_load(Path(ctx.params_path).read_text()) or {}
    else:
        doc = ctx.cfg.to_dict()
    return apply_overrides(doc, list(ctx.overrides or []))


def _ray_cpus(cfg: Config, concurrency: int, trials: int = 0) -> int:
    """Logical CPUs of the local Ray cluster a sweep starts (distributed.num_cpus wins when set).

    Room for `concurrency` trials at a time plus 2 spare. With ASHA, also a reserve for the trials
    it stops: Ray Train V2 keeps a stopped trial's worker placement group until the Tune driver
    exits (ray-project/ray#54305), and on a cluster sized for the running trials alone the next
    trial then waits for CPUs that never come back (measured: its worker group timed out three
    times, 300 s each, and the sweep ended). The reserve is logical only: Tune still runs at most
    `concurrency` trials, and each worker uses cpus_per_worker threads.
    """
    d = cfg.distributed
    if d.num_cpus:
        return d.num_cpus
    worker_cpus = max(1, d.num_workers) * d.cpus_per_worker
    reserve = trials * worker_cpus if cfg.sweep.scheduler == "asha" else 0
    return max(4, math.ceil(concurrency * (worker_cpus + TRIAL_CPU) + reserve) + 2)


def _ensure_ray(cfg: Config, concurrency: int, trials: int, debug: bool) -> bool:
    import ray

    if ray.is_initialized():
        return False
    d = cfg.to_dict()
    d["distributed"]["num_cpus"] = _ray_cpus(cfg, concurrency, trials)
    return distributed.ensure_ray(config_from_dict(d), debug=debug)


def run(ctx: StageContext) -> dict:
    """Run (or resume) the sweep; returns a summary (also in metrics/sweep.json via the stage runner)."""
    opts = {**OPTIONS, **{k: v for k, v in (ctx.options or {}).items() if v is not None}}
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise SweepError(f"unknown sweep option(s) {sorted(unknown)}: known are {sorted(OPTIONS)}")
    cfg = ctx.cfg
    s = cfg.sweep
    t0 = time.perf_counter()
    steps = int(opts["steps"] or s.steps or cfg.train.steps)
    concurrency = int(opts["concurrency"] or s.max_concurrent)
    if s.scheduler == "asha" and not s.metric.startswith("val_"):
        raise SweepError(f"sweep.metric={s.metric} is measured when a trial has ended, but the asha scheduler "
                         "stops trials on a metric reported while they train (val_psnr, val_loss, ...): set "
                         "sweep.scheduler=none or a val_* metric")
    overrides = trial_overrides(cfg, opts["trials"])
    specs = [{"index": i, "name": trial_name(i, o), "overrides": o} for i, o in enumerate(overrides)]
    trial_cfgs = {sp["name"]: trial_config(cfg, sp["overrides"], steps) for sp in specs}
    name = sweep_name(cfg, specs, steps)
    root = ctx.paths.ray_storage / "sweeps" / name
    tune_dir, runs_dir = root / "tune", root / "runs"
    data_dir = ctx.paths.dataset_dir(cfg)
    distributed.check_prepared(cfg, data_dir)
    for tc in trial_cfgs.values():
        distributed.preflight(config_from_dict(tc), distributed.check_prepared(cfg, data_dir),
                              tc["distributed"]["num_workers"])

    from ray.tune import Tuner

    exists = Tuner.can_restore(str(tune_dir))
    if exists and opts["fresh"]:
        import shutil

        log.warning("sweep %s: --fresh: deleting the previous sweep folder %s", name, root)
        shutil.rmtree(root)
        exists = False
    if exists and not opts["resume"]:
        raise SweepError(f"a sweep with these settings exists in {root}: `unite sweep --resume` continues it "
                         "(finished trials are kept), `unite sweep --fresh` starts it over")
    if not exists and (root.exists() and any(runs_dir.glob("*"))):
        log.info("sweep %s: no Tune state to restore; trials reuse their train runs in %s", name, runs_dir)
    ctx.tracker.set_tags({"unite.sweep": name})
    ctx.tracker.log_params({"sweep.name": name, "sweep.trials": len(specs), "sweep.steps": steps,
                            "sweep.concurrency": concurrency})
    log.info("sweep %s: %d trials x %d steps, %d at a time, scheduler %s on %s (%s)%s", name, len(specs), steps,
             concurrency, s.scheduler, s.metric, s.mode, "; resuming" if exists else "")

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = _ensure_ray(cfg, concurrency, len(specs), ctx.debug)
    try:
        setup = {"trial_cfgs": trial_cfgs, "runs_dir": str(runs_dir), "data_dir": str(Path(data_dir).resolve())}
        trainable = tune.with_resources(tune.with_parameters(sweep_trial, setup=setup), {"CPU": TRIAL_CPU})
        with ctx.reporter.progress(f"sweep ({len(specs)} trials)", len(specs)) as task:
            driver = SweepDriver(ctx, name, specs, trial_cfgs, runs_dir, steps, _params_doc(ctx), task,
                                 fresh=bool(opts["fresh"]))
            _DRIVERS[name] = driver
            done_before = len([r for r in driver.rows.values() if r.get("status") in ("finished", "stopped")])
            task.update(done_before)
            try:
                if exists:
                    tuner = Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True,
                                          resume_errored=True)
                else:
                    tuner = Tuner(trainable, param_space={"trial": tune.grid_search(specs)},
                                  tune_config=_tune_config(cfg, concurrency, steps),
                                  run_config=_run_config(root, name, ctx.debug))
                grid = tuner.fit()
            finally:
                _DRIVERS.pop(name, None)
    finally:
        if started:
            import ray

            ray.shutdown()

    statuses = {}
    for result in grid:
        trial = (result.config or {}).get("trial", {}).get("name")
        if trial is not None:
            statuses[trial] = "error" if result.error else "done"
    def unfinished():
        return [sp["name"] for sp in specs if sp["name"] not in driver.rows or
                driver.rows[sp["name"]].get("status") not in ("finished", "stopped")]

    driver.interrupt_after = 0
    for trial in unfinished():  # Tune finished it but its results were not recorded (e.g. interrupted then)
        if statuses.get(trial) == "done" and distributed.latest_checkpoint(runs_dir / trial) is not None:
            log.info("sweep: recording the results of finished trial %s", trial)
            driver.finish(trial, "finished")
    missing = unfinished()
    driver.write_results()
    best = driver.best_row()
    summary = {
        "sweep": name,
        "trials": len(specs),
        "finished": len(specs) - len(missing),
        "steps_per_trial": steps,
        "concurrency": concurrency,
        "best_trial": best["trial"] if best else None,
        f"best_{s.metric}": best.get(s.metric) if best else None,
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "csv": str(ctx.paths.reports / CSV_NAME),
        "best_params": str(ctx.paths.reports / BEST_NAME) if best else None,
    }
    if best:
        for k, v in specs[[sp["name"] for sp in specs].index(best["trial"])]["overrides"].items():
            summary[f"best.{k}"] = v
    if missing:
        errors = [t for t in missing if statuses.get(t) == "error" or driver.rows.get(t, {}).get("status") == "error"]
        if errors and len(errors) == len(missing):
            raise SweepError(f"sweep {name}: trial(s) {', '.join(errors)} failed (see --debug and "
                             f"{runs_dir}); `unite sweep --resume` retries them")
        raise SweepError(f"sweep {name} interrupted with {len(specs) - len(missing)} of {len(specs)} trials "
                         "finished (results so far in reports/sweep.csv): `unite sweep --resume` continues it")
    return summary


def _tune_config(cfg: Config, concurrency: int, steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = cfg.sweep
    if s.scheduler == "asha":
        every = max(1, math.ceil(steps / EVAL_ROUNDS))
        scheduler = ASHAScheduler(time_attr="step", metric=s.metric, mode=s.mode, max_t=steps,
                                  grace_period=min(steps, s.grace_period * every),
                                  reduction_factor=s.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency, scheduler=scheduler,
                           reuse_actors=False)  # function trainables cannot be reused (no reset_config)


def _run_config(root: Path, name: str, debug: bool):
    return tune.RunConfig(
        storage_path=str(root),
        name="tune",
        callbacks=[SweepCallback(name)],
        failure_config=tune.FailureConfig(max_failures=0),
        verbose=1 if debug else 0,
    )
