"""Shared fixtures of the pipeline tests: one Ray cluster per test session, tiny projects.

Import the fixtures you use into a test module (`from tests.ray_fixtures import ray_cluster`). Ray
start-up costs 15-30 s on a 2-core machine, so the cluster is started once per process, whichever
module asks first, and stopped at exit; `unite` subprocesses join it through RAY_ADDRESS.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UNITE = str(BIN / "unite")
_CLUSTER: dict[str, str] = {}  # records that this module registered the exit hook


def start_ray_once() -> str:
    """The address of this process's Ray cluster, started on first use (4 logical CPUs).

    A cluster that another test module already started is reused; one that was shut down meanwhile
    is started again.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    import ray

    from pipelines.distributed import RAY_TEMP_DIR

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=RAY_TEMP_DIR,
                 logging_level=logging.ERROR, log_to_driver=False)
        if not _CLUSTER:
            atexit.register(lambda: ray.shutdown() if ray.is_initialized() else None)
            _CLUSTER["started"] = "yes"
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    return start_ray_once()


def tiny_params(**sections) -> dict:
    """The params.yaml that `unite preset digits_tiny` writes (presets/digits_tiny.yaml over the embedded
    default, every key written out), with some sections updated (a dict per section)."""
    from unite_core.config import preset_params_text

    params = yaml.safe_load(preset_params_text(REPO / "presets" / "digits_tiny.yaml", "digits_tiny"))
    for name, values in sections.items():
        if isinstance(values, dict):
            params.setdefault(name, {}).update(values)
        else:
            params[name] = values
    return params


def write_params(root: Path, params: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT", "RAY_ADDRESS",
                "UNITE_TEST_CRASH_AT_STEP"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_unite(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([UNITE, *args], cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def copy_repo(dest: Path) -> Path:
    """The repository's tracked files (and new files git does not ignore) copied to dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(root / 'mlflow.db').resolve().as_posix()}")


def active_runs(root: Path, experiment: str = "unite", stage: str | None = None) -> list:
    if not (root / "mlflow.db").is_file():
        return []
    client = mlflow_client(root)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = f"tags.`unite.stage` = '{stage}'" if stage else ""
    return list(client.search_runs([exp.experiment_id], filter_string=query))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
