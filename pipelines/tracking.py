"""MLflow tracking: the one place that knows the store, run naming and run nesting.
Over 500 lines because the store, run nesting and MLflow model logging share the one retrying client.

Store `sqlite:///<project home>/mlflow.db` (DVC_ROOT under DVC, so queued experiments log to the real
project), artifacts in mlartifacts/ beside it; MLFLOW_TRACKING_URI overrides. One parent run per params
hash (`pipeline-<DVC experiment or hash>`), a fresh child run per stage (`stage_run`; the previous one is
soft-deleted once it succeeds), sweep trials as child runs of the sweep's. Only the driver writes; a locked
store is retried, a failing one costs one warning and the stage goes on untracked (`StoreHealth`;
tracking.strict=true raises TrackingError). Runs carry the git commit and the params hash.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from unite_core.io import stable_hash

log = logging.getLogger(__name__)

# off by default, before mlflow is imported; a user turns it on with MLFLOW_DISABLE_TELEMETRY=false
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

T = TypeVar("T")

PIPELINE_TAG = "unite.pipeline"
STAGE_TAG = "unite.stage"
PARAMS_HASH_TAG = "unite.params_hash"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
MODEL_NAME = "model"  # the MLflow model of a train run
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_LOCK_RETRIES = 8
_REACH_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """The MLflow store failed and tracking.strict=true asked to stop; the message names store and fix."""


def project_home(root: Path) -> Path:
    """Where the long-lived state lives (MLflow store, Ray run folders): DVC_ROOT under DVC (for `dvc exp run
    --queue/--temp` the real project, not the temporary copy the command runs in), else `root`."""
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
    return None  # a file store keeps them inside; a server decides


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
    return {k: float(v) for k, v in flatten(d, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def params_hash(params: dict) -> str:
    return stable_hash(params, 12)


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


class StoreHealth:
    """The store state the trackers of one stage share: not strict, the first failure logs one warning and
    later calls do nothing (untracked); strict, every failure raises TrackingError."""

    def __init__(self, uri: str, strict: bool = False, stage: str = ""):
        self.uri, self.strict, self.stage = uri, strict, stage
        self.failed = False

    def fail(self, exc: BaseException, doing: str) -> None:
        reason = _one_line(exc)
        if self.strict:
            raise TrackingError(
                f"MLflow store {self.uri} failed while {doing} ({reason}); tracking.strict=true stops here: "
                "fix or move the store (MLFLOW_TRACKING_URI), or set tracking.strict=false to run untracked"
            ) from None
        if not self.failed:
            what = f"the {self.stage} stage" if self.stage else "this stage"
            log.warning("MLflow store %s failed while %s (%s): %s goes on untracked; its metrics are still "
                        "written to metrics/*.json (tracking.strict=true makes this an error)",
                        self.uri, doing, reason, what)
        self.failed = True

    def call(self, fn: Callable[[], T], doing: str, retry: bool = True) -> T | None:
        if self.failed:
            return None
        try:
            return _retry(fn) if retry else fn()
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a broken store
            self.fail(exc, doing)
            return None


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:240]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Tracker:
    """Logging API of the stages (`NullTracker` when tracking is off); failures go to `health`."""

    def __init__(self, run_id: str, client, health: StoreHealth | None = None):
        self.run_id = run_id
        self.client = client
        self.health = health or StoreHealth(getattr(client, "tracking_uri", "?"))

    @property
    def active(self) -> bool:
        return not self.health.failed

    def _call(self, fn: Callable[[], T], doing: str) -> T | None:
        return self.health.call(fn, doing)

    def log_params(self, params: dict) -> None:
        flat = flatten(params)
        run = self._call(lambda: self.client.get_run(self.run_id), "reading the run's params")
        if run is None:
            return
        existing = run.data.params
        fresh = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flat.items() if k not in existing}
        if fresh:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in fresh.items()]
            for i in range(0, len(items), 100):
                self._call(lambda chunk=items[i : i + 100]: self.client.log_batch(self.run_id, params=chunk),
                           "logging params")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numbers in `metrics` (nested dicts flattened; others ignored) at `step` (default 0)."""
        self.log_metric_history([{**metrics, "step": step or 0}])

    def log_metric_history(self, records: Iterable[dict], step_key: str = "step") -> None:
        """Per-step records ({'step': 25, 'loss': ...}, ...) in few batched calls."""
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for rec in records:
            step = int(rec.get(step_key) or 0)
            for k, v in numeric_items({k: v for k, v in rec.items() if k != step_key}).items():
                items.append(Metric(_metric_key(k), v, ts, step))
        for i in range(0, len(items), 1000):
            self._call(lambda chunk=items[i : i + 1000]: self.client.log_batch(self.run_id, metrics=chunk),
                       "logging metrics")

    def log_summary(self, metrics: dict) -> None:
        """Final numbers of a stage: logged once, skipping keys the run already has a history for."""
        run = self._call(lambda: self.client.get_run(self.run_id), "reading the run's metrics")
        if run is None:
            return
        existing = set(run.data.metrics)
        fresh = {k: v for k, v in numeric_items(metrics).items() if _metric_key(k) not in existing}
        if fresh:
            self.log_metrics(fresh, step=0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), "storing an artifact")

    def log_image(self, image, name: str) -> None:
        """image: PIL image or HxW(xC) uint8 array; stored as an artifact `images/<name>`."""
        self._call(lambda: self.client.log_image(self.run_id, image, artifact_file=f"images/{name}"),
                   "storing an image")

    def log_dict(self, data: dict, name: str) -> None:
        self._call(lambda: self.client.log_dict(self.run_id, data, name), "storing a file")

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self._call(lambda: self.client.log_batch(self.run_id, tags=items), "setting tags")

    def log_generator_model(self, state: dict, step: int = 0) -> str | None:
        """The checkpoint's EMA model as this run's MLflow model (see `GeneratorModel`); its model id."""
        # not retried as a whole: a retry after a partial write would log a second model
        return self.health.call(lambda: log_generator_model(self.client, self.run_id, state, step=step),
                                "logging the MLflow model", retry=False)

    # --- child runs of this run (sweep trials; stage runs are nested by `stage_run`) -------------
    def children(self, tags: dict[str, str]) -> list:
        """Active runs of this run's experiment with `tags`, newest first, whatever their parent."""
        run = self._call(lambda: self.client.get_run(self.run_id), "reading the run")
        found = run and self._call(lambda: _find(self.client, run.info.experiment_id, tags, 1000), "searching runs")
        return list(found or [])

    def child(self, run=None, *, name: str = "", tags: dict[str, str] | None = None) -> "Tracker":
        """A tracker on `run` (one of `children`, re-parented under this run if needed), or on a new
        child run `name` with `tags`."""
        if run is None:
            parent = self._call(lambda: self.client.get_run(self.run_id), "reading the run")
            run = parent and self._call(lambda: self.client.create_run(
                parent.info.experiment_id, run_name=name, tags={**(tags or {}), "mlflow.parentRunId": self.run_id}),
                "creating a run")
            if not run:
                return NullTracker()
        elif run.data.tags.get("mlflow.parentRunId") != self.run_id:
            self._call(lambda: self.client.set_tag(run.info.run_id, "mlflow.parentRunId", self.run_id),
                       "re-parenting a run")
        return Tracker(run.info.run_id, self.client, self.health)

    def retire(self, run_id: str) -> None:
        """Soft-delete another run (restorable in the UI)."""
        self._call(lambda: self.client.delete_run(run_id), "retiring a run")

    def set_status(self, status: str) -> None:
        """RUNNING, or the end state: FINISHED, FAILED, KILLED."""
        if status == "RUNNING":
            self._call(lambda: self.client.update_run(self.run_id, status=status), "updating the run")
        else:
            self._call(lambda: self.client.set_terminated(self.run_id, status), "ending the run")


class NullTracker(Tracker):
    """Tracking off, or a store that could not be opened: a tracker whose every call does nothing."""

    def __init__(self):
        super().__init__(None, None, StoreHealth("none"))
        self.health.failed = True


class LiveMetrics:
    """Per-step training records logged while training runs, each step once (the records file is rewritten
    from a checkpoint on a restart); `flush` logs what arrived since the last call in one batch."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.logged: set[int] = set()
        self.pending: dict[int, dict] = {}
        self._lock = threading.Lock()

    def add(self, record: dict) -> None:
        step = int(record.get("step", 0))
        with self._lock:
            if step not in self.logged:
                self.pending[step] = record

    def flush(self) -> None:
        with self._lock:
            batch = [self.pending[s] for s in sorted(self.pending)]
            self.pending.clear()
        if not batch or not self.tracker.active:
            return
        self.tracker.log_metric_history(batch)
        with self._lock:
            self.logged.update(int(r.get("step", 0)) for r in batch)

    def missing(self, history: Iterable[dict]) -> list[dict]:
        """The records of `history` not logged yet."""
        with self._lock:
            return [r for r in history if int(r.get("step", 0)) not in self.logged]


def client_for(root: Path):
    """An MlflowClient on the project's store (not `mlflow.set_tracking_uri`: MLflow 3 exports that as
    MLFLOW_TRACKING_URI, overriding the store of every later project root in this process)."""
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):  # a new store's migrations
        logging.getLogger(name).setLevel(logging.WARNING)
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


def _find(client, exp_id: str, tags: dict[str, str], max_results: int = 100) -> list:
    from mlflow.entities import ViewType

    return list(_retry(lambda: client.search_runs(
        [exp_id], filter_string=_query(tags), run_view_type=ViewType.ACTIVE_ONLY,
        max_results=max_results, order_by=["attributes.start_time DESC"],
    )))


def _parent_run(client, exp_id: str, key: str, params: dict, tags: dict[str, str] | None = None) -> str:
    found = _find(client, exp_id, {PIPELINE_TAG: key})
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if parents:
        return parents[0].info.run_id
    dvc_exp = os.environ.get("DVC_EXP_NAME")
    tags = {PIPELINE_TAG: key, **(tags or {})}
    if dvc_exp:
        tags["unite.dvc_experiment"] = dvc_exp
    run = _retry(lambda: client.create_run(exp_id, run_name=f"pipeline-{dvc_exp or key}", tags=tags))
    Tracker(run.info.run_id, client).log_params(params)
    return run.info.run_id


@functools.lru_cache(maxsize=8)
def _git_tags(root: str) -> tuple[tuple[str, str], ...]:
    """The project's git commit, branch and whether tracked files differ from it (cached per root)."""
    try:
        import git

        repo = git.Repo(root, search_parent_directories=True)
        tags = {GIT_COMMIT_TAG: repo.head.commit.hexsha,
                "unite.git_dirty": str(repo.is_dirty(untracked_files=False)).lower()}
        if not repo.head.is_detached:
            tags["mlflow.source.git.branch"] = repo.active_branch.name
        return tuple(tags.items())
    except Exception as exc:  # noqa: BLE001 - no git, not a repository, no commit yet
        log.debug("no git commit for %s (%s)", root, exc)
        return ()


def source_tags(root: Path, params: dict | None = None) -> dict[str, str]:
    """Tags every run carries: the git commit (mlflow.source.git.commit) and the params hash."""
    tags = dict(_git_tags(str(project_home(root))))
    if params is not None:
        tags[PARAMS_HASH_TAG] = params_hash(params)
    return tags


def check_reachable(uri: str) -> None:
    """Fail fast on a tracking server that does not answer (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=_REACH_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # it answered (a server without /health, or one that wants credentials)
    except OSError as exc:
        raise ConnectionError(f"no answer from {uri} ({getattr(exc, 'reason', exc)})") from None


@contextmanager
def stage_run(
    root: Path, experiment: str, stage: str, params: dict, *, enabled: bool = True, extra_tags: dict | None = None,
    strict: bool = False,
) -> Iterator[Tracker]:
    """A fresh child run `stage` under the pipeline parent run for these params. Earlier runs of the stage
    (same extra tags) under that parent are soft-deleted once this one FINISHED; it ends KILLED on a
    KeyboardInterrupt and FAILED on another exception (which propagates). A store that cannot be opened
    gives one warning and a NullTracker, or TrackingError when `strict`."""
    if not enabled:
        yield NullTracker()
        return
    uri = tracking_uri(root)
    health = StoreHealth(uri, strict, stage)
    try:
        check_reachable(uri)
        client = client_for(root)
        exp_id = experiment_id(client, experiment, root)
        key = params_hash(params)
        tags = source_tags(root, params)
        parent = _parent_run(client, exp_id, key, params, tags)
        _retry(lambda: client.update_run(parent, status="RUNNING"))
        child_tags = {PIPELINE_TAG: key, STAGE_TAG: stage, **{k: str(v) for k, v in (extra_tags or {}).items()}}
        previous = [r.info.run_id for r in _find(client, exp_id, child_tags)
                    if r.data.tags.get("mlflow.parentRunId") == parent]
        run = _retry(lambda: client.create_run(
            exp_id, run_name=stage, tags={**tags, **child_tags, "mlflow.parentRunId": parent}))
        tracker = Tracker(run.info.run_id, client, health)
        tracker.log_params(params)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a broken store
        health.fail(exc, "opening the run")
        tracker = None
    if tracker is None:
        yield NullTracker()
        return
    run_id = run.info.run_id
    try:
        yield tracker
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        health.call(lambda: client.set_terminated(run_id, status), "ending the run")
        health.call(lambda: client.set_terminated(parent, status), "ending the run")
        raise
    health.call(lambda: client.set_terminated(run_id, "FINISHED"), "ending the run")
    for old in previous:
        health.call(lambda old=old: client.delete_run(old), "retiring an earlier run")
    health.call(lambda: client.set_terminated(parent, "FINISHED"), "ending the run")


# --- The trained model as an MLflow model ---
def log_generator_model(client, run_id: str, state: dict, step: int = 0) -> str | None:
    """Log the checkpoint's EMA model (images only) as MLflow model `model` of the run; its model id.
    Pickle format (torch.export cannot trace the sampler): load only from a store you trust. Requirements
    are given, not inferred (inferring loads the model again in a subprocess)."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import Schema, TensorSpec

    from unite_core.train import model_from_checkpoint

    from .generator_model import GeneratorModel

    info = state.get("info", {})
    if info.get("modality", "images") != "images":
        log.info("the MLflow model is logged for image models only; this is a %s model", info.get("modality"))
        return None
    model = model_from_checkpoint(state, use_ema=True, device="cpu")
    wrapped = GeneratorModel(model, state["config"]["sample"]).eval()
    channels, size = int(info.get("channels", 1)), int(info.get("image_size", 32))
    num_classes = max(1, int(info.get("num_classes", 1)))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("int64"), (-1,))]),  # unnamed: pyfunc passes the array as is
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, channels, size, size), "images")]),
    )
    # two labels: MLflow checks the example by generating from it while logging (a second, not minutes)
    example = np.arange(min(num_classes, 2), dtype=np.int64)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    flavor_log = logging.getLogger("mlflow.pytorch")
    level = flavor_log.level
    flavor_log.setLevel(logging.ERROR)  # its warning about pickle: the choice is deliberate (above)
    try:
        with _use_tracking_uri(client.tracking_uri):
            # The logged model is created here, in the run's experiment: left to log_model, MLflow 3.x
            # files it under the default experiment "0", whose artifacts go to ./mlruns of whatever
            # folder the command runs in, outside the project's store.
            experiment = client.get_run(run_id).info.experiment_id
            created = client.create_logged_model(experiment_id=experiment, name=MODEL_NAME,
                                                 source_run_id=run_id)
            logged = mlflow.pytorch.log_model(
                wrapped, name=MODEL_NAME, run_id=run_id, model_id=created.model_id, signature=signature,
                input_example=example, pip_requirements=requirements, step=int(step),
                serialization_format="pickle",
            )
    finally:  # _use_tracking_uri unsets the variable it exported instead of restoring the user's
        flavor_log.setLevel(level)
        if env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    return logged.model_id

