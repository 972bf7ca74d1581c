"""Ray Train overhead: the same training steps in process and under Ray Train with one worker.

Both runs go through the pipeline's own entry points (pipelines.distributed.train_in_process and
train_with_ray), with the same params, steps, validation and checkpoint schedule, each in a fresh
temporary project (the prepared dataset is linked from this project's data/, or prepared there).
Prints one JSON line per run and a summary line:

    python benchmarks/ray_overhead.py --steps 200 --repeats 3
    python benchmarks/ray_overhead.py --steps 600 --set train.eval_every=100

Overhead is reported two ways: on the whole command (Ray start-up and shutdown included) and on the
training loop alone (time_s of the last step, which both paths log the same way). The two modes
alternate `--repeats` times and the summary takes medians: on a shared virtual machine the same
loop's speed drifts by 30% over minutes, so one run of each mode compares two different machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp: Path, cfg) -> Path:
    """A temporary project root whose data/<dataset> is this project's prepared copy (or a new one)."""
    from pipelines.context import StageContext
    from pipelines.stages import prepare

    src = ROOT / "data" / cfg.data.dataset
    (tmp / "data").mkdir(parents=True)
    if (src / "manifest.json").is_file():
        (tmp / "data" / cfg.data.dataset).symlink_to(src, target_is_directory=True)
    else:
        prepare.run(StageContext(cfg, tmp))
    return tmp


def _one(mode: str, cfg, base: Path) -> dict:
    from pipelines.context import StageContext
    from pipelines.distributed import train_in_process, train_with_ray
    from unite_core.runs import RECORDS_FILE
    from unite_core.config import apply_overrides, config_from_dict

    workers = 0 if mode == "in_process" else 1
    # Ray runs its workers at nice 15 (RAY_worker_niceness), below its own daemons; ray_1_worker_nice0
    # measures whether that costs the training worker anything on a machine it fills
    os.environ["RAY_worker_niceness"] = "0" if mode.endswith("nice0") else "15"
    cfg = config_from_dict(apply_overrides(cfg.to_dict(), [f"distributed.num_workers={workers}"]))
    root = _project(base / mode, cfg)
    ctx = StageContext(cfg, root)
    start = time.perf_counter()
    fn = train_in_process if workers == 0 else train_with_ray
    summary = fn(ctx, root / "data" / cfg.data.dataset)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / RECORDS_FILE).read_text().splitlines()
               if line.strip()]
    loop_s = float(records[-1]["time_s"]) if records else float("nan")
    return {"bench": "ray_overhead", "mode": mode, "steps": summary["final_step"], "wall_s": round(wall, 2),
            "startup_s": round(summary["startup_seconds"], 2), "loop_s": round(loop_s, 2),
            "s_per_step": round(loop_s / max(summary["final_step"], 1), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=c (repeatable)")
    ap.add_argument("--modes", default="in_process,ray_1_worker",
                    help="which runs (comma-separated): in_process, ray_1_worker, ray_1_worker_nice0")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the modes this many times")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # stderr
    os.environ.pop("DVC_ROOT", None)  # each run keeps its folders in its own temporary project

    from unite_core.config import load_config

    cfg = load_config(ROOT / "params.yaml", [f"train.steps={args.steps}", "train.time_limit_minutes=null",
                                             "tracking.enabled=false", *args.overrides])
    results: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory(prefix="unite-ray-bench-") as tmp:
                result = {**_one(mode, cfg, Path(tmp)), "repeat": r}
            results.setdefault(mode, []).append(result)
            print(json.dumps(result), flush=True)
    if not {"in_process", "ray_1_worker"} <= set(results):
        return

    def median(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results[mode])

    summary = {"bench": "ray_overhead_summary", "steps": args.steps, "repeats": args.repeats}
    for key in ("loop_s", "wall_s", "startup_s"):
        summary[f"in_process_{key}"], summary[f"ray_{key}"] = median("in_process", key), median("ray_1_worker", key)
    summary["overhead_loop_pct"] = round(100 * (summary["ray_loop_s"] / summary["in_process_loop_s"] - 1), 1)
    summary["overhead_wall_pct"] = round(100 * (summary["ray_wall_s"] / summary["in_process_wall_s"] - 1), 1)
    if "ray_1_worker_nice0" in results:
        summary["ray_nice0_loop_s"] = median("ray_1_worker_nice0", "loop_s")
        summary["overhead_loop_nice0_pct"] = round(
            100 * (summary["ray_nice0_loop_s"] / summary["in_process_loop_s"] - 1), 1)
    summary["fixed_ray_cost_s"] = round(summary["ray_wall_s"] - summary["ray_loop_s"]
                                        - (summary["in_process_wall_s"] - summary["in_process_loop_s"]), 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
