"""One module per pipeline stage, each with `run(ctx: StageContext) -> dict`, and what they share.

`execute(stage, cfg, root, ...)` is the one way to run a stage outside DVC's bookkeeping (the CLI and
the tests use it): it opens the stage's MLflow child run, builds the StageContext, calls the
module's `run`, writes metrics/<stage>.json atomically and logs it (and the summary numbers that the
stage did not already log) to the run.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

#: the stages of dvc.yaml, in pipeline order
PIPELINE_STAGES = ("prepare", "classifier", "train", "evaluate", "analyze")


class StageError(RuntimeError):
    """A user-facing stage problem (missing input, impossible option); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
# one helper for every atomic write (temp file, fsync, umask-respecting mode, rename): unite_core.io
from unite_core.io import atomic_write, atomic_write_text  # noqa: E402,F401 - re-exported for the stages


def plain(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null, tuples lists, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return plain(value.item())
        except (TypeError, ValueError):
            pass
    return value


def atomic_write_json(path: str | Path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(plain(data), indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# Running a stage
# ----------------------------------------------------------------------------------------------
def stage_module(stage: str) -> ModuleType | None:
    """pipelines.stages.<stage>, or None when this build has no such stage."""
    name = f"{__name__}.{stage}"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def execute(
    stage: str,
    cfg,
    root: str | Path,
    *,
    module: ModuleType | None = None,
    params_path: Path | None = None,
    overrides: list[str] | None = None,
    debug: bool = False,
    reporter=None,
    options: dict | None = None,
    write_metrics: bool = True,
) -> dict:
    """Run one stage in its MLflow child run; write metrics/<stage>.json. Returns the stage's metrics."""
    from ..context import Reporter, StageContext
    from ..tracking import stage_run

    if module is None:
        module = stage_module(stage)
        if module is None:
            raise StageError(f"stage '{stage}' is not available in this build (no pipelines/stages/{stage}.py)")
    with stage_run(Path(root), cfg.tracking.experiment, stage, cfg.to_dict(), enabled=cfg.tracking.enabled,
                   strict=cfg.tracking.strict) as tracker:
        ctx = StageContext(cfg, Path(root), tracker, params_path=params_path, overrides=list(overrides or []),
                           debug=debug, reporter=reporter or Reporter(), options=dict(options or {}))
        result = module.run(ctx) or {}
        if write_metrics:
            path = atomic_write_json(ctx.paths.stage_metrics(stage), result)
            tracker.log_artifact(path, "metrics")
        tracker.log_summary(result)
    return result
