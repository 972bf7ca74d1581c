"""MLflow tracking: one place that knows the tracking URI, run naming and nesting.

- The store defaults to `sqlite:///<project root>/mlflow.db` (an absolute URI, so Ray workers that
  change directory never create stray databases; under DVC the project root is DVC_ROOT, so queued
  experiments running in a temporary copy log to the real project); MLFLOW_TRACKING_URI overrides it (a remote
  `mlflow server`, or another database). Artifacts of a local store go to `<root>/mlartifacts`
  (absolute, set when the experiment is created), never to a `./mlruns` of whatever folder the
  process happens to run in.
- One pipeline run per parameter set: a parent run tagged `unite.pipeline=<params hash>` (named
  `pipeline-<DVC experiment name or hash>`); every stage (and every sweep trial) logs into a child
  run under it. Re-running a stage for the same parent creates a fresh child run and soft-deletes
  the previous one(s) (restorable in the UI), so each stage of a pipeline run is shown once and no
  metric is ever logged twice into one run.
- Only one process writes: the stage driver. Under Ray, rank 0 writes its per-step records to a
  file and the driver logs them after training. SQLite allows one writer at a time; every write is
  retried briefly on "database is locked" in case two drivers (say, two `unite` commands) overlap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

PIPELINE_TAG = "unite.pipeline"
STAGE_TAG = "unite.stage"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_LOCK_RETRIES = 8


def project_home(root: Path) -> Path:
    """Where the project's long-lived state lives (the MLflow store, Ray run folders).

    Under DVC that is DVC_ROOT, which DVC sets for every stage command; for `dvc exp run --queue/--temp`
    it points at the real project while the command runs in a temporary copy (whose files are thrown
    away), so queued experiments still land in the project's store. Elsewhere it is `root`.
    """
    return Path(os.environ.get("DVC_ROOT") or root).resolve()


def tracking_uri(root: Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(project_home(root) / 'mlflow.db').as_posix()}"


def artifact_root(root: Path, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local database, else the server's choice."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = Path(root).resolve() / db
        return (db.parent / "mlartifacts").as_uri()
    if uri.startswith("file:") or "://" not in uri:
        return None  # file store: artifacts live inside it
    return None  # a server (http, databricks, ...) decides


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def numeric_items(d: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers in a (nested) dict, flattened with dotted keys; bools and strings skipped."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(numeric_items(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _metric_key(k: str) -> str:
    return k.replace("/", "_")


def _retry(fn: Callable[[], T]) -> T:
    """Call fn, retrying on SQLite's 'database is locked' (another writer holds the lock)."""
    delay = 0.2
    for attempt in range(_LOCK_RETRIES):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow wraps the SQLAlchemy error in various types
            if "database is locked" not in str(exc) or attempt == _LOCK_RETRIES - 1:
                raise
            log.debug("MLflow store locked; retrying in %.1f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 3.0)
    raise AssertionError("unreachable")


class Tracker:
    """Logging API used by stages. `NullTracker` keeps the same API when tracking is off."""

    def __init__(self, run_id: str, client):
        self.run_id = run_id
        self.client = client

    def log_params(self, params: dict) -> None:
        flat = flatten(params)
        existing = _retry(lambda: self.client.get_run(self.run_id)).data.params
        fresh = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flat.items() if k not in existing}
        if fresh:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in fresh.items()]
            for i in range(0, len(items), 100):
                _retry(lambda chunk=items[i : i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numbers in `metrics` (nested dicts flattened; others ignored) at `step` (default 0)."""
        self.log_metric_history([{**metrics, "step": step or 0}])

    def log_metric_history(self, records: Iterable[dict], step_key: str = "step") -> None:
        """Per-step records ({'step': 25, 'loss': ...}, ...) in few batched calls."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for rec in records:
            step = int(rec.get(step_key) or 0)
            for k, v in numeric_items({k: v for k, v in rec.items() if k != step_key}).items():
                items.append(Metric(_metric_key(k), v, ts, step))
        for i in range(0, len(items), 1000):
            _retry(lambda chunk=items[i : i + 1000]: self.client.log_batch(self.run_id, metrics=chunk))

    def log_summary(self, metrics: dict) -> None:
        """Final numbers of a stage: logged once, skipping keys the run already has a history for."""
        existing = set(_retry(lambda: self.client.get_run(self.run_id)).data.metrics)
        fresh = {k: v for k, v in numeric_items(metrics).items() if _metric_key(k) not in existing}
        if fresh:
            self.log_metrics(fresh, step=0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_image(self, image, name: str) -> None:
        """image: PIL image or HxW(xC) uint8 array; stored as an artifact `images/<name>`."""
        _retry(lambda: self.client.log_image(self.run_id, image, artifact_file=f"images/{name}"))

    def log_dict(self, data: dict, name: str) -> None:
        _retry(lambda: self.client.log_dict(self.run_id, data, name))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            _retry(lambda: self.client.log_batch(self.run_id, tags=items))


class NullTracker(Tracker):
    def __init__(self):
        self.run_id = None
        self.client = None

    def log_params(self, params): ...
    def log_metrics(self, metrics, step=None): ...
    def log_metric_history(self, records, step_key="step"): ...
    def log_summary(self, metrics): ...
    def log_artifact(self, path, artifact_path=None): ...
    def log_image(self, image, name): ...
    def log_dict(self, data, name): ...
    def set_tags(self, tags): ...


def _quiet_mlflow_logs() -> None:
    # first use of a new SQLite store runs schema migrations that log at INFO
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client_for(root: Path):
    """An MlflowClient on the project's store.

    Deliberately not `mlflow.set_tracking_uri`: MLflow 3 exports that URI as MLFLOW_TRACKING_URI, which
    would then override the store of every later project root in this process (and its children).
    """
    _quiet_mlflow_logs()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(root))


def experiment_id(client, name: str, root: Path | None = None) -> str:
    exp = _retry(lambda: client.get_experiment_by_name(name))
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            _retry(lambda: client.restore_experiment(exp.experiment_id))
        return exp.experiment_id
    location = artifact_root(root or Path.cwd(), client.tracking_uri) if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by another process
        exp = _retry(lambda: client.get_experiment_by_name(name))
        if exp is None:
            raise
        return exp.experiment_id


def _query(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def _find(client, exp_id: str, tags: dict[str, str]) -> list:
    from mlflow.entities import ViewType

    return list(_retry(lambda: client.search_runs(
        [exp_id], filter_string=_query(tags), run_view_type=ViewType.ACTIVE_ONLY,
        max_results=100, order_by=["attributes.start_time DESC"],
    )))


def _parent_run(client, exp_id: str, key: str, params: dict) -> str:
    found = _find(client, exp_id, {PIPELINE_TAG: key})
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if parents:
        return parents[0].info.run_id
    dvc_exp = os.environ.get("DVC_EXP_NAME")
    tags = {PIPELINE_TAG: key}
    if dvc_exp:
        tags["unite.dvc_experiment"] = dvc_exp
    run = _retry(lambda: client.create_run(exp_id, run_name=f"pipeline-{dvc_exp or key}", tags=tags))
    Tracker(run.info.run_id, client).log_params(params)
    return run.info.run_id


def pipeline_run_name(params: dict) -> str:
    """Name of the parent run that stage_run(params=...) logs under."""
    return f"pipeline-{os.environ.get('DVC_EXP_NAME') or params_hash(params)}"


@contextmanager
def stage_run(
    root: Path, experiment: str, stage: str, params: dict, *, enabled: bool = True, extra_tags: dict | None = None
) -> Iterator[Tracker]:
    """A fresh child run `stage` under the pipeline parent run for these params (created on demand).

    Earlier child runs with the same stage (and extra tags) under that parent are soft-deleted once
    this one finishes, so the UI shows each stage once. The run is marked FINISHED on success and
    FAILED on an exception (which propagates); a failed run does not replace the previous good one.
    """
    if not enabled:
        yield NullTracker()
        return
    client = client_for(root)
    exp_id = experiment_id(client, experiment, root)
    key = params_hash(params)
    parent = _parent_run(client, exp_id, key, params)
    _retry(lambda: client.update_run(parent, status="RUNNING"))
    child_tags = {PIPELINE_TAG: key, STAGE_TAG: stage, **{k: str(v) for k, v in (extra_tags or {}).items()}}
    previous = [r.info.run_id for r in _find(client, exp_id, child_tags)
                if r.data.tags.get("mlflow.parentRunId") == parent]
    run = _retry(lambda: client.create_run(
        exp_id, run_name=stage, tags={**child_tags, "mlflow.parentRunId": parent}))
    tracker = Tracker(run.info.run_id, client)
    tracker.log_params(params)
    try:
        yield tracker
    except BaseException:
        _retry(lambda: client.set_terminated(run.info.run_id, "FAILED"))
        _retry(lambda: client.set_terminated(parent, "FAILED"))
        raise
    _retry(lambda: client.set_terminated(run.info.run_id, "FINISHED"))
    for old in previous:
        _retry(lambda old=old: client.delete_run(old))
    _retry(lambda: client.set_terminated(parent, "FINISHED"))


# names used before this module grew a public API
_client = client_for
_experiment_id = experiment_id
