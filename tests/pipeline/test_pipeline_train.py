"""The train stage in-process (distributed.num_workers=0): the time budget, and what a stopped run leaves."""

from __future__ import annotations

import json

import pytest

from unite_core.runs import RECORDS_FILE, latest_checkpoint
from pipelines.stages import execute
from tests.ray_fixtures import read_json, tiny_params, write_params
from unite_core.config import config_from_dict


def _train_with_time_limit(root, *, steps: int, minutes: float, log_every: int):
    """Prepare and train the tiny params under a time limit: (params, config, the train stage's metrics)."""
    params = tiny_params(train={"steps": steps, "time_limit_minutes": minutes, "log_every": log_every,
                                "eval_every": 1000, "checkpoint_every": 1000},
                         tracking={"enabled": False})
    write_params(root, params)
    cfg = config_from_dict(params)
    execute("prepare", cfg, root)
    return params, cfg, execute("train", cfg, root)


def test_time_limit_stops_with_a_final_logged_and_checkpointed_step(tmp_path):
    params, cfg, metrics = _train_with_time_limit(tmp_path, steps=100000, minutes=0.03, log_every=1000)

    assert metrics["stopped_early"] and 0 < metrics["steps"] < 100000
    # checked after every step (not only at log steps): stops within a step or two of 1.8 s
    assert 1.8 <= metrics["seconds"] < 1.8 + 5
    ckpt = latest_checkpoint(tmp_path / "ray_results" / metrics["run_name"])
    assert ckpt.final and ckpt.step == metrics["steps"] and ckpt.meta["stopped_early"]
    # the stopping step is logged with a validation pass, although it is no log or eval step
    last = json.loads((ckpt.path.parent / RECORDS_FILE).read_text().splitlines()[-1])
    assert last["step"] == metrics["steps"] and "val_psnr" in last and "loss" in last
    assert read_json(tmp_path / "metrics" / "train.json")["val_psnr"] == last["val_psnr"]
    # a stopped run counts as finished: the same params export it again without training
    again = execute("train", cfg, tmp_path)
    assert again["trained_now"] is False and again["steps"] == metrics["steps"]


@pytest.mark.slow
def test_operational_changes_resume_the_run_and_a_raised_time_limit_continues_it(tmp_path):
    """A run stopped by its time budget, then the same model settings with other operational keys
    (no time limit, other log/eval/checkpoint intervals, threads, device): the same run folder goes
    on from where it stopped to train.steps, instead of starting again at step 0."""
    params, cfg, first = _train_with_time_limit(tmp_path, steps=200, minutes=0.02, log_every=5)
    assert first["stopped_early"] and 0 < first["steps"] < 200

    params["train"].update({"time_limit_minutes": None, "log_every": 20, "eval_every": 200, "checkpoint_every": 100,
                            "threads": 1, "device": "cpu"})
    write_params(tmp_path, params)
    again = execute("train", config_from_dict(params), tmp_path)
    assert again["run_name"] == first["run_name"] and again["trained_now"]
    assert again["steps"] == 200 and not again["stopped_early"]
    rdir = tmp_path / "ray_results" / first["run_name"]
    steps = [json.loads(line)["step"] for line in (rdir / RECORDS_FILE).read_text().splitlines()]
    resumed = [s for s in steps if s > first["steps"]]
    assert steps[: len(steps) - len(resumed)][-1] == first["steps"]  # the first session's history, kept
    assert resumed[0] == (first["steps"] // 20 + 1) * 20 and resumed[-1] == 200  # logged every 20 from there
    assert len(list((tmp_path / "ray_results").iterdir())) == 1
