"""Training runs: Ray Train (a TorchTrainer with N data-parallel workers) or in-process, one loop.

Both paths run unite_core's `Trainer` through unite_core.runs.run_session in the same run folder
`<root>/ray_results/<run name>/` (its format: unite_core/runs.py), so either path resumes the other's run.
Run name `unite-[<DVC experiment>-]<key>`, the key hashing Config.fingerprint() and the data's content
hash. A run whose newest checkpoint needs no more training is exported, not trained.

The driver follows metrics.jsonl (progress, live MLflow curve) and runs Ray's fit in a helper thread
(from the main thread Ray Train installs its own abort-everything SIGINT handler). Ray retries nothing;
`fit` refits from the newest checkpoint up to distributed.max_failures times after a dead worker, never
after the project's own errors. Workers load the prepared data themselves (DataLoader processes that
Ray's CPU accounting does not see: size distributed.cpus_per_worker for them) and report each checkpoint
with that step's validation numbers. RAY_ADDRESS joins a running cluster (project on shared storage at
the same path), else a local one of `distributed.num_cpus` logical CPUs is started.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from unite_core.inputs import check_prepared, load_prepared_data
from unite_core.io import atomic_write_text, fsync_tree
from unite_core.runs import (KEEP_CHECKPOINTS, RECORDS_FILE, STOP_FILE, CheckpointInfo, RecordFollower, checkpoint_meta,
                             crash_step_from_env, is_finished, keep_newest_checkpoints, latest_checkpoint,
                             meta_finished, preflight, read_meta, resume_from, run_key, run_session,
                             run_summary, start_from_init, train_in_folder, write_checkpoint_dir)

from .interrupt import GracefulStop, Interrupted, signal_name

log = logging.getLogger(__name__)

# Ray's unix sockets live below the temp dir: their paths must stay under 107 bytes. UNITE_RAY_TMPDIR
# names another one (two checkouts running local clusters side by side)
RAY_TEMP_DIR = os.environ.get("UNITE_RAY_TMPDIR") or f"/tmp/unite-ray-{os.getuid()}"


def run_name(cfg, data_hash: str = "") -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    safe = (re.sub(r"[^A-Za-z0-9_.-]+", "-", exp).strip("-")[:60] or "exp") + "-" if exp else ""
    return f"unite-{safe}{run_key(cfg, data_hash)}"


def _resume_newest(trainer, ray_checkpoint, resume_dir: str | None) -> dict | None:
    """Load the newer of Ray's checkpoint and `resume_dir` into the trainer; its meta, or None."""
    local = Path(resume_dir) if resume_dir and Path(resume_dir).is_dir() else None
    local_meta = read_meta(local) if local is not None else None
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:  # a local path, or a download from remote storage
            meta = read_meta(Path(folder))
            if meta is not None and (local_meta is None or meta["step"] >= local_meta["step"]):
                return resume_from(trainer, Path(folder))
    return resume_from(trainer, local) if local_meta is not None else None


# --- Ray worker (must live in the installed package: workers import it by name) ---
def ray_worker(config: dict) -> None:
    import ray.train
    import torch

    from unite_core.config import config_from_dict
    from unite_core.train import Trainer

    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    cfg = config_from_dict(config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config["use_gpu"]:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    run_dir = Path(config["run_dir"])
    data = load_prepared_data(cfg, Path(config["data_dir"]))
    trainer = Trainer(cfg, data.info, data.train, device, val_set=data.val if rank == 0 else None,
                      rank=rank, world_size=world)

    # resume: the newer of Ray's own latest checkpoint (a restart inside this fit) and the newest one
    # in the run folder that the driver found (an earlier, interrupted command)
    meta = _resume_newest(trainer, ray.train.get_checkpoint(), config.get("resume_dir"))
    if meta is not None:
        log.info("rank %d resumed at step %d", rank, trainer.step)
        if meta_finished(meta, cfg):
            return
    else:
        start_from_init(trainer, cfg)

    def save(final: bool) -> None:
        name = f"checkpoint_{trainer.step:08d}"
        with tempfile.TemporaryDirectory(prefix="unite-ckpt-") as tmp:
            checkpoint = None
            if rank == 0:
                write_checkpoint_dir(Path(tmp), trainer, checkpoint_meta(trainer, cfg, final, world))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            last = trainer.history[-1] if trainer.history else {}
            # the validation numbers of this step (eval_every divides checkpoint_every in a sweep: its
            # scheduler reads them from the report)
            vals = {k: v for k, v in last.items() if k.startswith("val_")} if last.get("step") == trainer.step else {}
            ray.train.report({"step": trainer.step, "final": final, "loss": last.get("loss"), **vals},
                             checkpoint=checkpoint, checkpoint_dir_name=name)
        if rank == 0 and (run_dir / name).is_dir():  # Ray copied it to local storage: make the copy durable
            fsync_tree(run_dir / name)

    stop_file = run_dir / STOP_FILE
    run_session(trainer, cfg, run_dir, save=save, rank=rank, world_size=world, crash_at=config.get("crash_at"),
                should_stop=stop_file.exists)


# --- Driver side ---
@contextmanager
def _following(rdir: Path, task, live, after_step: int = 0):
    """Follow the run's records while the block runs: progress from every new record (those up to
    `after_step` are a resumed run's history, rewritten at its start), live MLflow logging once per poll."""
    shown = after_step

    def on_record(record: dict) -> None:
        nonlocal shown
        if task is not None and record["step"] > shown:
            shown = record["step"]
            task.update(record["step"], **_progress_fields(record))
        if live is not None:
            live.add(record)

    follower = RecordFollower(rdir / RECORDS_FILE, on_record, after_poll=live.flush if live is not None else None)
    follower.start()
    try:
        yield
    finally:
        follower.stop()
        if live is not None:
            live.flush()


def _interrupted(stop: GracefulStop, name: str, rdir: Path, cfg) -> Interrupted:
    """The one line that ends an interrupted training command: where the checkpoint is, how to resume."""
    ckpt = latest_checkpoint(rdir)
    how = signal_name(stop.requested or 2)
    if ckpt is None:
        return Interrupted(f"training of {name} stopped by {how} before its first step; nothing to resume: run the "
                           "same command again to start it", stop.requested or 2)
    try:
        where = ckpt.path.relative_to(Path.cwd())
    except ValueError:
        where = ckpt.path
    return Interrupted(
        f"training stopped by {how} at step {ckpt.step} of {cfg.train.steps}; checkpoint saved in {where}: run the "
        "same command again (`unite train` or `dvc repro`, same params) to resume from it",
        stop.requested or 2,
    )


def _progress_fields(record: dict) -> dict:
    return {k: record[k] for k in ("loss", "val_psnr") if isinstance(record.get(k), (int, float))}


def local_num_cpus(cfg) -> int:
    d = cfg.distributed
    return d.num_cpus or max(4, math.ceil(d.num_workers * d.cpus_per_worker) + 2)


def ensure_ray(cfg, *, debug: bool = False, num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS or start a local cluster (`num_cpus` logical CPUs, default
    `local_num_cpus`); True if this call started Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a loaded 2-core machine can take over a minute to start a worker group (Ray's default: 60 s)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    import ray

    if ray.is_initialized():
        return False
    ray_logger = logging.getLogger("ray")
    if not debug:
        ray_logger.setLevel(logging.ERROR)
    kwargs: dict[str, Any] = dict(logging_level=logging.DEBUG if debug else logging.ERROR,
                                  log_to_driver=debug, include_dashboard=False)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        n = num_cpus or local_num_cpus(cfg)
        log.info("starting a local Ray cluster (%d logical CPUs, temp dir %s)", n, RAY_TEMP_DIR)
        ray.init(address="local", num_cpus=n, _temp_dir=RAY_TEMP_DIR, **kwargs)
    return True


def ray_use_gpu(cfg, cluster_gpus: float) -> bool:
    """Whether the Ray workers train on GPUs: distributed.use_gpu, or train.device=auto on a cluster
    with a GPU for every worker. train.device=cuda without distributed.use_gpu (the workers would get
    no GPU) and train.device=cpu with it (GPUs reserved, never used) are one-line errors."""
    from unite_core.train import TrainingError

    d, device = cfg.distributed, cfg.train.device
    if device == "cuda" and not d.use_gpu:
        raise TrainingError(
            "train.device=cuda but distributed.use_gpu=false: Ray would give the workers no GPU; set "
            "distributed.use_gpu=true (or train.device=auto, which uses the cluster's GPUs when it has them)"
        )
    if device == "cpu" and d.use_gpu:
        raise TrainingError(
            "train.device=cpu but distributed.use_gpu=true: each worker would hold a GPU it never uses; set "
            "distributed.use_gpu=false, or train.device=auto"
        )
    if d.use_gpu:
        return True
    return device == "auto" and d.num_workers > 0 and cluster_gpus >= d.num_workers


class ResourceError(RuntimeError):
    """The Ray cluster has fewer CPUs or GPUs than the workers the params ask for; the message names the fix."""


def check_resources(cfg, use_gpu: bool, have: dict, what: str = "workers", fix: str = "") -> None:
    """`have` (ray.cluster_resources()) holds distributed.num_workers x cpus_per_worker CPUs and, with
    `use_gpu`, a GPU per worker; else ResourceError (`fix`: one more way out, after the params')."""
    d = cfg.distributed
    need_cpu = d.num_workers * d.cpus_per_worker
    if have.get("CPU", 0) < need_cpu:
        raise ResourceError(
            f"the Ray cluster has {have.get('CPU', 0):g} CPUs but {d.num_workers} {what} x {d.cpus_per_worker:g} "
            f"CPUs need {need_cpu:g}: lower distributed.num_workers or distributed.cpus_per_worker, or raise "
            f"distributed.num_cpus{fix}")
    if use_gpu and have.get("GPU", 0) < d.num_workers:
        raise ResourceError(
            f"distributed.use_gpu=true with {d.num_workers} {what} needs {d.num_workers} GPUs but the Ray cluster "
            f"has {have.get('GPU', 0):g}: lower distributed.num_workers or set distributed.use_gpu=false{fix}")


def _worker_errors(exc: BaseException) -> list:
    return [getattr(e, "_base_exc", e) for _, e in sorted((getattr(exc, "worker_failures", None) or {}).items())]


def _unite_error_in(exc: BaseException) -> Exception | None:
    """The project's own error raised in a worker (bad data, non-finite loss, ...): deterministic, so never
    retried. None for anything else (a worker that died)."""
    return next((e for e in _worker_errors(exc)
                 if type(e).__module__.startswith("unite_core") and type(e).__name__.endswith("Error")), None)


def _user_error_from(exc: BaseException, cfg) -> Exception:
    """The unite error behind a Ray TrainingFailedError, or a one-line TrainingError."""
    from unite_core.train import TrainingError

    own = _unite_error_in(exc)
    if own is not None:
        return own
    cause = (_worker_errors(exc) or [getattr(exc, "controller_failure", None) or exc])[0]
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
    return TrainingError(
        f"Ray Train failed (distributed.max_failures={cfg.distributed.max_failures} retries used): "
        f"{type(cause).__name__}: {first}; rerun with --debug for the workers' logs"
    )


def _open_run(ctx, data_dir: Path, workers: int, t0: float):
    """(run name, run folder, newest checkpoint, the summary when that one needs no more training)."""
    cfg = ctx.cfg
    manifest = check_prepared(cfg, data_dir)
    preflight(cfg, manifest, workers)
    name = run_name(cfg, manifest.get("content_hash", ""))
    rdir = ctx.paths.ray_storage / name
    ckpt = latest_checkpoint(rdir)
    if not is_finished(ckpt, cfg):
        return name, rdir, ckpt, None
    log.info("run %s already finished at step %d (%s): exporting its final checkpoint, nothing is trained",
             name, ckpt.step, ckpt.path.name)
    return name, rdir, ckpt, run_summary(cfg, name, rdir, ckpt, workers=workers, t0=t0, trained_now=False)


def _run_fit_in_thread(fit: Callable[[], Any]):
    """Run Ray's blocking fit in a helper thread: called from the main thread, Ray Train V2's fit() installs a
    SIGINT handler that aborts at once (no checkpoint) and never restores ours. The main thread keeps the
    GracefulStop handlers and joins in short waits (signals are handled in between)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="unite-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def ray_trainer(cfg, *, data_dir: Path, run_dir: Path, resume: CheckpointInfo | None, use_gpu: bool,
                crash_at: int | None = None, callbacks: tuple = ()):
    """The TorchTrainer of one run (`unite train`, a sweep trial), stored in the run folder's parent. Ray
    retries nothing (it would retry a data error or a NaN loss as readily as a dead worker); `fit` does."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    return TorchTrainer(
        ray_worker,
        train_loop_config={"cfg": cfg.to_dict(), "data_dir": str(Path(data_dir).resolve()), "run_dir": str(run_dir),
                           "resume_dir": str(resume.path) if resume else None, "cpus_per_worker": d.cpus_per_worker,
                           "use_gpu": use_gpu, "crash_at": crash_at},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker}),
        run_config=RunConfig(storage_path=str(Path(run_dir).parent), name=Path(run_dir).name,
                             failure_config=FailureConfig(max_failures=0), callbacks=list(callbacks),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)),
    )


def fit(cfg, run_dir: Path, make_trainer: Callable[[CheckpointInfo | None], Any], *,
        resume: CheckpointInfo | None = None, stopped: Callable[[], bool] = lambda: False,
        run_fit: Callable[[Callable[[], Any]], Any] = lambda f: f()) -> None:
    """Fit `make_trainer(resume)`; after a worker that died or failed outside the project's code, refit from
    the newest checkpoint, up to distributed.max_failures times. The project's own errors are raised at once
    (a retry would repeat them); a failure after `stopped()` ends quietly (the stop request made it)."""
    from ray.train import TrainingFailedError

    max_failures, retries = cfg.distributed.max_failures, 0
    while True:
        try:
            run_fit(make_trainer(resume).fit)
            break
        except Exception as exc:
            if stopped():
                log.debug("Ray Train ended with %s after the stop request", type(exc).__name__, exc_info=True)
                break
            if not isinstance(exc, TrainingFailedError):
                raise
            own = _unite_error_in(exc)
            if own is not None:  # deterministic: the same params would fail the same way
                raise own from None
            if 0 <= max_failures <= retries:
                raise _user_error_from(exc, cfg) from None
            retries += 1
            resume = latest_checkpoint(run_dir)
            log.warning("a Ray worker failed (%s); retry %d of %s from %s", type(exc).__name__, retries,
                        max_failures if max_failures >= 0 else "unlimited",
                        f"the checkpoint at step {resume.step}" if resume else "the start")
    if retries:  # each refit's checkpoint manager knew only its own checkpoints: keep the newest overall
        keep_newest_checkpoints(run_dir)


def train_with_ray(ctx, data_dir: Path, live=None) -> dict:
    """Train through Ray Train; a summary (run name, final checkpoint folder, timings). `live`
    (pipelines.tracking.LiveMetrics) receives every record while training runs."""
    cfg, d, t0 = ctx.cfg, ctx.cfg.distributed, time.perf_counter()
    name, rdir, previous, done = _open_run(ctx, data_dir, d.num_workers, t0)
    if done is not None:
        return done
    if previous is not None:
        log.info("run %s: resuming from its checkpoint at step %d", name, previous.step)
    crash_at = crash_step_from_env()
    rdir.mkdir(parents=True, exist_ok=True)
    stop_file = rdir / STOP_FILE
    stop_file.unlink(missing_ok=True)

    started = ensure_ray(cfg, debug=ctx.debug)
    import ray  # after ensure_ray, which sets Ray's environment first

    try:
        have = ray.cluster_resources()
        use_gpu = ray_use_gpu(cfg, have.get("GPU", 0))
        check_resources(cfg, use_gpu, have, "training workers")
        startup_s = time.perf_counter() - t0
        with GracefulStop() as stop, \
                ctx.reporter.progress(f"train ({d.num_workers} Ray worker{'s' if d.num_workers > 1 else ''})",
                                      cfg.train.steps) as task, \
                _following(rdir, task, live, after_step=previous.step if previous else 0):
            stop.on_request(lambda: atomic_write_text(stop_file, f"stop requested by {signal_name(stop.requested)}\n",
                                                      fsync=False))
            try:
                fit(cfg, rdir, lambda resume: ray_trainer(cfg, data_dir=data_dir, run_dir=rdir, resume=resume,
                                                          use_gpu=use_gpu, crash_at=crash_at),
                    resume=previous, stopped=lambda: stop.requested is not None, run_fit=_run_fit_in_thread)
            finally:
                stop_file.unlink(missing_ok=True)
    finally:
        if started:
            ray.shutdown()
    ckpt = latest_checkpoint(rdir)
    if stop.requested is not None and not is_finished(ckpt, cfg):
        raise _interrupted(stop, name, rdir, cfg)
    if not is_finished(ckpt, cfg):
        from unite_core.train import TrainingError

        raise TrainingError(f"Ray Train returned without a final checkpoint in '{rdir}'; rerun to resume")
    return run_summary(cfg, name, rdir, ckpt, workers=d.num_workers, t0=t0, previous=previous, startup_s=startup_s)


def train_in_process(ctx, data_dir: Path, live=None) -> dict:
    """The same loop without Ray (distributed.num_workers=0): same run folder, checkpoints, resume."""
    import torch

    from unite_core.devices import resolve_device

    cfg, t0 = ctx.cfg, time.perf_counter()
    name, rdir, previous, done = _open_run(ctx, data_dir, 0, t0)
    if done is not None:
        return done
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_prepared_data(cfg, data_dir)
    if previous is not None:
        log.info("run %s: resuming from its checkpoint at step %d", name, previous.step)
    startup_s = time.perf_counter() - t0
    with GracefulStop() as stop, ctx.reporter.progress("train (in-process)", cfg.train.steps) as task, \
            _following(rdir, None, live):
        outcome = train_in_folder(cfg, data, rdir, resolve_device(cfg.train.device), resume=previous,
                                  should_stop=stop, on_record=lambda r: task.update(r["step"], **_progress_fields(r)))
    if outcome == "interrupted":
        raise _interrupted(stop, name, rdir, cfg)
    return run_summary(cfg, name, rdir, latest_checkpoint(rdir), workers=0, t0=t0, previous=previous,
                       startup_s=startup_s)
