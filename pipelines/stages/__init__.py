"""One module per pipeline stage, each with `run(ctx: StageContext) -> dict`, and what they share.

`execute(stage, cfg, root, ...)` runs a stage (CLI, tests): in its MLflow child run, writing
metrics/<stage>.json and logging it (and the summary numbers the stage did not log) to the run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import Any

from unite_core.io import atomic_write_text

#: the stages of dvc.yaml, in pipeline order
PIPELINE_STAGES = ("prepare", "classifier", "train", "evaluate", "analyze")


class StageError(RuntimeError):
    """A user-facing stage problem (missing input, impossible option); the message says what to do."""


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


def short_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def stage_options(ctx, defaults: dict, error: type, stage: str, **kwargs) -> dict:
    """Keyword arguments over ctx.options over `defaults` (None keeps the default); unknown names raise `error`."""
    given = {**(ctx.options or {}), **kwargs}
    unknown = set(given) - set(defaults)
    if unknown:
        raise error(f"unknown {stage} option(s) {sorted(unknown)}: known are {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def atomic_write_json(path: str | Path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(plain(data), indent=2, sort_keys=True) + "\n")


# --- Pictures ---
def image_grid(images, nrow: int, padding: int = 2, min_tile: int = 64):
    """PIL image of `images` ((N, C, H, W) in [0, 1], C in {1, 3}), `nrow` per row; tiles narrower than
    `min_tile` are upscaled (nearest neighbour, an integer factor): a 32x32 digit is unreadable as is."""
    import numpy as np
    from PIL import Image

    x = images.detach().float().clamp(0, 1).cpu().numpy()
    n, c, h, w = x.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 0.5, dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, xx = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y : y + h, xx : xx + w] = x[i].transpose(1, 2, 0)
    arr = (canvas * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    scale = max(1, math.ceil(min_tile / max(w, 1)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


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
            path = atomic_write_json(ctx.paths.stage_metrics(stage), result)
            tracker.log_artifact(path, "metrics")
        tracker.log_summary(result)
    return result
