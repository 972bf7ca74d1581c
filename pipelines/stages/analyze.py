"""Stage `analyze`: the paper's analyses of a trained model, as JSON/CSV/PNG and MLflow records.

Inputs: models/unite.pt (EMA weights), the prepared data, and when present `unite compare`'s ablation
checkpoints (models/compare/*.pt) and reports/sweep.csv. Outs (always written, an empty table with its
header and a figure saying why): metrics/analyze.json, plots/{alignment, alignment_variants, cosine,
probe, compression, rate_distortion}.csv (+ .png). The denoising pass uses the null class (class_mode=
"label": the true labels); images are a seeded val subset (analysis.num_images), the probe trains on 4x
as many train images; passes run at the training precision; compression compares the EMA weights with
the model's initialisation. Options: OPTIONS (`unite analyze --help`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import torch

from unite_core.analysis.activations import (
    CLASS_MODES,
    alignment_rows,
    cosine_rows,
    extract_activations,
    probe_rows,
    select_indices,
    tokenization_features,
)
from unite_core.analysis import report
from unite_core.config import config_from_dict
from unite_core.model import UNITE
from unite_core.devices import autocast_dtype_for, resolve_device
from unite_core.train import CheckpointError, fetch, load_checkpoint, model_from_checkpoint

from ..context import StageContext
from ..inputs import open_data
from ..tracking import numeric_items
from . import stage_options

log = logging.getLogger(__name__)

#: extra timesteps of the cosine curve (predictions only), besides analysis.timesteps
COSINE_GRID = (0.0, 0.5, 0.99, 1.0)
CSV_FILES = {
    "alignment": ("alignment.csv", report.ALIGNMENT_COLUMNS),
    "alignment_variants": ("alignment_variants.csv", ("model",) + report.ALIGNMENT_COLUMNS),
    "cosine": ("cosine.csv", report.COSINE_COLUMNS),
    "probe": ("probe.csv", report.PROBE_COLUMNS),
    "compression": ("compression.csv", report.COMPRESSION_COLUMNS),
    "rate_distortion": ("rate_distortion.csv", report.RATE_DISTORTION_COLUMNS),
}
PNG_FILES = ("alignment.png", "cosine.png", "probe.png", "compression.png", "rate_distortion.png")


# --- Inputs ---
def classify_variant(state: dict, stem: str = "") -> str | None:
    """'separate', 'no_stop_grad', or 'shared' (the default method trained by `unite compare`: unite-*.pt);
    None for anything else."""
    c = state.get("config", {})
    model, flow, loss = c.get("model", {}), c.get("flow", {}), c.get("loss", {})
    if loss.get("recon_only") or stem.startswith("two_stage"):
        return None
    if model.get("weight_sharing") == "separate":
        return "separate"
    if flow.get("stop_grad") is False:
        return "no_stop_grad"
    if stem == "unite" or stem.startswith("unite-"):
        return "shared"
    return None


def find_variants(ctx: StageContext, given: Mapping[str, str | Path] | None = None) -> dict[str, Path]:
    """`given` (name -> path) plus the models/compare/*.pt that :func:`classify_variant` recognises, named by
    their kind (file stem when a kind repeats)."""
    found: dict[str, Path] = {k: Path(v) for k, v in (given or {}).items()}
    folder = ctx.paths.models / "compare"
    if folder.is_dir():
        for p in sorted(folder.glob("*.pt"), key=lambda q: q.stat().st_mtime, reverse=True):
            if any(p.resolve() == q.resolve() for q in found.values() if q.exists()):
                continue
            try:
                state = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - an unreadable file is skipped, not fatal
                log.warning("skipping unreadable checkpoint %s (%s)", p, type(exc).__name__)
                continue
            kind = classify_variant(state, p.stem) if isinstance(state, dict) else None
            if kind:
                found[kind if kind not in found else p.stem] = p
    return found


def _same_data(info_a: dict, info_b: dict) -> bool:
    keys = ("modality", "channels", "image_size", "num_classes", "max_atoms")
    return all(info_a.get(k) == info_b.get(k) for k in keys if k in info_a or k in info_b)


def fresh_model(state: dict) -> UNITE:
    """The checkpoint config's untrained model, initialised as the Trainer does; the global RNG is untouched."""
    cfg = config_from_dict(state["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return UNITE(cfg, state["info"]).eval()


def _placeholder(text: str):
    fig, (ax,) = report._figure(1)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return fig


def _paper_comparisons(cfg, model, trained_res: dict, main_align: dict, variants: dict, variant_res: dict) -> dict:
    """shared_vs_separate (description length and alignment) and stop_grad_vs_not (alignment per block),
    when the checkpoints exist; the reference is the 'shared' variant, else the main model when it is the
    default method."""
    out: dict[str, dict] = {}
    main_default = not model.separate and cfg.flow.stop_grad
    ref_name, ref_res, ref_align = None, None, None
    if "shared" in variants:
        ref_name, ref_res, ref_align = "shared", variant_res["shared"], variants["shared"]["alignment"]
    elif main_default:
        ref_name, ref_res, ref_align = "main", trained_res, main_align
    if ref_name is None:
        return out
    for name, v in variants.items():
        if v["kind"] == "separate" and "shared_vs_separate" not in out:
            res = variant_res[name]
            out["shared_vs_separate"] = {
                "reference": ref_name, "variant": name,
                "compression": report.compression_summary(ref_res["ge"], [res["ge"], res["denoiser"]], "shared",
                                                          "separate"),
                "cka_mean_shared": ref_align.get("cka_mean"), "cka_mean_separate": v["alignment"].get("cka_mean"),
            }
        if v["kind"] == "no_stop_grad" and "stop_grad_vs_not" not in out:
            blocks = sorted(int(k.rsplit("_", 1)[1]) for k in ref_align if k.startswith("cka_block_"))
            out["stop_grad_vs_not"] = {
                "reference": ref_name, "variant": name,
                **{f"cka_block_{b}_stop_grad": ref_align.get(f"cka_block_{b}") for b in blocks},
                **{f"cka_block_{b}_no_stop_grad": v["alignment"].get(f"cka_block_{b}") for b in blocks},
                "cka_last_block_stop_grad": ref_align.get("cka_last_block"),
                "cka_last_block_no_stop_grad": v["alignment"].get("cka_last_block"),
                "cka_late_minus_early_stop_grad": ref_align.get("cka_late_minus_early"),
                "cka_late_minus_early_no_stop_grad": v["alignment"].get("cka_late_minus_early"),
            }
    return out


# --- Notebooks (notebooks/*.py, jupytext percent format, executed with papermill) ---
NOTEBOOKS = ("linear_probe", "rate_distortion", "alignment")


def notebook_dir(root: Path) -> Path:
    here = Path(root) / "notebooks"
    if (here / "alignment.py").is_file():
        return here
    return Path(__file__).resolve().parents[2] / "notebooks"


def notebook_parameters(name: str, root: Path, out_dir: Path) -> dict:
    root = Path(root)
    common = {"out_dir": str(out_dir)}
    if name == "linear_probe":
        return {**common, "probe_csv": str(root / "plots" / "probe.csv")}
    if name == "rate_distortion":
        return {**common, "sweep_csv": str(root / "reports" / "sweep.csv")}
    if name == "alignment":
        return {**common, "alignment_csv": str(root / "plots" / "alignment.csv"),
                "cosine_csv": str(root / "plots" / "cosine.csv"),
                "variants_csv": str(root / "plots" / "alignment_variants.csv")}
    raise AnalyzeError(f"unknown notebook {name!r}: known are {list(NOTEBOOKS)}")


def execute_notebook(source: Path, output: Path, parameters: dict, cwd: Path, timeout_s: int = 600) -> Path:
    """Execute a jupytext percent-format .py with papermill (raises on a failing cell) into `output`."""
    import jupytext
    import nbformat
    import papermill

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    src = output.with_name(output.stem + ".input.ipynb")
    nbformat.write(nb, src)
    try:
        papermill.execute_notebook(str(src), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(cwd), progress_bar=False, log_output=False,
                                   execution_timeout=timeout_s, start_timeout=180,
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"])
    finally:
        src.unlink(missing_ok=True)
    return output


def execute_notebooks(ctx: StageContext, names=NOTEBOOKS, out_dir: Path | None = None) -> list[Path]:
    """Run the notebooks on the project's outputs into reports/notebooks/ (logged to the stage's run; the
    notebooks do not write to MLflow here); rate_distortion is skipped without reports/sweep.csv."""
    out_dir = Path(out_dir) if out_dir else ctx.paths.reports / "notebooks"
    src_dir = notebook_dir(ctx.root)
    done = []
    for name in names:
        params = notebook_parameters(name, ctx.root, out_dir)
        if name == "rate_distortion" and not Path(params["sweep_csv"]).is_file():
            log.info("notebook %s skipped: no %s (run `unite sweep`)", name, params["sweep_csv"])
            continue
        out = execute_notebook(src_dir / f"{name}.py", out_dir / f"{name}.ipynb", params, ctx.root)
        done.append(out)
        ctx.tracker.log_artifact(out, "notebooks")
    for png in sorted(out_dir.glob("*.png")):
        ctx.tracker.log_artifact(png, "notebooks")
    return done


# --- The stage ---
#: options of run() / `unite analyze` (ctx.options) and their defaults
OPTIONS = {"checkpoint": None, "variants": None, "sweep_csv": None, "class_mode": "null",
           "probe_train_images": None, "notebooks": False}


class AnalyzeError(RuntimeError):
    """A user-facing problem with the analyze options."""


def parse_variants(items: list[str] | None) -> dict[str, Path] | None:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise AnalyzeError(f"--variant {item!r} must look like NAME=PATH, e.g. separate=models/sep.pt")
        out[name.strip()] = Path(path.strip())
    return out or None


def run(ctx: StageContext, **kwargs) -> dict:
    opts = stage_options(ctx, OPTIONS, AnalyzeError, "analyze", **kwargs)
    if opts["class_mode"] not in CLASS_MODES:
        raise AnalyzeError(f"class mode {opts['class_mode']!r} is invalid: use one of {list(CLASS_MODES)}")
    result = _analyze(ctx, checkpoint=opts["checkpoint"], variants=opts["variants"], sweep_csv=opts["sweep_csv"],
                      class_mode=opts["class_mode"], probe_train_images=opts["probe_train_images"])
    if opts["notebooks"]:
        result["notebooks"] = [str(p) for p in execute_notebooks(ctx)]
    return result


def _analyze(ctx: StageContext, *, checkpoint: str | Path | None, variants: Mapping[str, str | Path] | None,
             sweep_csv: str | Path | None, class_mode: str, probe_train_images: int | None) -> dict:
    start = time.perf_counter()
    cfg, paths, tracker = ctx.cfg, ctx.paths, ctx.tracker
    a = cfg.analysis
    device = resolve_device(cfg.train.device)
    amp = autocast_dtype_for(cfg.train.precision)  # the precision the model runs at
    seed = cfg.train.seed
    ckpt_path = Path(checkpoint) if checkpoint else paths.checkpoint
    state = load_checkpoint(ckpt_path, cfg)
    model = model_from_checkpoint(state, use_ema=True, device=device)
    data = open_data(ctx)
    if not _same_data(state["info"], data.info):
        raise CheckpointError(
            f"checkpoint '{ckpt_path}' was trained on data described as {state['info']} but the prepared "
            f"data is {data.info}: prepare the data it was trained on or retrain"
        )
    val_idx = select_indices(len(data.val), a.num_images, seed)
    n_probe = probe_train_images or 4 * a.num_images
    train_idx = select_indices(len(data.train), n_probe, seed + 1)
    log.info("analyze: %s (step %s), %d val images, %d probe-train images, device %s",
             ckpt_path, state.get("step"), len(val_idx), len(train_idx), device)

    # --- alignment and cosine ---------------------------------------------------------------
    def activations(m):
        return extract_activations(m, data.val, val_idx, a.timesteps, cosine_timesteps=COSINE_GRID,
                                   class_mode=class_mode, seed=seed, device=device, autocast_dtype=amp)

    t0 = time.perf_counter()
    record = activations(model)
    align = alignment_rows(record, k=a.knn)
    cosine = cosine_rows(record)
    timings = {"alignment_s": time.perf_counter() - t0}

    # --- linear probe -------------------------------------------------------------------------
    t0 = time.perf_counter()
    tr_hidden, tr_z0, tr_y = tokenization_features(model, data.train, train_idx, seed=seed + 2, device=device,
                                                   autocast_dtype=amp)
    extra = {}
    tr_obs = model.modality.unpack(fetch(data.train, train_idx))[0]
    if isinstance(tr_obs, torch.Tensor):
        va_obs = model.modality.unpack(fetch(data.val, val_idx))[0]
        extra["pixels"] = (tr_obs.float(), va_obs.float())
    probe = probe_rows(tr_hidden, tr_z0, tr_y, record.tokenize_hidden, record.z0, record.labels,
                       extra=extra, max_iter=a.probe_max_iter, seed=seed)
    timings["probe_s"] = time.perf_counter() - t0
    del tr_hidden

    # --- compression --------------------------------------------------------------------------
    t0 = time.perf_counter()
    comp_rows, init_res = report.compression_rows("init", report.model_components(fresh_model(state)), a.entropy_bins)
    rows, trained_res = report.compression_rows("trained", report.model_components(model), a.entropy_bins)
    comp_rows += rows
    compression = {
        "ge_trained_vs_init": report.compression_summary(init_res["ge"], trained_res["ge"], "init", "trained"),
        "ge_total_bits_trained": trained_res["ge"]["total"]["total_bits"],
        "ge_total_bits_init": init_res["ge"]["total"]["total_bits"],
        "decoder_total_bits_trained": trained_res["decoder"]["total"]["total_bits"],
    }
    timings["compression_s"] = time.perf_counter() - t0

    # --- ablation checkpoints -----------------------------------------------------------------
    t0 = time.perf_counter()
    variant_rows: list[dict] = []
    variant_summary: dict[str, dict] = {}
    variant_res: dict[str, dict] = {}
    found = find_variants(ctx, variants)
    with ctx.reporter.progress(f"analyze: {len(found)} ablation checkpoint(s)", len(found) or None) as task:
        for i, (name, path) in enumerate(found.items()):
            try:
                vstate = load_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping variant %s: %s", name, exc)
                continue
            if not _same_data(vstate["info"], data.info):
                log.warning("skipping variant %s: trained on other data (%s)", name, vstate["info"])
                continue
            vmodel = model_from_checkpoint(vstate, use_ema=True, device=device)
            vrec = activations(vmodel)
            valign = alignment_rows(vrec, k=a.knn)
            variant_rows += [{"model": name, **r} for r in valign]
            vcomp, vres = report.compression_rows(name, report.model_components(vmodel), a.entropy_bins)
            comp_rows += vcomp
            variant_res[name] = vres
            variant_summary[name] = {
                "kind": classify_variant(vstate, Path(path).stem) or "other",
                "checkpoint": str(path),
                "checkpoint_step": vstate.get("step"),
                "alignment": report.alignment_summary(valign),
                "cosine_at_t": {f"{r['t']:g}": r["cosine_mean"] for r in cosine_rows(vrec)},
            }
            del vmodel, vrec
            task.update(i + 1)
    comparisons = _paper_comparisons(cfg, model, trained_res, report.alignment_summary(align), variant_summary,
                                     variant_res)
    timings["variants_s"] = time.perf_counter() - t0

    # --- rate-distortion from the sweep --------------------------------------------------------
    sweep_path = Path(sweep_csv) if sweep_csv else paths.reports / "sweep.csv"
    rd = report.rate_distortion_rows(report.read_csv(sweep_path)) if sweep_path.is_file() else []
    rd_summary = {"trials": len(rd)}
    if rd:
        rd_summary["spearman_rate_floats_psnr"] = report.spearman([r["rate_floats"] for r in rd], [r["psnr"] for r in rd])
        with_bits = [r for r in rd if r["rate_bits"] is not None]
        rd_summary["spearman_rate_bits_psnr"] = report.spearman([r["rate_bits"] for r in with_bits],
                                                                [r["psnr"] for r in with_bits])
        best = max(rd, key=lambda r: r["psnr"])
        rd_summary["best_psnr"] = best["psnr"]
        rd_summary["best_psnr_rate_floats"] = best["rate_floats"]

    # --- write --------------------------------------------------------------------------------
    tables = {"alignment": align, "alignment_variants": variant_rows, "cosine": cosine, "probe": probe,
              "compression": comp_rows, "rate_distortion": rd}
    paths.plots.mkdir(parents=True, exist_ok=True)
    written = []
    for key, (fname, cols) in CSV_FILES.items():
        written.append(report.write_csv(tables[key], paths.plots / fname, cols))
    figures = {
        "alignment.png": report.plot_alignment(align) if align else _placeholder("no alignment rows"),
        "cosine.png": report.plot_cosine(cosine),
        "probe.png": report.plot_probe(probe),
        "compression.png": report.plot_compression(comp_rows),
        "rate_distortion.png": report.plot_rate_distortion(rd) if rd else _placeholder(
            f"no sweep results ({sweep_path.name} missing or empty):\nrun `unite sweep`, then `unite analyze`"),
    }
    for fname, fig in figures.items():
        written.append(report.save_figure(fig, paths.plots / fname))

    probe_by = {r["feature"]: r for r in probe}
    blocks = [r for r in probe if r["feature"].startswith("block_")]
    best_block = max(blocks, key=lambda r: r["val_accuracy"]) if blocks else None
    at1 = min(cosine, key=lambda r: abs(r["t"] - 1.0))
    align_sum = report.alignment_summary(align)
    result = {
        # headline numbers first (the CLI prints the first scalars)
        "cka_mean": align_sum.get("cka_mean"),
        "cka_last_block": align_sum.get("cka_last_block"),
        "cosine_t1": at1["cosine_mean"],
        "probe_best_block_accuracy": best_block["val_accuracy"] if best_block else None,
        "probe_z0_accuracy": probe_by["z0"]["val_accuracy"],
        "probe_chance": probe_by["z0"]["chance"],
        "rd_trials": len(rd),
        "checkpoint": str(ckpt_path),
        "checkpoint_step": state.get("step"),
        "num_images": len(val_idx),
        "probe_train_images": len(train_idx),
        "class_mode": class_mode,
        "timesteps": [float(t) for t in a.timesteps],
        "alignment": align_sum,
        "cosine_at_t": {f"{r['t']:g}": r["cosine_mean"] for r in cosine},
        "probe": {
            "val_accuracy_by_feature": {r["feature"]: r["val_accuracy"] for r in probe},
            "best_block": best_block["layer"] if best_block else None,
            "best_block_val_accuracy": best_block["val_accuracy"] if best_block else None,
            "z0_val_accuracy": probe_by["z0"]["val_accuracy"],
            "chance": probe_by["z0"]["chance"],
        },
        "compression": compression,
        "variants": variant_summary,
        "comparisons": comparisons,
        "rate_distortion": rd_summary,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }

    # --- MLflow (driver only) -------------------------------------------------------------------
    tracker.log_params({"analysis_class_mode": class_mode, "analysis_checkpoint": str(ckpt_path)})
    flat = {k: v for k, v in numeric_items(result).items() if not k.startswith("checkpoint")}
    tracker.log_metrics(flat)
    for t in sorted({r["t"] for r in align}):  # per-layer curves: step = GE block index
        for r in (r for r in align if r["t"] == t):
            tracker.log_metrics({f"cka_t{t:g}": r["cka"], f"cknna_t{t:g}": r["cknna"]}, step=r["layer"])
    for r in blocks:
        tracker.log_metrics({"probe_val_accuracy": r["val_accuracy"]}, step=r["layer"])
    for p in written:
        tracker.log_artifact(p, "plots")
    log.info("analyze: done in %.1f s (CKA mean %.3f, z0 probe %.3f)", result["seconds"],
             result["alignment"].get("cka_mean", float("nan")), result["probe"]["z0_val_accuracy"])
    return result
