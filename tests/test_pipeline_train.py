"""The train stage in-process (distributed.num_workers=0): the time budget, and what a stopped run leaves."""

from __future__ import annotations

import json

from pipelines.distributed import RECORDS_FILE, latest_checkpoint
from pipelines.stages import execute
from tests.ray_fixtures import read_json, tiny_params, write_params
from unite_core.config import config_from_dict


def test_time_limit_stops_with_a_final_logged_and_checkpointed_step(tmp_path):
    params = tiny_params(train={"steps": 100000, "time_limit_minutes": 0.03, "log_every": 1000,
                                "eval_every": 1000, "checkpoint_every": 1000},
                         tracking={"enabled": False})
    write_params(tmp_path, params)
    cfg = config_from_dict(params)
    execute("prepare", cfg, tmp_path)
    metrics = execute("train", cfg, tmp_path)

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
