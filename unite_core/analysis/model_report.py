"""Every analysis of one trained model (and of its ablation checkpoints): the numbers of `unite analyze`.

`analyze_model` runs, on a seeded val subset: the alignment of the tokenization and denoising passes per GE
block (CKA, CKNNA) and the cosine of clean latent vs denoised prediction over t; linear probes (train images
4x as many); the weights' description length against the model's initialisation; the same alignment and
compression for each ablation checkpoint; and the rate-distortion table of a sweep. It returns the result
(headline numbers first) and the tables; `figures` draws them. No files are written here.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..config import config_from_dict
from ..model import UNITE
from ..train import CheckpointError, fetch, load_checkpoint, model_from_checkpoint
from . import report
from .activations import (alignment_rows, cosine_rows, extract_activations, probe_rows, select_indices,
                          tokenization_features)

log = logging.getLogger(__name__)

#: extra timesteps of the cosine curve (predictions only), besides analysis.timesteps
COSINE_GRID = (0.0, 0.5, 0.99, 1.0)
#: table -> (CSV file name, columns)
CSV_FILES = {
    "alignment": ("alignment.csv", report.ALIGNMENT_COLUMNS),
    "alignment_variants": ("alignment_variants.csv", ("model",) + report.ALIGNMENT_COLUMNS),
    "cosine": ("cosine.csv", report.COSINE_COLUMNS),
    "probe": ("probe.csv", report.PROBE_COLUMNS),
    "compression": ("compression.csv", report.COMPRESSION_COLUMNS),
    "rate_distortion": ("rate_distortion.csv", report.RATE_DISTORTION_COLUMNS),
}


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


def find_variants(folder: Path, given: Mapping[str, str | Path] | None = None) -> dict[str, Path]:
    """`given` (name -> path) plus the checkpoints in ``folder`` (models/compare/) that :func:`classify_variant`
    recognises, named by their kind (file stem when a kind repeats), newest first."""
    found: dict[str, Path] = {k: Path(v) for k, v in (given or {}).items()}
    if Path(folder).is_dir():
        for p in sorted(Path(folder).glob("*.pt"), key=lambda q: q.stat().st_mtime, reverse=True):
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


def same_data(info_a: dict, info_b: dict) -> bool:
    keys = ("modality", "channels", "image_size", "num_classes", "max_atoms")
    return all(info_a.get(k) == info_b.get(k) for k in keys if k in info_a or k in info_b)


def fresh_model(state: dict) -> UNITE:
    """The checkpoint config's untrained model, initialised as the Trainer does; the global RNG is untouched."""
    cfg = config_from_dict(state["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return UNITE(cfg, state["info"]).eval()


def paper_comparisons(cfg, model, trained_res: dict, main_align: dict, variants: dict, variant_res: dict) -> dict:
    """shared_vs_separate (description length and alignment) and stop_grad_vs_not (alignment per block),
    when the checkpoints exist; the reference is the 'shared' variant, else the main model when it is the
    default method."""
    out: dict[str, dict] = {}
    if "shared" in variants:
        ref_name, ref_res, ref_align = "shared", variant_res["shared"], variants["shared"]["alignment"]
    elif not model.separate and cfg.flow.stop_grad:
        ref_name, ref_res, ref_align = "main", trained_res, main_align
    else:
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
                **{f"{k}_{side}": a.get(k) for k in ("cka_last_block", "cka_late_minus_early")
                   for side, a in (("stop_grad", ref_align), ("no_stop_grad", v["alignment"]))},
            }
    return out


def _rate_distortion(sweep_rows: list[dict] | None) -> tuple[list[dict], dict]:
    rd = report.rate_distortion_rows(sweep_rows) if sweep_rows else []
    summary: dict = {"trials": len(rd)}
    if rd:
        summary["spearman_rate_floats_psnr"] = report.spearman([r["rate_floats"] for r in rd], [r["psnr"] for r in rd])
        bits = [r for r in rd if r["rate_bits"] is not None]
        summary["spearman_rate_bits_psnr"] = report.spearman([r["rate_bits"] for r in bits], [r["psnr"] for r in bits])
        best = max(rd, key=lambda r: r["psnr"])
        summary.update(best_psnr=best["psnr"], best_psnr_rate_floats=best["rate_floats"])
    return rd, summary


def analyze_model(state: dict, model, data, cfg, *, variants: Mapping[str, Path] | None = None,
                  sweep_rows: list[dict] | None = None, class_mode: str = "null",
                  probe_train_images: int | None = None, device="cpu", autocast_dtype=None,
                  progress: Callable = lambda title, total: nullcontext()) -> tuple[dict, dict[str, list[dict]]]:
    """(result, tables) of the model of checkpoint ``state`` (see the module docstring). ``variants``: name ->
    ablation checkpoint (one of other data is skipped with a warning); ``progress(title, total)``: a context
    with update(i)."""
    start = time.perf_counter()
    a, seed = cfg.analysis, cfg.train.seed
    val_idx = select_indices(len(data.val), a.num_images, seed)
    train_idx = select_indices(len(data.train), probe_train_images or 4 * a.num_images, seed + 1)
    log.info("analyze: step %s, %d val images, %d probe-train images, device %s", state.get("step"), len(val_idx),
             len(train_idx), device)

    def activations(m):
        return extract_activations(m, data.val, val_idx, a.timesteps, cosine_timesteps=COSINE_GRID,
                                   class_mode=class_mode, seed=seed, device=device, autocast_dtype=autocast_dtype)

    t0 = time.perf_counter()
    record = activations(model)
    align, cosine = alignment_rows(record, k=a.knn), cosine_rows(record)
    timings = {"alignment_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    tr_hidden, tr_z0, tr_y = tokenization_features(model, data.train, train_idx, seed=seed + 2, device=device,
                                                   autocast_dtype=autocast_dtype)
    extra = {}
    tr_obs = model.modality.unpack(fetch(data.train, train_idx))[0]
    if isinstance(tr_obs, torch.Tensor):
        extra["pixels"] = (tr_obs.float(), model.modality.unpack(fetch(data.val, val_idx))[0].float())
    probe = probe_rows(tr_hidden, tr_z0, tr_y, record.tokenize_hidden, record.z0, record.labels,
                       extra=extra, max_iter=a.probe_max_iter, seed=seed)
    timings["probe_s"] = time.perf_counter() - t0
    del tr_hidden

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

    t0 = time.perf_counter()
    variant_rows: list[dict] = []
    variant_summary: dict[str, dict] = {}
    variant_res: dict[str, dict] = {}
    variants = dict(variants or {})
    with progress(f"analyze: {len(variants)} ablation checkpoint(s)", len(variants) or None) as task:
        for i, (name, path) in enumerate(variants.items()):
            try:
                vstate = load_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping variant %s: %s", name, exc)
                continue
            if not same_data(vstate["info"], data.info):
                log.warning("skipping variant %s: trained on other data (%s)", name, vstate["info"])
                continue
            vmodel = model_from_checkpoint(vstate, use_ema=True, device=device)
            vrec = activations(vmodel)
            valign = alignment_rows(vrec, k=a.knn)
            variant_rows += [{"model": name, **r} for r in valign]
            vcomp, variant_res[name] = report.compression_rows(name, report.model_components(vmodel), a.entropy_bins)
            comp_rows += vcomp
            variant_summary[name] = {
                "kind": classify_variant(vstate, Path(path).stem) or "other", "checkpoint": str(path),
                "checkpoint_step": vstate.get("step"), "alignment": report.alignment_summary(valign),
                "cosine_at_t": {f"{r['t']:g}": r["cosine_mean"] for r in cosine_rows(vrec)},
            }
            del vmodel, vrec
            if task is not None:
                task.update(i + 1)
    align_sum = report.alignment_summary(align)
    comparisons = paper_comparisons(cfg, model, trained_res, align_sum, variant_summary, variant_res)
    timings["variants_s"] = time.perf_counter() - t0
    rd, rd_summary = _rate_distortion(sweep_rows)

    probe_by = {r["feature"]: r for r in probe}
    blocks = [r for r in probe if r["feature"].startswith("block_")]
    best_block = max(blocks, key=lambda r: r["val_accuracy"]) if blocks else None
    at1 = min(cosine, key=lambda r: abs(r["t"] - 1.0))
    result = {
        # headline numbers first (the CLI prints the first scalars)
        "cka_mean": align_sum.get("cka_mean"),
        "cka_last_block": align_sum.get("cka_last_block"),
        "cosine_t1": at1["cosine_mean"],
        "probe_best_block_accuracy": best_block["val_accuracy"] if best_block else None,
        "probe_z0_accuracy": probe_by["z0"]["val_accuracy"],
        "probe_chance": probe_by["z0"]["chance"],
        "rd_trials": len(rd),
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
    tables = {"alignment": align, "alignment_variants": variant_rows, "cosine": cosine, "probe": probe,
              "compression": comp_rows, "rate_distortion": rd}
    return result, tables


def _placeholder(text: str):
    fig, (ax,) = report._figure(1)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return fig


def figures(tables: dict[str, list[dict]], sweep_name: str = "sweep.csv") -> dict:
    """PNG name -> matplotlib figure of each table (a figure saying why where a table is empty)."""
    align, rd = tables["alignment"], tables["rate_distortion"]
    return {
        "alignment.png": report.plot_alignment(align) if align else _placeholder("no alignment rows"),
        "cosine.png": report.plot_cosine(tables["cosine"]),
        "probe.png": report.plot_probe(tables["probe"]),
        "compression.png": report.plot_compression(tables["compression"]),
        "rate_distortion.png": report.plot_rate_distortion(rd) if rd else _placeholder(
            f"no sweep results ({sweep_name} missing or empty):\nrun `unite sweep`, then `unite analyze`"),
    }
