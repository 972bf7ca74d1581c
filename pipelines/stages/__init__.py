"""One module per pipeline stage, each with `run(ctx: StageContext) -> dict`, and what they share.

`execute(stage, cfg, root, ...)` runs a stage (CLI, tests): in its MLflow child run, writing
metrics/<stage>.json and logging it (and the summary numbers the stage did not log) to the run.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from unite_core.io import atomic_write_json


def stage_options(ctx, defaults: dict, error: type, stage: str, **kwargs) -> dict:
    """Keyword arguments over ctx.options over `defaults` (None keeps the default); unknown names raise `error`."""
    given = {**(ctx.options or {}), **kwargs}
    unknown = set(given) - set(defaults)
    if unknown:
        raise error(f"unknown {stage} option(s) {sorted(unknown)}: known are {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


# --- Running a stage ---
def execute(
    stage: str,
    cfg,
    root: str | Path,
    *,
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

    module = importlib.import_module(f"{__name__}.{stage}")
    with stage_run(Path(root), cfg.tracking.experiment, stage, cfg.to_dict(), enabled=cfg.tracking.enabled,
                   strict=cfg.tracking.strict) as tracker:
        ctx = StageContext(cfg, Path(root), tracker, params_path=params_path, overrides=list(overrides or []),
                           debug=debug, reporter=reporter or Reporter(), options=dict(options or {}))
        result = module.run(ctx) or {}
        if write_metrics:
            path = atomic_write_json(ctx.paths.stage_metrics(stage), result, indent=2)
            tracker.log_artifact(path, "metrics")
        tracker.log_summary(result)
    return result
