"""A training run folder and the loop that trains in it, with or without a process group (plain PyTorch).

Folder: checkpoint_<step>/{state.pt, meta.json} (a folder without meta.json is incomplete and ignored; the
newest KEEP_CHECKPOINTS are kept), metrics.jsonl (rank 0's records, rewritten on resume), stop_requested
(a stop asked by the driver). `run_session` trains a (resumed) Trainer to train.steps: time budget counted
across resumes, a stop request agreed by all ranks before the next step, checkpoints through a `save`
callback (a plain folder in-process, a Ray Train checkpoint on a worker); `train_in_folder` is the
in-process run, pipelines/distributed.py runs it on Ray Train workers. Test-only: UNITE_TEST_CRASH_AT_STEP=N makes rank 0 exit after step N,
once per run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .io import atomic_dir, atomic_torch_save, atomic_write_json, atomic_write_text
from .train import CheckpointError, Trainer, TrainingError, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
RECORDS_FILE = "metrics.jsonl"
STOP_FILE = "stop_requested"
CRASH_MARKER = ".unite_crash_injected"
CRASH_ENV = "UNITE_TEST_CRASH_AT_STEP"
KEEP_CHECKPOINTS = 2
# record keys that are already global (or rank-local by nature) and are not averaged over ranks
_NOT_AVERAGED = {"step", "time_s", "lr", "grad_norm", "samples_per_s"}


def run_key(cfg, data_hash: str = "") -> str:
    """12 hex digits: the model-defining settings (Config.fingerprint) and the data's content hash."""
    fp = cfg.fingerprint()
    if not data_hash:
        return fp
    return hashlib.sha256(f"{fp}:{data_hash}".encode()).hexdigest()[:12]


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    final: bool
    meta: dict


def read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints (state and meta present) in a run folder, oldest first."""
    found = []
    for d in Path(run_dir).glob("checkpoint_*"):
        meta = read_meta(d) if (d / STATE_FILE).is_file() else None
        if meta is None:
            continue
        found.append(CheckpointInfo(d, int(meta.get("step", -1)), bool(meta.get("final")), meta))
    return sorted(found, key=lambda c: (c.step, c.final, c.path.stat().st_mtime))


def latest_checkpoint(run_dir: Path) -> CheckpointInfo | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def meta_finished(meta: dict | None, cfg) -> bool:
    """True when a checkpoint needs no more training under `cfg`: all train.steps done, or stopped by
    the time limit with the current train.time_limit_minutes used up (a raised or removed limit
    lets the run go on; the limit is not part of the run's key)."""
    if meta is None:
        return False
    if int(meta.get("step", -1)) >= cfg.train.steps:
        return True
    if meta.get("final") and meta.get("stopped_early"):
        limit = cfg.train.time_limit_minutes
        return limit is not None and float(meta.get("train_seconds", 0.0)) >= limit * 60.0 - 1e-6
    return False


def is_finished(ckpt: CheckpointInfo | None, cfg) -> bool:
    return ckpt is not None and meta_finished(ckpt.meta, cfg)


def checkpoint_meta(trainer, cfg, final: bool, world_size: int) -> dict:
    history = trainer.history
    return {"step": int(trainer.step), "final": bool(final), "steps_requested": int(cfg.train.steps),
            "stopped_early": bool(final and trainer.step < cfg.train.steps),
            "train_seconds": float(history[-1]["time_s"]) if history else 0.0, "world_size": int(world_size),
            "fingerprint": cfg.fingerprint()}


def write_checkpoint_dir(folder: Path, trainer, meta: dict) -> Path:
    """state.pt then meta.json, each written atomically and fsynced (a folder without meta.json is
    ignored as incomplete)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(trainer.state_dict(), folder / STATE_FILE)
    atomic_write_json(folder / META_FILE, meta)
    return folder


def read_state(ckpt_dir: Path) -> dict:
    try:
        return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint '{ckpt_dir}' is unreadable ({type(exc).__name__}): delete that folder to resume from "
            "the one before it"
        ) from None


def export_checkpoint(ckpt_dir: Path, dest: Path) -> dict:
    """The checkpoint as the model file, without the optimiser state (it stays in the run folder)."""
    state = read_state(ckpt_dir)
    slim = {k: v for k, v in state.items() if k != "optimizers"}
    save_checkpoint(dest, slim)
    return slim


def run_summary(cfg, name: str, run_dir: Path, ckpt: CheckpointInfo, *, workers: int, t0: float,
                previous: CheckpointInfo | None = None, startup_s: float = 0.0, trained_now: bool = True) -> dict:
    """What a training command returns of its run: the final checkpoint folder and timings (t0: the command's
    time.perf_counter() at its start; previous: the checkpoint it resumed from)."""
    return {"run_name": name, "run_dir": str(run_dir), "checkpoint_dir": str(ckpt.path), "final_step": ckpt.step,
            "steps_requested": cfg.train.steps,
            "stopped_early": bool(ckpt.meta.get("stopped_early", ckpt.step < cfg.train.steps)),
            "train_seconds": float(ckpt.meta.get("train_seconds", 0.0)), "trained_now": trained_now,
            "resumed_from": previous.step if previous else None, "workers": workers,
            "wall_seconds": time.perf_counter() - t0, "startup_seconds": startup_s}


CURVE_COLUMNS = ("step", "time_s", "loss", "recon", "flow", "lr", "val_psnr")  # first in the curve CSV


def curve_columns(history: list[dict]) -> list[str]:
    """The training curve's columns: CURVE_COLUMNS present, then every other key in first-seen order."""
    return list(dict.fromkeys([k for k in CURVE_COLUMNS if any(k in r for r in history)]
                              + [k for r in history for k in r]))


def training_metrics(history: list[dict], summary: dict, batch_size: int) -> dict:
    """A finished run's numbers (metrics/train.json): final and tail-averaged losses, steps, speed, the last
    validation record; `summary` is the run's (final_step, steps_requested, train_seconds, ...)."""
    last = history[-1] if history else {}
    evals = [r for r in history if any(k.startswith("val_") for k in r)]
    tail = history[-max(1, len(history) // 10):] if history else []
    losses = [r["loss"] for r in tail if isinstance(r.get("loss"), (int, float))]
    seconds = float(summary["train_seconds"]) or float(last.get("time_s", 0.0))
    metrics = {
        "final_loss": last.get("loss"), "final_loss_avg": sum(losses) / len(losses) if losses else None,
        "final_recon": last.get("recon"), "final_flow": last.get("flow"), "steps": int(summary["final_step"]),
        "steps_requested": int(summary["steps_requested"]), "stopped_early": bool(summary["stopped_early"]),
        "seconds": round(seconds, 3),
        "samples_per_s": round(summary["final_step"] * batch_size / seconds, 2) if seconds > 0 else None,
        "wall_seconds": round(float(summary["wall_seconds"]), 3),
        "startup_seconds": round(float(summary.get("startup_seconds", 0.0)), 3), "workers": int(summary["workers"]),
        "trained_now": bool(summary["trained_now"]), "run_name": summary["run_name"],
    }
    if evals:
        metrics.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
    return metrics


def preflight(cfg, manifest: dict, workers: int) -> None:
    """Settings errors that would otherwise surface inside every (retried) worker."""
    t = cfg.train
    world = max(1, workers)
    if t.batch_size % (world * t.grad_accum):
        raise TrainingError(
            f"train.batch_size={t.batch_size} must be divisible by distributed.num_workers x train.grad_accum = "
            f"{world} x {t.grad_accum}: change one of them"
        )
    n = int(manifest.get("info", manifest).get("num_train", 0))
    if n and t.batch_size > n:
        raise TrainingError(f"train.batch_size={t.batch_size} exceeds the {n} training samples: lower train.batch_size")


def _average_over_ranks(record: dict, world_size: int, device) -> None:
    """Average a record's rank-local training metrics in place (one all-reduce on the training device)."""
    keys = sorted(k for k, v in record.items()
                  if k not in _NOT_AVERAGED and not k.startswith("val_") and isinstance(v, (int, float)))
    vals = torch.tensor([float(record[k]) for k in keys], dtype=torch.float32, device=device)
    dist.all_reduce(vals)
    for i, k in enumerate(keys):
        record[k] = float(vals[i]) / world_size


def _write_records(path: Path, history: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history), fsync=False)


def run_session(
    trainer,
    cfg,
    run_dir: Path,
    *,
    save: Callable[[bool], None],
    rank: int = 0,
    world_size: int = 1,
    crash_at: int | None = None,
    on_record: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """Train a (resumed) Trainer to train.steps; "finished", "stopped_early" (train.time_limit_minutes,
    counted across resumes, used up) or "interrupted" (`should_stop`, read on rank 0 before every step and
    agreed by all ranks; the steps done are checkpointed). `save(final)` runs on every rank at the same
    steps. Records get cumulative time_s and, with several ranks, metrics averaged over the global batch."""
    t = cfg.train
    until = t.steps
    history = trainer.history
    offset = float(history[-1]["time_s"]) if history else 0.0
    budget = t.time_limit_minutes * 60.0 - offset if t.time_limit_minutes else None
    records = Path(run_dir) / RECORDS_FILE
    if rank == 0:
        _write_records(records, history)
        if crash_at is not None:
            _arm_crash(trainer, crash_at, Path(run_dir) / CRASH_MARKER)

    def on_log(step: int, record: dict) -> None:
        record["time_s"] = round(float(record["time_s"]) + offset, 3)
        if world_size > 1:
            _average_over_ranks(record, world_size, trainer.device)
        if rank == 0:
            with open(records, "a") as f:
                f.write(json.dumps(record) + "\n")
            if on_record is not None:
                on_record(record)

    saved_step = trainer.step  # a resumed step has its checkpoint already

    def on_checkpoint(step: int, final: bool) -> None:
        nonlocal saved_step
        save(final)
        saved_step = step

    if trainer.step >= until:
        return "finished"
    if should_stop is not None:
        _arm_stop(trainer, should_stop if rank == 0 else (lambda: False), world_size)
    try:
        result = trainer.run(until, on_log=on_log, on_checkpoint=on_checkpoint, time_limit_s=budget)
    except _StopRequested:
        if trainer.step > saved_step:
            save(False)
        log.debug("stop requested: rank %d stopped at step %d of %d with a checkpoint", rank, trainer.step, until)
        return "interrupted"
    if result.stopped_early:
        log.info("train.time_limit_minutes=%s used up at step %d of %d: stopped with a final checkpoint",
                 t.time_limit_minutes, trainer.step, until)
        return "stopped_early"
    return "finished"


def train_in_folder(cfg, data, run_dir: Path, device, *, resume: CheckpointInfo | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    on_record: Callable[[dict], None] | None = None) -> str:
    """The loop in this process (no process group): a Trainer resumed from `resume` (else from
    train.init_from or its seed), checkpoints as plain folders of `run_dir` (the newest KEEP_CHECKPOINTS
    kept); run_session's outcome."""
    trainer = Trainer(cfg, data.info, data.train, device, val_set=data.val)
    if resume is not None:
        resume_from(trainer, resume.path)
    else:
        start_from_init(trainer, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    def save(final: bool) -> None:
        with atomic_dir(run_dir / f"checkpoint_{trainer.step:08d}") as tmp:
            write_checkpoint_dir(tmp, trainer, checkpoint_meta(trainer, cfg, final, 1))
        keep_newest_checkpoints(run_dir)

    return run_session(trainer, cfg, run_dir, save=save, should_stop=should_stop, on_record=on_record)


class _StopRequested(Exception):
    """Raised before a training step once a stop was requested (caught in run_session)."""


def _arm_stop(trainer, should_stop: Callable[[], bool], world_size: int) -> None:
    """Check for a stop request before every step; with several ranks they agree (MAX all-reduce on
    the training device: NCCL reduces device tensors only), so all stop at the same step."""
    train_step = trainer.train_step

    def checked_step():
        stop = bool(should_stop())
        if world_size > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=trainer.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            raise _StopRequested()
        return train_step()

    trainer.train_step = checked_step


def _arm_crash(trainer, step: int, marker: Path) -> None:
    """Test-only fault injection: exit the process right after `step`, once per run folder."""
    if marker.exists():
        return
    train_step = trainer.train_step

    def crashing_step():
        out = train_step()
        if trainer.step == step and not marker.exists():
            marker.write_text(f"crashed at step {step}\n")
            log.warning("%s=%d: rank 0 exits now (test-only fault injection)", CRASH_ENV, step)
            os._exit(1)
        return out

    trainer.train_step = crashing_step


def crash_step_from_env() -> int | None:
    raw = os.environ.get(CRASH_ENV)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise TrainingError(f"{CRASH_ENV}={raw!r} must be a step number (test-only variable; unset it)") from None


def resume_from(trainer, ckpt_dir: Path) -> dict:
    """Load a complete checkpoint folder (list_checkpoints found its meta) into the trainer; its meta."""
    trainer.load_state_dict(read_state(ckpt_dir))
    return read_meta(ckpt_dir) or {}


def start_from_init(trainer, cfg) -> None:
    """train.init_from: a run without checkpoints of its own starts from that checkpoint's state."""
    if cfg.train.init_from:
        trainer.load_state_dict(load_checkpoint(cfg.train.init_from, cfg))
        log.info("started from %s at step %d (train.init_from)", cfg.train.init_from, trainer.step)


class RecordFollower(threading.Thread):
    """Tails metrics.jsonl (rewritten on resume) into a callback; `after_poll` runs after each poll that
    found records (the live MLflow logging, one batch per poll)."""

    def __init__(self, path: Path, callback: Callable[[dict], None], interval: float = 1.0,
                 after_poll: Callable[[], None] | None = None):
        super().__init__(daemon=True, name="unite-record-follower")
        self.path, self.callback, self.interval, self.after_poll = path, callback, interval, after_poll
        self._halt = threading.Event()
        self._pos, self._inode, self._buf = 0, None, ""

    def poll(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if st.st_ino != self._inode or st.st_size < self._pos:
            self._inode, self._pos, self._buf = st.st_ino, 0, ""
        if st.st_size == self._pos:
            return
        with open(self.path) as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos = f.tell()
        lines = (self._buf + chunk).split("\n")
        self._buf = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    self.callback(json.loads(line))
                except ValueError:
                    continue
                except Exception:  # noqa: BLE001 - a display problem must not stop training
                    log.debug("progress callback failed", exc_info=True)
        if self.after_poll is not None:
            try:
                self.after_poll()
            except Exception:  # noqa: BLE001 - tracking problems are reported by the tracker itself
                log.debug("after-poll callback failed", exc_info=True)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        self.poll()


def keep_newest_checkpoints(rdir: Path) -> None:
    for old in list_checkpoints(rdir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old.path, ignore_errors=True)


