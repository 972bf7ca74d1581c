"""`unite sample`: a grid of generated samples from a checkpoint (not a DVC stage), one row per class.

Options: those of `unite sample --help`. The model comes from the checkpoint's own config (EMA weights with
sample.use_ema); solver, steps, guidance interval and seed from the params' `sample` section. Molecules:
unite_core.eval_molecules.write_samples (an SDF and a PNG of 2-D depictions beside --out).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from unite_core.io import atomic_write, atomic_write_bytes
from unite_core.pictures import SampleOptionError

from ..context import StageContext

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("reports") / "samples.png"


def run(ctx: StageContext) -> dict:
    import torch

    from unite_core.devices import autocast_dtype_for, resolve_device
    from unite_core.pictures import MIN_TILE, class_labels, image_grid, sample_images
    from unite_core.train import load_checkpoint, model_from_checkpoint

    cfg, opts = ctx.cfg, ctx.options
    path = Path(opts.get("checkpoint") or ctx.paths.checkpoint)
    if not path.is_absolute():
        path = ctx.root / path
    state = load_checkpoint(path)
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, use_ema=cfg.sample.use_ema, device=device)
    out = Path(opts.get("out") or DEFAULT_OUT)
    if not out.is_absolute():
        out = ctx.root / out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = cfg.sample
    cfg_scale = float(opts["cfg_scale"]) if opts.get("cfg_scale") is not None else s.cfg_scale
    if cfg_scale < 0:
        raise SampleOptionError(f"--cfg-scale {cfg_scale} must be >= 0 (1 = no guidance)")

    if model.modality.name == "molecules":
        return _molecules(ctx, model, state, out, t0)

    classes, per_class = class_labels(opts.get("classes"), opts.get("per_class"), model.num_classes, s.num_samples)
    labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    with ctx.reporter.progress("sample", len(labels)) as task:
        images, nfe = sample_images(model, labels, s, cfg_scale=cfg_scale, seed=s.seed, batch_size=cfg.eval.batch_size,
                                    autocast_dtype=autocast_dtype_for(cfg.train.precision), on_batch=task.update)
    grid = image_grid(images, nrow=per_class, min_tile=MIN_TILE)
    atomic_write(out, lambda f: grid.save(f, format="PNG"))
    ctx.tracker.log_image(grid, out.name)
    result = {
        "out": str(out),
        "checkpoint": str(path),
        "checkpoint_step": int(state.get("step", 0)),
        "classes": classes,
        "per_class": int(per_class),
        "num_samples": int(len(labels)),
        "cfg_scale": cfg_scale,
        "nfe": nfe,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    ctx.tracker.log_metrics({"num_samples": result["num_samples"], "cfg_scale": cfg_scale, "nfe": nfe,
                             "seconds": result["seconds"]})
    log.debug("wrote %d samples (%d classes x %d, guidance %.2f) to %s", len(labels), len(classes), per_class,
             cfg_scale, out)
    return result


def _molecules(ctx: StageContext, model, state: dict, out: Path, t0: float) -> dict:
    from unite_core.eval_molecules import write_samples

    cfg, opts = ctx.cfg, ctx.options
    n = int(opts.get("per_class") or cfg.sample.num_samples)
    if opts.get("cfg_scale") is not None:
        cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"cfg_scale": float(opts["cfg_scale"])})})
    files = write_samples(model, n, out.parent, cfg)
    png = Path(files["png"])
    if png.resolve() != out.resolve():
        atomic_write_bytes(out, png.read_bytes())
    from PIL import Image

    with Image.open(out) as img:
        ctx.tracker.log_image(img.copy(), out.name)
    if files.get("sdf"):
        ctx.tracker.log_artifact(files["sdf"], "samples")
    return {"out": str(out), "sdf": files.get("sdf"), "num_samples": n,
            "checkpoint_step": int(state.get("step", 0)), "seconds": round(time.perf_counter() - t0, 3)}
