"""Pipeline tests: stages, the CLI, DVC, Ray and MLflow end to end on tiny projects (tests/ray_fixtures.py
holds the helpers; `ray_cluster` is the one Ray cluster of the test session)."""

import pytest

from tests.ray_fixtures import ray_cluster  # noqa: F401 (the session's Ray cluster, for every test here)


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    """A user's MLflow server, active run or DVC experiment must not leak into a test project."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
