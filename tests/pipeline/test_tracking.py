"""MLflow tracking as a user meets it: every run names its git commit and params hash, the trained
model loads back from MLflow and generates, a locked store is waited for, a broken or unreachable
store costs one warning (or stops the stage with tracking.strict), telemetry is off by default."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.stages import execute
from pipelines.tracking import GIT_COMMIT_TAG, PARAMS_HASH_TAG, TrackingError, params_hash
from tests.ray_fixtures import REPO, active_runs, mlflow_client, read_json, tiny_params, write_params
from unite_core.config import config_from_dict

GIT = ["git", "-c", "user.name=unite tests", "-c", "user.email=tests@unite.invalid"]


def project(root: Path, **sections) -> object:
    params = tiny_params(**sections)
    write_params(root, params)
    return config_from_dict(params)


def test_every_run_carries_the_git_commit_and_the_params_hash(tmp_path):
    cfg = project(tmp_path)
    subprocess.run([*GIT, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "params"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    execute("prepare", cfg, tmp_path)
    runs = active_runs(tmp_path)
    assert {r.info.run_name for r in runs} == {"prepare", f"pipeline-{params_hash(cfg.to_dict())}"}
    for run in runs:  # the parent and the stage's run
        assert run.data.tags[GIT_COMMIT_TAG] == head
        assert run.data.tags[PARAMS_HASH_TAG] == params_hash(cfg.to_dict())
        assert run.data.tags["unite.git_dirty"] == "false"  # data/ and metrics/ are not tracked here


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    cfg = project(root, train={"steps": 20, "log_every": 5, "eval_every": 10, "checkpoint_every": 10,
                               "time_limit_minutes": None})
    execute("prepare", cfg, root)
    metrics = execute("train", cfg, root)
    (run,) = active_runs(root, stage="train")
    return {"root": root, "cfg": cfg, "metrics": metrics, "run": run}


def test_the_trained_model_is_an_mlflow_model_that_generates(trained):
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch
    from mlflow.models import Model

    root, run = trained["root"], trained["run"]
    client = mlflow_client(root)
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    assert output.step == 20
    # filed in the run's experiment, its files in the project's store (not ./mlruns of the cwd)
    logged = client.get_logged_model(output.model_id)
    assert logged.experiment_id == run.info.experiment_id
    assert logged.artifact_location.startswith((root / "mlartifacts").as_uri()), logged.artifact_location
    # no second copy of the raw checkpoint among the run's artifacts
    assert "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    uri = f"models:/{output.model_id}"
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        model = mlflow.pytorch.load_model(uri)
        images = model(torch.tensor([0, 1, 2, 3]))
        again = model(torch.tensor([0, 1, 2, 3]))
        info = Model.load(uri)
        pyfunc = mlflow.pyfunc.load_model(uri)
        predicted = pyfunc.predict(np.array([7, 7], dtype=np.int64))
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert images.shape == (4, 1, 8, 8) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.std()) > 0.01
    assert torch.equal(images, again)  # noise seeded by sample.seed: same labels, same images
    assert not torch.allclose(images[0], images[1])  # class-conditional: other labels, other images
    (spec,) = info.signature.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype("int64"), (-1,))
    assert info.signature.outputs.inputs[0].shape == (-1, 1, 8, 8)
    assert info.saved_input_example_info is not None
    assert predicted.shape == (2, 1, 8, 8)


def test_curves_reach_the_run_once_per_step(trained):
    history = mlflow_client(trained["root"]).get_metric_history(trained["run"].info.run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20]


# ----------------------------------------------------------------------------------------------
# Bad stores
# ----------------------------------------------------------------------------------------------
def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "MLflow store" in r.getMessage()]


def test_a_corrupt_store_warns_once_and_the_stage_runs_untracked(tmp_path, caplog):
    cfg = project(tmp_path)
    (tmp_path / "mlflow.db").write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING):
        metrics = execute("prepare", cfg, tmp_path)
    (warning,) = _warnings(caplog)
    assert "mlflow.db" in warning and "untracked" in warning and "\n" not in warning
    assert read_json(tmp_path / "metrics" / "prepare.json")["num_train"] == metrics["num_train"] == 1617
    assert (tmp_path / "mlflow.db").read_bytes().startswith(b"this is not a database")  # left as it was

    strict = config_from_dict({**cfg.to_dict(), "tracking": {**cfg.to_dict()["tracking"], "strict": True}})
    with pytest.raises(TrackingError) as info:
        execute("prepare", strict, tmp_path)
    assert "\n" not in str(info.value) and "tracking.strict" in str(info.value) and "mlflow.db" in str(info.value)


def test_an_unreachable_server_warns_once(tmp_path, caplog, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    cfg = project(tmp_path)
    with caplog.at_level(logging.WARNING):
        execute("prepare", cfg, tmp_path)
    (warning,) = _warnings(caplog)
    assert f"127.0.0.1:{port}" in warning and "untracked" in warning
    assert (tmp_path / "metrics" / "prepare.json").is_file()


def test_a_locked_store_is_waited_for(tmp_path, caplog):
    """Another writer holds SQLite's write lock for 8 s (longer than SQLite's own 5 s wait): the
    stage retries, then logs into its run as usual."""
    cfg = project(tmp_path)
    execute("prepare", cfg, tmp_path)  # creates the store
    held = threading.Event()

    def hold_lock():
        con = sqlite3.connect(tmp_path / "mlflow.db", timeout=30)
        con.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(8)
        con.rollback()
        con.close()

    locker = threading.Thread(target=hold_lock)
    locker.start()
    held.wait(30)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        execute("prepare", cfg, tmp_path)
    waited = time.perf_counter() - t0
    locker.join()
    assert not _warnings(caplog)
    runs = active_runs(tmp_path, stage="prepare")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the new run replaced the first one
    assert runs[0].data.metrics["num_train"] == 1617
    print(f"prepare with the store locked for 8 s took {waited:.1f} s")


# ----------------------------------------------------------------------------------------------
# Telemetry and analytics
# ----------------------------------------------------------------------------------------------
def _clean_env(**extra: str) -> dict[str, str]:
    """No CI or pytest markers (MLflow turns telemetry off by itself when it sees them)."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return {**keep, **extra}


def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on():
    code = ("import pipelines.tracking; from mlflow.telemetry.utils import is_telemetry_disabled; "
            "print(is_telemetry_disabled())")
    default = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True)
    on = subprocess.run([sys.executable, "-c", code], env=_clean_env(MLFLOW_DISABLE_TELEMETRY="false"),
                        capture_output=True, text=True)
    assert default.stdout.strip() == "True", default.stderr[-2000:]
    assert on.stdout.strip() == "False", on.stderr[-2000:]


def test_dvc_analytics_are_off_in_the_project():
    dvc = str(Path(sys.executable).parent / "dvc")
    out = subprocess.run([dvc, "config", "core.analytics"], cwd=REPO, env=_clean_env(), capture_output=True,
                         text=True)
    assert out.stdout.strip() == "false", out.stderr
    code = "import dvc.analytics as a; print(a.is_enabled())"
    enabled = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_clean_env(), capture_output=True, text=True)
    assert enabled.stdout.strip() == "False", enabled.stderr[-2000:]
