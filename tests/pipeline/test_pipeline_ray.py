"""Training through Ray Train: data parallelism, recovery from a dead worker, finished runs.

All runs use the digits_tiny preset (8x8 digits, a 0.24M-parameter model, fp32, 30 steps) on one Ray
cluster shared by the test session (tests/ray_fixtures.py). One Ray run covers both data parallelism
and recovery (each Ray run costs ~30-60 s of worker start-up on a 2-core machine).
"""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

from pipelines.distributed import run_name
from unite_core.runs import CRASH_MARKER, RECORDS_FILE
from pipelines.stages import execute
from tests.ray_fixtures import (active_runs, mlflow_client, ray_cluster, read_json, run_unite,  # noqa: F401
                                tiny_params, write_params)
from unite_core.config import config_from_dict

pytestmark = pytest.mark.slow

STEPS = 30
TRAIN = {"steps": STEPS, "batch_size": 32, "log_every": 5, "eval_every": 15, "checkpoint_every": 10,
         "warmup_steps": 5, "threads": 1, "time_limit_minutes": None}


def make_project(root, workers: int):
    params = tiny_params(train=TRAIN, distributed={"num_workers": workers, "max_failures": 2})
    write_params(root, params)
    cfg = config_from_dict(params)
    execute("prepare", cfg, root)
    return cfg


def metric_history(root, key: str = "loss", run_id=None) -> dict[int, float]:
    """{step: value} of a metric of the (only) active train run in root's MLflow store."""
    client = mlflow_client(root)
    if run_id is None:
        (run,) = active_runs(root, stage="train")
        run_id = run.info.run_id
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plain in-process loop (distributed.num_workers=0) on the same params and data."""
    root = tmp_path_factory.mktemp("reference")
    cfg = make_project(root, workers=0)
    t0 = time.perf_counter()
    metrics = execute("train", cfg, root)
    return {"root": root, "cfg": cfg, "metrics": metrics, "wall": time.perf_counter() - t0,
            "losses": metric_history(root)}


def fixed_batch_loss(checkpoint_path, cfg) -> tuple[float, float]:
    """The training objective of the final weights on one fixed batch with fixed noise (train mode):
    (total, reconstruction part)."""
    from unite_core.data import load_image_data
    from unite_core.train import fetch, load_checkpoint, model_from_checkpoint

    state = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(state, use_ema=False).train()
    data = load_image_data(cfg.data)
    batch = fetch(data.val, torch.arange(128))
    with torch.no_grad():
        loss, parts = model.compute_loss(batch, torch.Generator().manual_seed(123))
    return float(loss), float(parts["recon"])


def test_two_ray_workers_survive_a_crash_and_train_like_the_single_process_loop(ray_cluster, reference, tmp_path):
    """`unite train` joins the session's cluster (RAY_ADDRESS) with 2 workers; rank 0 dies right
    after step 17; the driver (not Ray: a dead worker is not the project's error) starts a new worker
    group, which resumes from the step-10 checkpoint and finishes all 30 steps: one MLflow run, each step logged once, the numbers of a healthy run."""
    root = tmp_path / "two_workers"
    cfg = make_project(root, workers=2)
    t0 = time.perf_counter()
    proc = run_unite(["train"], cwd=root, RAY_ADDRESS=ray_cluster, UNITE_TEST_CRASH_AT_STEP="17")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    rdir = root / "ray_results" / run_name(cfg, read_json(root / "metrics" / "prepare.json")["content_hash"])
    assert (rdir / CRASH_MARKER).read_text().startswith("crashed at step 17")
    metrics = read_json(root / "metrics" / "train.json")
    assert metrics["steps"] == STEPS and metrics["trained_now"] and metrics["workers"] == 2
    assert (root / "models" / "unite.pt").is_file()
    ckpts = sorted(p.name for p in rdir.glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_00000020", "checkpoint_00000030"]  # every 10 steps, num_to_keep=2
    # the per-step file holds each step once (rewritten from the step-10 checkpoint on resume)
    steps = [json.loads(line)["step"] for line in (rdir / RECORDS_FILE).read_text().splitlines()]
    assert steps == list(range(5, STEPS + 1, 5))
    runs = active_runs(root, stage="train")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    losses = metric_history(root, "loss", runs[0].info.run_id)
    assert sorted(losses) == list(range(5, STEPS + 1, 5))  # one value per logged step, none twice

    # Both runs average the gradient over the same 32-image batches in the same order (a resumed run
    # replays exactly what the uninterrupted one would have done). They differ in the random draws
    # (noise, timesteps, label dropout): each rank draws its half of the batch from its own stream,
    # seeded by (seed, step, rank), while the single process draws the whole batch from rank 0's
    # stream; and (negligibly) in the float summation order of the all-reduce. So they are two samples
    # of the same stochastic training, not the same numbers:
    # - the loss of the final weights on a fixed batch with fixed noise agrees within 6% (measured
    #   1-2% before the latent-collapse fixes, 3.2% after: the latents now carry per-image signal,
    #   so the two stochastic runs part more);
    # - training moved the reconstruction part far more than that: the first logged reconstruction
    #   loss is over 1.3x the final weights' on the fixed batch (measured 0.423 vs 0.290 and 0.290,
    #   while the two runs' fixed-batch losses agree within 0.1%). With the authors' zero-initialised
    #   GE output (the preset's schema default) the latents of 30 steps barely differ between images,
    #   so the flow term is near zero and the total is almost all reconstruction;
    # - the reconstruction loss (low-variance: an error over every pixel) agrees within 5% at every
    #   logged step (measured <= 2%); the total loss, whose flow part is a noisy estimate from 3 x 32
    #   timestep draws, agrees within 10% at the end (measured ~1.5%).
    ref, ref_recon = fixed_batch_loss(reference["root"] / "models" / "unite.pt", cfg)
    two, two_recon = fixed_batch_loss(root / "models" / "unite.pt", cfg)
    first_recon = metric_history(reference["root"], "recon")[5]
    print(f"fixed-batch loss: 1 process {ref:.5f} (recon {ref_recon:.5f}), 2 Ray workers {two:.5f} "
          f"(recon {two_recon:.5f}); first logged recon {first_recon:.4f}; "
          f"`unite train` with a crash and a restart took {wall:.1f} s")
    assert two == pytest.approx(ref, rel=0.06)
    assert first_recon > 1.3 * max(ref_recon, two_recon)
    ours = metric_history(root, "recon")
    theirs = metric_history(reference["root"], "recon")
    assert sorted(ours) == sorted(theirs) == list(range(5, STEPS + 1, 5))
    for step, value in theirs.items():
        assert ours[step] == pytest.approx(value, rel=0.05), step
    assert metrics["final_loss"] == pytest.approx(reference["metrics"]["final_loss"], rel=0.10)
    assert metrics["val_psnr"] == pytest.approx(reference["metrics"]["val_psnr"], abs=0.5)

    # the same params again: the finished run is exported, not trained, and Ray is not started
    t0 = time.perf_counter()
    again = execute("train", cfg, root)
    assert again["trained_now"] is False and again["steps"] == STEPS
    assert time.perf_counter() - t0 < 60
    runs = active_runs(root, stage="train")
    assert len(runs) == 1 and runs[0].data.tags["unite.trained_now"] == "false"
    assert math.isfinite(metrics["final_loss"])


def test_an_interrupted_run_resumes_to_the_same_numbers(reference, tmp_path):
    """In-process: drop the final checkpoint of a finished run, train again: it resumes from step 20
    and ends with exactly the history of the uninterrupted run (same data order, same random draws)."""
    root = tmp_path / "resume"
    cfg = make_project(root, workers=0)
    name = reference["metrics"]["run_name"]  # the same params and data: the same run
    rdir = root / "ray_results" / name
    shutil.copytree(reference["root"] / "ray_results" / name, rdir)
    shutil.rmtree(rdir / "checkpoint_00000030")
    metrics = execute("train", cfg, root)
    assert metrics["trained_now"] and metrics["steps"] == STEPS
    assert metric_history(root) == reference["losses"]  # bit for bit
    steps = [json.loads(line)["step"] for line in (rdir / RECORDS_FILE).read_text().splitlines()]
    assert steps == list(range(5, STEPS + 1, 5))


def test_a_deterministic_failure_in_a_worker_is_not_retried(ray_cluster, tmp_path):
    """A worker's own error (here train.init_from names a file that is no checkpoint) ends the run at
    once with that error's message: distributed.max_failures=2 retries only workers that died."""
    root = tmp_path / "bad_init"
    params = tiny_params(train=dict(TRAIN, init_from=str(tmp_path / "not_a_checkpoint.pt")),
                         distributed={"num_workers": 1, "max_failures": 2})
    (tmp_path / "not_a_checkpoint.pt").write_text("these are not weights\n")
    write_params(root, params)
    execute("prepare", config_from_dict(params), root)
    proc = run_unite(["train"], cwd=root, RAY_ADDRESS=ray_cluster)
    assert proc.returncode != 0
    assert "not_a_checkpoint.pt" in proc.stderr, proc.stderr[-2000:]
    assert "retry" not in proc.stderr and "Ray Train failed" not in proc.stderr, proc.stderr[-2000:]
