"""Stage `sweep` (`unite sweep`): Ray Tune over params.yaml `sweep:`, each trial a `unite train` run.

Trials (unite_core/sweeps.py): the grid or random draws over `sweep.space`; `--trials N` keeps the first N;
every trial config is validated before anything starts.

A trial (`sweep_trial`) fits the same TorchTrainer as `unite train` (distributed.ray_trainer) with Tune's
report callback: each checkpoint report carries the worker's validation numbers, on which `asha` (time
attribute = step, `grace_period` in evaluation rounds) may stop it. Train runs live in
`ray_results/sweeps/<sweep>/runs/<trial>/`, Tune's state in `.../tune/`.

The driver (the only MLflow writer) keeps one child run per trial under the `sweep` stage run (params,
curve, final numbers). When a trial ends it reads and measures the trial's newest checkpoint
(unite_core.sweeps: trial_row, measure_trial with models/classifier.pt and sweep.gfid_samples at
sweep.gfid_scale) and rewrites reports/sweep.csv, sweep_tradeoff.png and best_params.yaml (write_reports).

Ctrl-C (or SIGUSR1) stops Tune; `unite sweep --resume` runs the trials without a result (an unfinished
one resumes its train run); a plain `unite sweep` refuses to overwrite an existing sweep (--resume, or
--fresh to start over). Test-only: UNITE_TEST_SWEEP_INTERRUPT_AFTER=N interrupts after N finished trials.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from ray import tune

from unite_core.config import Config, config_from_dict, params_as_written
from unite_core.eval_images import in_memory_references
from unite_core.inputs import check_prepared
from unite_core.runs import RECORDS_FILE, latest_checkpoint, preflight
from unite_core.sweeps import (CSV_NAME, DONE, EVAL_ROUNDS, SweepError, best_row, describe, fmt, measure_trial,
                               sweep_key, sweep_summary, trial_config, trial_name, trial_overrides, trial_row,
                               write_reports)

from .. import distributed
from ..context import StageContext
from ..tracking import STAGE_TAG
from . import stage_options

log = logging.getLogger(__name__)

INVOCATIONS_FILE = "invocations.log"  # one line per start of a trial's training (counts trainings)
INTERRUPT_ENV = "UNITE_TEST_SWEEP_INTERRUPT_AFTER"
TRIAL_CPU = 0.01
OPTIONS = {"trials": None, "concurrency": None, "steps": None, "resume": False, "fresh": False}


# --- Trials ---
def sweep_name(cfg: Config, specs: list[dict], steps: int) -> str:
    """Deterministic name of a sweep (unite_core.sweeps.sweep_key), with the DVC experiment's name under DVC."""
    exp = os.environ.get("DVC_EXP_NAME")
    return (f"sweep-{exp}-" if exp else "sweep-") + sweep_key(cfg, [sp["overrides"] for sp in specs], steps)


def sweep_trial(config: dict, setup: dict) -> None:
    """One Tune trial (in a Ray process): fit the trial's train run, reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    name = config["trial"]["name"]
    cfg = config_from_dict(setup["trial_cfgs"][name])
    run_dir = Path(setup["runs_dir"]) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(run_dir)
    with open(run_dir / INVOCATIONS_FILE, "a") as f:
        f.write(json.dumps({"time": time.time(), "resume_step": previous.step if previous else 0}) + "\n")
    distributed.fit(cfg, run_dir, lambda resume: distributed.ray_trainer(
        cfg, data_dir=setup["data_dir"], run_dir=run_dir, resume=resume, use_gpu=cfg.distributed.use_gpu,
        callbacks=(TuneReportCallback(),)), resume=previous)


# --- Driver: MLflow runs, evaluation of finished trials, result files ---
class SweepCallback(tune.Callback):
    """Tune's trial events to the sweep's driver. Tune pickles its callbacks with its state: the driver
    (MLflow client, data, progress bar) is not pickled along."""

    def __init__(self, driver: "SweepDriver"):
        self.driver = driver

    def __getstate__(self):
        return {"driver": None}

    def _call(self, method: str, *args) -> None:
        if self.driver is None:
            return
        try:
            getattr(self.driver, method)(*args)
        except Exception:  # noqa: BLE001 - a logging/evaluation problem must not stop the other trials
            log.exception("sweep: %s failed (the sweep goes on; rerun with --resume to redo the results)", method)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._call("trial_started", trial.config["trial"]["name"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._call("trial_result", trial.config["trial"]["name"], result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._call("finish", trial.config["trial"]["name"], "finished", trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._call("finish", trial.config["trial"]["name"], "error", trial)


class SweepDriver:
    """Everything the sweep does in the driver process: MLflow runs, evaluation, sweep.csv."""

    def __init__(self, ctx: StageContext, name: str, specs: list[dict], trial_cfgs: dict[str, Config],
                 runs_dir: Path, steps: int, params_doc: dict, task, fresh: bool = False):
        self.ctx, self.cfg, self.name, self.specs, self.trial_cfgs = ctx, ctx.cfg, name, specs, trial_cfgs
        self.by_name = {s["name"]: s for s in specs}
        self.runs_dir, self.steps, self.params_doc, self.task = runs_dir, steps, params_doc, task
        self.rows: dict[str, dict] = {}
        self.best_reported: dict[str, float] = {}
        self.finished_now = 0
        self.interrupt_after = int(os.environ.get(INTERRUPT_ENV, "0") or 0)
        self.trackers: dict[str, Any] = {}
        self.logged_step: dict[str, int] = {}
        self._inputs_cache = None
        path = ctx.paths.reports / CSV_NAME
        if path.is_file() and not fresh:  # rows of an earlier (interrupted) run of this sweep
            from unite_core.analysis.report import read_csv

            self.rows = {r["trial"]: r for r in read_csv(path) if r.get("trial") in self.by_name
                         and r.get("sweep") == name}
        for run in ctx.tracker.children({"unite.sweep": name, STAGE_TAG: "sweep_trial"}):
            trial = run.data.tags.get("unite.trial")
            if trial not in self.by_name:
                continue
            if fresh or trial in self.trackers:  # --fresh, or an older duplicate (newest first)
                ctx.tracker.retire(run.info.run_id)
                continue
            self.trackers[trial] = ctx.tracker.child(run)  # under this (resumed) sweep run
            self.logged_step[trial] = int(run.data.tags.get("unite.logged_step", "0"))

    def done(self) -> list[str]:
        return [n for n, r in self.rows.items() if r.get("status") in DONE]

    def tracker(self, name: str):
        if name not in self.trackers:
            spec = self.by_name[name]
            tags = {"unite.sweep": self.name, "unite.trial": name, STAGE_TAG: "sweep_trial"}
            from ..tracking import source_tags

            params = self.trial_cfgs[name].to_dict()
            tr = self.ctx.tracker.child(name=f"{name} {describe(spec['overrides'])}",
                                        tags={**source_tags(self.ctx.root, params), **tags})
            tr.log_params({"sweep.trial": name, "sweep.name": self.name,
                           **{f"sweep.override.{k}": v for k, v in spec["overrides"].items()}})
            tr.log_params(params)
            self.trackers[name] = tr
        return self.trackers[name]

    def _log_curve(self, name: str) -> None:
        """Log the trial's metrics.jsonl records that MLflow does not have yet (each step once)."""
        records = self.runs_dir / name / RECORDS_FILE
        tr = self.tracker(name)
        if not tr.active or not records.is_file():
            return
        done, new = self.logged_step.get(name, 0), []
        for line in records.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if int(rec.get("step", 0)) > done:
                new.append(rec)
        if new:
            tr.log_metric_history(new)
            self.logged_step[name] = max(int(r["step"]) for r in new)
            tr.set_tags({"unite.logged_step": str(self.logged_step[name])})

    # --- Tune events -------------------------------------------------------------------------------
    def trial_started(self, name: str) -> None:
        self.tracker(name).set_status("RUNNING")
        log.info("sweep: trial %s (%s) started", name, describe(self.by_name[name]["overrides"]))

    def trial_result(self, name: str, result: dict) -> None:
        v = result.get(self.cfg.sweep.metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            prev = self.best_reported.get(name)
            better = prev is None or (v > prev if self.cfg.sweep.mode == "max" else v < prev)
            self.best_reported[name] = v if better else prev
        self._log_curve(name)

    def finish(self, name: str, status: str, trial=None) -> None:
        """Log the rest of the curve, evaluate the newest checkpoint, write the row and the files."""
        self._log_curve(name)
        row = self.rows[name] = self.evaluate(name, status, trial)
        tr = self.tracker(name)
        # final numbers under their own names (the curve already has val_psnr at the training steps)
        tr.log_metrics({f"final_{k}": v for k, v in row.items() if k in (
            "val_psnr", "rfid", "rate_floats", "bits_per_image", "bits_per_dim_mean", "train_seconds")},
            step=int(row.get("steps") or 0))
        tr.set_status("FINISHED" if status == "finished" else "FAILED")
        self.write_results()
        self.finished_now += 1
        best = self.best_row()
        metric = self.cfg.sweep.metric
        self.task.update(len(self.done()), **({"best": f"{best['trial']} {metric} {fmt(best.get(metric))}"}
                                              if best else {}))
        log.info("sweep: trial %s %s: val PSNR %s dB, rate %s floats / %s bits per image", name, row["status"],
                 fmt(row.get("val_psnr")), row.get("rate_floats"), fmt(row.get("bits_per_image")))
        if self.interrupt_after and self.finished_now >= self.interrupt_after:
            log.warning("%s=%d: interrupting the sweep (test-only)", INTERRUPT_ENV, self.interrupt_after)
            self.interrupt_after = 0
            os.kill(os.getpid(), signal.SIGUSR1)

    # --- evaluation of a finished trial, result files ------------------------------------------------
    def _inputs(self) -> dict:
        """The data, the rFID classifier and the gFID features + reference (each optional), loaded once."""
        if self._inputs_cache is None:
            data, found = self.ctx.open_data(), {}
            if self.cfg.modality == "images":
                try:
                    found["classifier"], _ = self.ctx.classifier(data, required=False)
                    if self.cfg.sweep.gfid_samples > 0:
                        found["features"] = self.ctx.feature_spec(data, "cpu")
                        found["reference"] = found["features"].stats(in_memory_references(data)[0])
                except Exception as exc:  # noqa: BLE001 - a missing classifier/Inception file: fewer columns
                    log.warning("sweep: no rFID/gFID columns (%s)", exc)
            self._inputs_cache = {"data": data, **found}
        return self._inputs_cache

    def evaluate(self, name: str, status: str, trial=None) -> dict:
        """Row of sweep.csv for a trial: its settings and the measurements of its newest checkpoint."""
        from unite_core.train import model_from_checkpoint

        row, state = trial_row(self.trial_cfgs[name], self.runs_dir / name, status)
        row.update({"sweep": self.name, "trial": name, "mlflow_run_id": self.tracker(name).run_id,
                    **self.by_name[name]["overrides"], "best_reported": self.best_reported.get(name)})
        if trial is not None:
            row["wall_seconds"] = round(float(trial.last_result.get("time_total_s", 0.0) or 0.0), 2)
        if state is not None:
            inputs = self._inputs()
            row.update(measure_trial(model_from_checkpoint(state, use_ema=True, device="cpu"), inputs["data"],
                                     self.trial_cfgs[name], classifier=inputs.get("classifier"),
                                     features=inputs.get("features"), reference=inputs.get("reference"),
                                     kid_subset_size=self.cfg.eval.kid_subset_size,
                                     gfid_samples=self.cfg.sweep.gfid_samples, gfid_scale=self.cfg.sweep.gfid_scale))
        return row

    def best_row(self) -> dict | None:
        return best_row(self.rows.values(), self.cfg.sweep.metric, self.cfg.sweep.mode)

    def write_results(self) -> None:
        write_reports(list(self.rows.values()), self.specs, self.ctx.paths.reports, sweep=self.name,
                      metric=self.cfg.sweep.metric, mode=self.cfg.sweep.mode, params_doc=self.params_doc,
                      steps=self.steps)


# --- The stage ---
def _ray_cpus(cfg: Config, concurrency: int, trials: int = 0) -> int:
    """Logical CPUs of the local cluster a sweep starts (distributed.num_cpus wins): `concurrency` trials plus
    2 spare and, with ASHA, a logical reserve for the trials it stops (Ray Train V2 keeps a stopped trial's
    placement group until the Tune driver exits, ray-project/ray#54305: the next trial would wait forever)."""
    d = cfg.distributed
    if d.num_cpus:
        return d.num_cpus
    worker_cpus = max(1, d.num_workers) * d.cpus_per_worker
    reserve = trials * worker_cpus if cfg.sweep.scheduler == "asha" else 0
    return max(4, math.ceil(concurrency * (worker_cpus + TRIAL_CPU) + reserve) + 2)


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


def run(ctx: StageContext) -> dict:
    """Run (or resume) the sweep; returns a summary (also in metrics/sweep.json via the stage runner)."""
    opts = stage_options(ctx, OPTIONS, SweepError, "sweep")
    cfg = ctx.cfg
    s = cfg.sweep
    t0 = time.perf_counter()
    steps = int(opts["steps"] or s.steps or cfg.train.steps)
    concurrency = int(opts["concurrency"] or s.max_concurrent)
    if s.scheduler == "asha" and not s.metric.startswith("val_"):
        raise SweepError(f"sweep.metric={s.metric} is measured when a trial has ended, but the asha scheduler "
                         "stops trials on a metric reported while they train (val_psnr, val_loss, ...): set "
                         "sweep.scheduler=none or a val_* metric")
    specs = [{"index": i, "name": trial_name(i, o), "overrides": o}
             for i, o in enumerate(trial_overrides(cfg, opts["trials"]))]
    trial_cfgs = {sp["name"]: trial_config(cfg, sp["overrides"], steps) for sp in specs}
    name = sweep_name(cfg, specs, steps)
    root = ctx.paths.ray_storage / "sweeps" / name
    tune_dir, runs_dir = root / "tune", root / "runs"
    data_dir = ctx.paths.dataset_dir(cfg)
    manifest = check_prepared(cfg, data_dir)
    for tc in trial_cfgs.values():
        preflight(tc, manifest, tc.distributed.num_workers)

    exists = tune.Tuner.can_restore(str(tune_dir))
    if exists and opts["fresh"]:
        log.warning("sweep %s: --fresh: deleting the previous sweep folder %s", name, root)
        shutil.rmtree(root)
        exists = False
    if exists and not opts["resume"]:
        raise SweepError(f"a sweep with these settings exists in {root}: `unite sweep --resume` continues it "
                         "(finished trials are kept), `unite sweep --fresh` starts it over")
    if not exists and root.exists() and any(runs_dir.glob("*")):
        log.info("sweep %s: no Tune state to restore; trials reuse their train runs in %s", name, runs_dir)
    ctx.tracker.set_tags({"unite.sweep": name})
    ctx.tracker.log_params({"sweep.name": name, "sweep.trials": len(specs), "sweep.steps": steps,
                            "sweep.concurrency": concurrency})
    log.info("sweep %s: %d trials x %d steps, %d at a time, scheduler %s on %s (%s)%s", name, len(specs), steps,
             concurrency, s.scheduler, s.metric, s.mode, "; resuming" if exists else "")

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = distributed.ensure_ray(cfg, debug=ctx.debug, num_cpus=_ray_cpus(cfg, concurrency, len(specs)))
    statuses: dict[str, str] = {}
    try:
        with ctx.reporter.progress(f"sweep ({len(specs)} trials)", len(specs)) as task:
            driver = SweepDriver(ctx, name, specs, trial_cfgs, runs_dir, steps, params_as_written(ctx.params_path, ctx.overrides, ctx.cfg), task,
                                 fresh=bool(opts["fresh"]))
            task.update(len(driver.done()))
            pending = [sp for sp in specs if sp["name"] not in driver.done()]  # a resumed sweep: the rest
            if pending:
                setup = {"trial_cfgs": {n: c.to_dict() for n, c in trial_cfgs.items()}, "runs_dir": str(runs_dir),
                         "data_dir": str(Path(data_dir).resolve())}
                trainable = tune.with_resources(tune.with_parameters(sweep_trial, setup=setup), {"CPU": TRIAL_CPU})
                tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(pending)},
                                   tune_config=_tune_config(cfg, concurrency, steps),
                                   run_config=tune.RunConfig(storage_path=str(root), name="tune",
                                                             callbacks=[SweepCallback(driver)],
                                                             failure_config=tune.FailureConfig(max_failures=0),
                                                             verbose=1 if ctx.debug else 0))
                for result in tuner.fit():
                    trial = (result.config or {}).get("trial", {}).get("name")
                    if trial is not None:
                        statuses[trial] = "error" if result.error else "done"
    finally:
        if started:
            import ray

            ray.shutdown()

    driver.interrupt_after = 0
    for trial, status in statuses.items():  # Tune finished it but its results were not recorded (interrupted then)
        if trial not in driver.done() and status == "done" and latest_checkpoint(runs_dir / trial):
            log.info("sweep: recording the results of finished trial %s", trial)
            driver.finish(trial, "finished")
    missing = [sp["name"] for sp in specs if sp["name"] not in driver.done()]
    driver.write_results()
    summary = sweep_summary(name, driver.rows.values(), specs, metric=s.metric, mode=s.mode, steps=steps,
                            concurrency=concurrency, reports=ctx.paths.reports, seconds=time.perf_counter() - t0)
    if missing:
        errors = [t for t in missing if statuses.get(t) == "error" or driver.rows.get(t, {}).get("status") == "error"]
        if errors and len(errors) == len(missing):
            raise SweepError(f"sweep {name}: trial(s) {', '.join(errors)} failed (see --debug and "
                             f"{runs_dir}); `unite sweep --resume` retries them")
        raise SweepError(f"sweep {name} interrupted with {len(specs) - len(missing)} of {len(specs)} trials "
                         "finished (results so far in reports/sweep.csv): `unite sweep --resume` continues it")
    return summary
