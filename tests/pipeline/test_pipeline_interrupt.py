"""`unite train` stopped by a real signal, then resumed; the MLflow curve growing while it trains.

Every run is a real `unite train` subprocess on the digits_tiny preset with many steps, stopped with
Ctrl-C (SIGINT to its whole process group, as a terminal sends it) or SIGTERM (to the process, as
a scheduler sends it). The resumed run changes only operational keys (log_every, eval_every,
time_limit_minutes, threads), which must not restart training from step 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from unite_core.runs import RECORDS_FILE, latest_checkpoint
from pipelines.stages import execute
from tests.ray_fixtures import (UNITE, active_runs, mlflow_client, ray_cluster, read_json,  # noqa: F401
                                subprocess_env, tiny_params, write_params)
from unite_core.config import config_from_dict

pytestmark = pytest.mark.slow

STEPS = 4000  # far more than the test lets run: the signal always comes mid-training
TRAIN = {"steps": STEPS, "log_every": 5, "eval_every": 50, "checkpoint_every": 1000, "warmup_steps": 5,
         "time_limit_minutes": None, "threads": 1}


def start_train(root: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([UNITE, "train", *args], cwd=root, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def records(root: Path) -> list[dict]:
    found = sorted((root / "ray_results").glob(f"*/{RECORDS_FILE}"))
    if not found:
        return []
    return [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"`unite train` ended (code {proc.returncode}) before {what}: {err[-3000:]}")
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.25)


def running_train_run(root: Path):
    if not (root / "mlflow.db").is_file():
        return None
    try:
        runs = [r for r in active_runs(root, stage="train") if r.info.status == "RUNNING"]
    except Exception:  # noqa: BLE001 - the store is being created by the other process
        return None
    return runs[0] if runs else None


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def tiny_project(tmp_path):
    params = tiny_params(train=TRAIN)
    write_params(tmp_path, params)
    execute("prepare", config_from_dict(params), tmp_path)
    return tmp_path


def test_ctrl_c_checkpoints_marks_the_run_killed_and_the_next_train_resumes(tiny_project):
    """In-process training (distributed.num_workers=0). While it trains, the MLflow store already
    holds a growing loss curve (read from outside, as the UI reads it); Ctrl-C writes a checkpoint
    of the steps done, ends the run KILLED and says how to resume; `unite train` again continues
    from that step, although log_every, eval_every, time_limit_minutes and threads changed."""
    root = tiny_project
    client = mlflow_client(root)
    proc = start_train(root)
    t0 = time.time()
    wait_for(lambda: running_train_run(root) is not None, proc, 180, "a running MLflow train run")
    run_id = running_train_run(root).info.run_id
    seen: list[tuple[float, int]] = []  # (seconds, points of the loss curve in the store)

    def curve_grew_three_times() -> bool:
        n = len(client.get_metric_history(run_id, "loss"))
        if not seen or n != seen[-1][1]:
            seen.append((time.time() - t0, n))
        return len([s for s in seen if s[1] > 0]) >= 4

    wait_for(curve_grew_three_times, proc, 300, "a loss curve growing in MLflow")
    assert proc.poll() is None  # all of that while training ran
    counts = [n for _, n in seen if n > 0]
    assert counts == sorted(counts) and len(set(counts)) == len(counts) and counts[-1] < STEPS // 5
    gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:]) if a[1] > 0]
    print(f"live curve: points {counts} at {[round(s, 1) for s, n in seen if n > 0]} s "
          f"(a new batch every {sum(gaps) / len(gaps):.2f} s on average)")

    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    line = one_error_line(err)
    assert "stopped by Ctrl-C at step" in line and "run the same command again" in line and "resume" in line
    ckpt = latest_checkpoint(next((root / "ray_results").iterdir()))
    assert ckpt is not None and not ckpt.final and 0 < ckpt.step < STEPS
    assert f"step {ckpt.step} of {STEPS}" in line and ckpt.path.name in line
    assert not (root / "models" / "unite.pt").exists()  # nothing is exported from an unfinished run
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    logged = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert logged == [r["step"] for r in records(root)]  # the whole curve up to the stop, each step once

    # resume: the same model settings, other operational settings, fewer steps to go
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update({"steps": STEPS, "log_every": 7, "eval_every": 70, "time_limit_minutes": 30.0,
                            "threads": 2})
    write_params(root, params)
    stopped_at = ckpt.step
    proc = start_train(root)
    wait_for(lambda: any(r["step"] > stopped_at + 20 for r in records(root)), proc, 300, "training after the resume")
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends: to the process only
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert f"resuming from its checkpoint at step {stopped_at}" in err
    assert "stopped by SIGTERM" in one_error_line(err)
    steps = [r["step"] for r in records(root)]
    assert steps == sorted(set(steps))  # the resumed history, then the new steps; none twice
    assert [s for s in steps if s > stopped_at][0] == (stopped_at // 7 + 1) * 7  # logged at the new log_every
    assert len(list((root / "ray_results").iterdir())) == 1  # one run folder: nothing restarted from step 0
    killed = [r for r in active_runs(root, stage="train") if r.info.status == "KILLED"]
    assert len(killed) == 2


def test_sigterm_stops_ray_training_with_a_checkpoint(ray_cluster, tiny_project):
    """Through Ray Train (one worker on the session's cluster): SIGTERM to `unite train` reaches the
    worker through the stop file, which checkpoints at the next step; the command says how to resume."""
    root = tiny_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["distributed"]["num_workers"] = 1
    write_params(root, params)
    proc = start_train(root, RAY_ADDRESS=ray_cluster)
    wait_for(lambda: len(records(root)) >= 3, proc, 400, "Ray training")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    line = one_error_line(err)
    ckpt = latest_checkpoint(next((root / "ray_results").iterdir()))
    assert ckpt is not None and not ckpt.final and ckpt.step >= 15
    assert f"stopped by SIGTERM at step {ckpt.step} of {STEPS}" in line and ckpt.path.name in line
    assert not (ckpt.path.parent / "stop_requested").exists()
    (run,) = [r for r in active_runs(root, stage="train")]
    assert run.info.status == "KILLED"
    assert read_json(root / "metrics" / "prepare.json")["num_train"] == 1617
