"""`unite sweep` on Ray Tune with tiny trials: MLflow nesting, sweep.csv, best params, interruption + resume.

Uses the session's shared Ray cluster (tests/ray_fixtures.py). Each trial starts a Ray Train worker
group, which costs several seconds on a 2-core machine: these tests are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.stages import sweep as sweep_module
from pipelines.stages import execute
from tests.ray_fixtures import ray_cluster, tiny_params, write_params  # noqa: F401 (fixture)
from unite_core import sweeps
from unite_core.analysis import report
from unite_core.config import load_config
from unite_core.data import prepare_image_data

pytestmark = pytest.mark.slow

SWEEP = {"search": "grid", "num_samples": 1, "max_concurrent": 2, "scheduler": "none", "metric": "val_psnr",
         "mode": "max", "steps": 8, "space": {"model.latent_tokens": [2, 4]}, "gfid_samples": 20, "gfid_scale": 1.5}


@pytest.fixture
def project(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME", sweep_module.INTERRUPT_ENV):
        monkeypatch.delenv(key, raising=False)
    params = tiny_params(sweep=SWEEP, train={"log_every": 2, "warmup_steps": 1})
    path = write_params(tmp_path, params)
    cfg = load_config(path)
    prepare_image_data(cfg.data, tmp_path / "data" / cfg.data.dataset)
    return tmp_path, path


def run_sweep(root: Path, params: Path, **options):
    cfg = load_config(params)
    return execute("sweep", cfg, root, params_path=params, options=options)


def mlflow_runs(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("unite")
    return client, list(client.search_runs([exp.experiment_id]))


def invocations(root: Path, name: str) -> dict[str, int]:
    runs = root / "ray_results" / "sweeps" / name / "runs"
    return {d.name: len((d / sweep_module.INVOCATIONS_FILE).read_text().splitlines())
            for d in sorted(runs.iterdir()) if (d / sweep_module.INVOCATIONS_FILE).is_file()}


def test_two_trial_sweep_logs_two_child_runs_and_writes_results(ray_cluster, project):  # noqa: F811
    root, params = project
    execute("classifier", load_config(params), root)  # the feature network of the trials' gFID
    summary = run_sweep(root, params)

    assert summary["trials"] == summary["finished"] == 2
    rows = report.read_csv(root / "reports" / "sweep.csv")
    assert len(rows) == 2
    assert all(r["gfid"] > 0 and 0 <= r["conditional_accuracy"] <= 1 for r in rows)
    assert (root / "reports" / sweeps.TRADEOFF_NAME).stat().st_size > 10_000  # the trade-off plot
    assert sorted(r["model.latent_tokens"] for r in rows) == [2, 4]
    for r in rows:
        assert r["status"] == "finished" and r["steps"] == 8
        assert 0 < r["val_psnr"] < 60
        assert r["rate_floats"] == r["latent_tokens"] * r["latent_dim"]
        assert 0 < r["bits_per_image"] <= r["rate_floats"] * 9  # at most log2(180 val images) per dim

    client, runs = mlflow_runs(root)
    sweep_runs = [r for r in runs if r.data.tags.get("unite.stage") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("unite.stage") == "sweep_trial"]
    assert len(sweep_runs) == 1 and len(trials) == 2
    parent = sweep_runs[0].info.run_id
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent}
    assert {t.data.tags["unite.trial"] for t in trials} == {r["trial"] for r in rows}
    for t in trials:
        assert t.info.status == "FINISHED"
        assert t.data.params["model.latent_tokens"] in ("2", "4")
        assert t.data.params["train.steps"] == "8"
        curve = client.get_metric_history(t.info.run_id, "loss")
        assert sorted(m.step for m in curve) == [2, 4, 6, 8]  # every log step once
        row = next(r for r in rows if r["trial"] == t.data.tags["unite.trial"])
        assert t.data.metrics["final_val_psnr"] == pytest.approx(row["val_psnr"])

    best = max(rows, key=lambda r: r["val_psnr"])
    text = (root / "reports" / "best_params.yaml").read_text()
    assert "dvc exp run" in text
    doc = yaml.safe_load(text)
    assert doc["model"]["latent_tokens"] == best["model.latent_tokens"]
    assert doc["train"]["steps"] == 40  # the params' own budget, not the sweep's
    load_config(root / "reports" / "best_params.yaml")  # a valid params file
    assert json.loads((root / "metrics" / "sweep.json").read_text())["best_trial"] == best["trial"]
    assert invocations(root, summary["sweep"]) == {r["trial"]: 1 for r in rows}


def test_interrupted_sweep_resumes_without_redoing_finished_trials(ray_cluster, project, monkeypatch):  # noqa: F811
    root, params = project
    monkeypatch.setenv(sweep_module.INTERRUPT_ENV, "1")
    with pytest.raises(sweep_module.SweepError, match="--resume"):
        run_sweep(root, params, concurrency=1)
    rows = report.read_csv(root / "reports" / "sweep.csv")
    assert len(rows) == 1 and rows[0]["status"] == "finished"
    assert rows[0]["gfid"] is None  # no feature classifier in this project: no gFID, and the sweep goes on
    first = rows[0]["trial"]
    name = rows[0]["sweep"]
    before = invocations(root, name)
    assert before[first] == 1

    monkeypatch.delenv(sweep_module.INTERRUPT_ENV)
    with pytest.raises(sweep_module.SweepError, match="exists"):
        run_sweep(root, params, concurrency=1)  # no silent overwrite
    summary = run_sweep(root, params, concurrency=1, resume=True)

    assert summary["finished"] == 2
    rows = report.read_csv(root / "reports" / "sweep.csv")
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    after = invocations(root, name)
    assert after[first] == 1  # the finished trial was not trained again
    assert set(after) == {r["trial"] for r in rows}
    _, runs = mlflow_runs(root)
    sweep_runs = [r for r in runs if r.data.tags.get("unite.stage") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("unite.stage") == "sweep_trial"]
    assert len(sweep_runs) == 1 and len(trials) == 2  # the interrupted sweep run was replaced
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {sweep_runs[0].info.run_id}


def test_trial_list_and_configs(tmp_path):
    from unite_core.config import config_from_dict

    cfg = config_from_dict(tiny_params(sweep={**SWEEP, "space": {"model.latent_tokens": [2, 4],
                                                                 "model.latent_dim": [2, 8]}}))
    grid = sweeps.trial_overrides(cfg)
    assert len(grid) == 4 and {tuple(o.values()) for o in grid} == {(2, 2), (2, 8), (4, 2), (4, 8)}
    assert sweeps.trial_overrides(cfg, trials=3) == grid[:3]
    rnd = config_from_dict(tiny_params(sweep={**SWEEP, "search": "random", "num_samples": 5}))
    draws = sweeps.trial_overrides(rnd)
    assert len(draws) == 5 and draws == sweeps.trial_overrides(rnd)  # seeded
    tc = sweeps.trial_config(cfg, {"model.latent_tokens": 4}, steps=30)
    assert tc.model.latent_tokens == 4 and tc.train.steps == 30
    assert tc.train.eval_every == tc.train.checkpoint_every == 10  # 4 rounds, multiple of log_every
    assert tc.distributed.num_workers == 1  # the sweep always trains through Ray Train
    assert tc.train.ema_decay == pytest.approx(1 - 10 / 30)  # EMA horizon <= steps / 10
    assert sweeps.trial_config(cfg, {}, steps=10_000).train.ema_decay == cfg.train.ema_decay
    with pytest.raises(sweep_module.SweepError, match="not a params key"):
        sweeps.trial_config(cfg, {"model.latent_tokenz": 4}, steps=30)
    with pytest.raises(sweep_module.SweepError, match="latent_tokens"):
        sweeps.trial_config(cfg, {"model.latent_tokens": 0}, steps=30)


def test_scheduler_settings():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from unite_core.config import config_from_dict

    cfg = config_from_dict(tiny_params(sweep={**SWEEP, "scheduler": "asha", "grace_period": 2, "reduction_factor": 3}))
    tc = sweep_module._tune_config(cfg, concurrency=2, steps=40)
    sched = tc.scheduler
    assert isinstance(sched, ASHAScheduler)
    assert sched._time_attr == "step" and sched._metric == "val_psnr" and sched._mode == "max"
    assert sched._max_t == 40 and [r[0] for r in sched._brackets[0]._rungs] == [20]  # grace: 2 rounds of 10 steps
    assert sched._reduction_factor == 3 and tc.max_concurrent_trials == 2
    none = config_from_dict(tiny_params(sweep={**SWEEP, "scheduler": "none"}))
    assert isinstance(sweep_module._tune_config(none, 1, 40).scheduler, FIFOScheduler)
    assert sweep_module._ray_cpus(none, concurrency=3) == 6  # 3 trials x 1 worker CPU (+ a little) + 2 spare
    # ASHA: plus one trial's worker CPUs per trial it may stop (Ray keeps a stopped trial's placement group)
    assert sweep_module._ray_cpus(cfg, concurrency=3, trials=8) == 6 + 8


def test_results_files_and_summary_from_trial_rows(tmp_path):
    """The driver's bookkeeping without Ray: rows in trial order in sweep.csv, the best trial by the metric's
    mode in best_params.yaml and the summary, unfinished trials not counted."""
    from unite_core.config import config_from_dict

    cfg = config_from_dict(tiny_params(sweep=SWEEP))
    trials = [{"index": i, "name": f"t{i:03d}", "overrides": {"model.latent_tokens": k}} for i, k in enumerate((2, 4, 8))]
    rows = [{"trial": "t002", "status": "stopped", "val_psnr": 14.0, "sweep": "s"},
            {"trial": "t000", "status": "finished", "val_psnr": 12.5, "sweep": "s", "steps": 30},
            {"trial": "t001", "status": "error", "val_psnr": None, "sweep": "s"}]
    assert sweeps.best_row(rows, "val_psnr", "max")["trial"] == "t002"
    assert sweeps.best_row(rows, "val_psnr", "min")["trial"] == "t000"
    sweeps.write_reports(rows, trials, tmp_path, sweep="s", metric="val_psnr", mode="max", params_doc=cfg.to_dict(),
                         steps=30)
    table = report.read_csv(tmp_path / sweeps.CSV_NAME)
    assert [r["trial"] for r in table] == ["t000", "t001", "t002"] and "model.latent_tokens" in table[0]
    best = yaml.safe_load((tmp_path / sweeps.BEST_NAME).read_text())
    assert best["model"]["latent_tokens"] == 8 and best["train"]["steps"] == cfg.train.steps
    assert not (tmp_path / sweeps.TRADEOFF_NAME).exists()  # no gFID column: no trade-off figure
    summary = sweeps.sweep_summary("s", rows, trials, metric="val_psnr", mode="max", steps=30, concurrency=2,
                                   reports=tmp_path, seconds=1.234)
    assert summary["finished"] == 2 and summary["best_trial"] == "t002" and summary["best_val_psnr"] == 14.0
    assert summary["best.model.latent_tokens"] == 8 and summary["wall_seconds"] == 1.23
    row, state = sweeps.trial_row(cfg, tmp_path / "no_runs_here", "finished")
    assert state is None and row["status"] == "no_checkpoint" and row["rate_floats"] == cfg.model.latent_tokens * cfg.model.latent_dim
