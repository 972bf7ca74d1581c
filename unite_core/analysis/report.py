"""Tables and figures of the paper's analyses, shared by the `analyze` stage and the notebooks.

Rows are lists of plain dicts (one per CSV line); figures are ``matplotlib.figure.Figure``
objects built without pyplot (no global state, no GUI backend needed). The `analyze` stage
writes the rows as CSV (for `dvc plots`) and the figures as PNG; the notebooks in ``analysis/``
read those CSVs back and draw the same figures, so both show the same numbers.

Units: CKA / CKNNA / cosine / accuracy are unitless fractions; description lengths are in
megabits (Mbit = 1e6 bits) in figures and bits in tables; latent rate in floats per image
(K * d) or bits per image (empirical entropy of the quantised latent); PSNR in dB.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from ..io import atomic_write, atomic_write_text
from .compression import GROUPS, compare_description_lengths, description_length

logger = logging.getLogger(__name__)

__all__ = [
    "ALIGNMENT_COLUMNS",
    "COSINE_COLUMNS",
    "PROBE_COLUMNS",
    "COMPRESSION_COLUMNS",
    "RATE_DISTORTION_COLUMNS",
    "write_csv",
    "read_csv",
    "model_components",
    "compression_rows",
    "compression_summary",
    "rate_distortion_rows",
    "spearman",
    "alignment_summary",
    "plot_alignment",
    "plot_cosine",
    "plot_probe",
    "plot_compression",
    "plot_rate_distortion",
    "save_figure",
]

ALIGNMENT_COLUMNS = ("t", "layer", "cka", "cknna")
COSINE_COLUMNS = ("t", "cosine_mean", "cosine_std", "input_cosine_mean")
PROBE_COLUMNS = ("feature", "layer", "val_accuracy", "train_accuracy", "chance", "uniform_chance", "num_features")
COMPRESSION_COLUMNS = ("model", "component", "group", "numel", "total_bits", "bits_per_value")
RATE_DISTORTION_COLUMNS = (
    "trial", "latent_tokens", "latent_dim", "flow_minibatches", "rate_floats", "rate_bits",
    "psnr", "rfid",
)


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------
def _cell(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return repr(v) if abs(v) >= 1e-4 or v == 0 else f"{v:.6e}"
    return "" if v is None else v


def write_csv(rows: Iterable[Mapping], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` to ``path`` (parent folders created) with ``columns`` (default: keys of the
    first row, then any new keys in order of appearance). Floats keep full precision; ``None``
    and ``nan`` become empty cells; rows end in ``\n`` (the files are tracked by git)."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in columns})
    return atomic_write_text(path, buf.getvalue())


def _parse(v: str):
    if v == "":
        return None
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a CSV with numbers parsed (int, then float); empty cells become ``None``."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------
# Compression (weights)
# ----------------------------------------------------------------------------------------------
def notebook_tracking_uri(uri: str | None = None) -> str:
    """The MLflow store a notebook reads and logs to: `uri`, else MLFLOW_TRACKING_URI, else ./mlflow.db."""
    import os

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"


def read_tracked_csv(path: str | Path, artifact: str, run_id: str | None = None, tracking_uri: str | None = None):
    """Rows of a tracked CSV: the file `path`, or the artifact `artifact` of MLflow run `run_id` when given."""
    if run_id:
        import mlflow

        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                   tracking_uri=notebook_tracking_uri(tracking_uri))
    return read_csv(path)


def log_to_run(path: str | Path, run_id: str | None, tracking_uri: str | None = None) -> bool:
    """Log the file `path` to MLflow run `run_id` (artifact folder notebooks/); False when no run is given."""
    if not run_id:
        return False
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=notebook_tracking_uri(tracking_uri)).log_artifact(run_id, str(path), "notebooks")
    return True


def model_components(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Split a UNITE model's state dict into ``ge`` (the tokenizer GE, shared with denoising
    unless weights are separate), ``denoiser`` (separate variant only) and ``decoder``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    names = {"encoder": "ge", "denoiser_ge": "denoiser", "decoder": "decoder"}
    for key, value in model.state_dict().items():
        head, _, rest = key.partition(".")
        comp = names.get(head, "other")
        parts.setdefault(comp, {})[rest if comp != "other" else key] = value
    return parts


def compression_rows(name: str, components: Mapping[str, Mapping[str, torch.Tensor]], bins: int = 256) -> tuple[list[dict], dict]:
    """Description length of each component, per parameter group and in total.

    Returns ``(rows, results)``: ``rows`` are ``{"model", "component", "group", "numel",
    "total_bits", "bits_per_value"}`` (group ``total`` included; empty groups left out) and
    ``results[component]`` the full :func:`description_length` output.
    """
    rows, results = [], {}
    for comp, sd in components.items():
        res = description_length(sd, bins=bins)
        results[comp] = res
        for g in (*GROUPS, "total"):
            agg = res["total"] if g == "total" else res["groups"][g]
            if agg["numel"] == 0:
                continue
            rows.append({"model": name, "component": comp, "group": g, "numel": agg["numel"],
                         "total_bits": agg["total_bits"], "bits_per_value": agg["bits_per_value"]})
    return rows, results


def _merge(results: Sequence[dict]) -> dict:
    """Sum several description_length results (e.g. separate encoder + denoiser)."""
    groups = {g: {"numel": 0, "total_bits": 0.0} for g in GROUPS}
    for r in results:
        for g in GROUPS:
            groups[g]["numel"] += r["groups"][g]["numel"]
            groups[g]["total_bits"] += r["groups"][g]["total_bits"]
    total = {"numel": sum(v["numel"] for v in groups.values()),
             "total_bits": sum(v["total_bits"] for v in groups.values())}
    return {"groups": groups, "total": total}


def compression_summary(a: dict, b: dict, label_a: str, label_b: str) -> dict:
    """Flat comparison ``b`` vs ``a`` (each a description_length result or a list of them, which
    are summed): per group and total bits, delta and ratio, keyed ``<group>_<label>_bits``,
    ``<group>_delta_bits``, ``<group>_ratio``."""
    a = _merge(a) if isinstance(a, (list, tuple)) else a
    b = _merge(b) if isinstance(b, (list, tuple)) else b
    cmp = compare_description_lengths(a, b)
    out = {}
    for g, r in [*cmp["groups"].items(), ("total", cmp["total"])]:
        if r["numel_a"] == 0 and r["numel_b"] == 0:
            continue
        out[f"{g}_{label_a}_bits"] = r["bits_a"]
        out[f"{g}_{label_b}_bits"] = r["bits_b"]
        out[f"{g}_delta_bits"] = r["delta_bits"]
        out[f"{g}_ratio"] = r["ratio"]
    return out


# ----------------------------------------------------------------------------------------------
# Rate-distortion (from the sweep table)
# ----------------------------------------------------------------------------------------------
def _first(row: Mapping, *keys):
    for k in keys:
        v = row.get(k)
        if v is not None and v != "":
            return v
    return None


def rate_distortion_rows(sweep_rows: Iterable[Mapping]) -> list[dict]:
    """One rate-distortion point per finished sweep trial (rows of reports/sweep.csv).

    Rate: ``rate_floats = K * d`` (floats per image) and ``rate_bits`` (empirical bits per image
    of the quantised latent); distortion: ``psnr`` (dB, validation reconstructions) and ``rfid``
    when the sweep computed it. Trials without a PSNR (failed / stopped before evaluation) are
    left out. Sorted by ``rate_floats`` then ``rate_bits``.
    """
    out = []
    for r in sweep_rows:
        psnr = _first(r, "val_psnr", "psnr")
        if psnr is None or (isinstance(psnr, float) and math.isnan(psnr)):
            continue
        K = _first(r, "model.latent_tokens", "latent_tokens")
        d = _first(r, "model.latent_dim", "latent_dim")
        rate = _first(r, "rate_floats", "rate_kd")
        if rate is None and K is not None and d is not None:
            rate = int(K) * int(d)
        out.append({
            "trial": _first(r, "trial", "trial_id"),
            "latent_tokens": K, "latent_dim": d,
            "flow_minibatches": _first(r, "flow.minibatches", "flow_minibatches"),
            "rate_floats": rate,
            "rate_bits": _first(r, "bits_per_image", "rate_bits"),
            "psnr": float(psnr),
            "rfid": _first(r, "rfid"),
        })
    out.sort(key=lambda r: (r["rate_floats"] or 0, r["rate_bits"] or 0))
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); ``nan`` with fewer than 3 points or
    a constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 3 or x.size != y.size or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")  # (scipy would warn about a constant input and return nan as well)
    return float(spearmanr(x, y).statistic)


def alignment_summary(rows: Sequence[Mapping]) -> dict:
    """Per-layer CKA / CKNNA averaged over timesteps, and how much later layers align more:
    ``{"cka_block_<l>", "cknna_block_<l>", "cka_mean", "cka_first_block", "cka_last_block",
    "cka_late_minus_early" (mean of the last half of blocks minus the first half)}``."""
    if not rows:
        return {}
    layers = sorted({int(r["layer"]) for r in rows})
    out: dict[str, float] = {}
    cka = {}
    for l in layers:
        sel = [r for r in rows if int(r["layer"]) == l]
        cka[l] = _mean([r["cka"] for r in sel])
        out[f"cka_block_{l}"] = cka[l]
        out[f"cknna_block_{l}"] = _mean([r["cknna"] for r in sel])
    vals = [cka[l] for l in layers]
    half = len(vals) // 2
    out["cka_mean"] = _mean(vals)
    out["cka_first_block"] = vals[0]
    out["cka_last_block"] = vals[-1]
    if half:
        out["cka_late_minus_early"] = _mean(vals[len(vals) - half:]) - _mean(vals[:half])
    return out


def _mean(values) -> float:
    """Mean of the finite values (nan when there are none, without numpy's warning)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


def plot_alignment(rows: Sequence[Mapping], title: str = "Tokenization vs denoising pass: alignment per GE block"):
    """CKA and CKNNA against the GE block index, one line per denoising timestep ``t``."""
    fig, (ax1, ax2) = _figure(2)
    ts = sorted({float(r["t"]) for r in rows})
    for t, c in zip(ts, _colors(len(ts))):
        sel = sorted((r for r in rows if float(r["t"]) == t), key=lambda r: int(r["layer"]))
        layers = [int(r["layer"]) for r in sel]
        ax1.plot(layers, [r["cka"] for r in sel], "o-", color=c, label=f"t = {t:g}")
        ax2.plot(layers, [r["cknna"] for r in sel], "o-", color=c, label=f"t = {t:g}")
    for ax, name in ((ax1, "linear CKA"), (ax2, "CKNNA")):
        ax.set_xlabel("GE block (layer index, 0 = first)")
        ax.set_ylabel(f"{name} (unitless, 1 = identical)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if rows:
            ax.set_xticks(sorted({int(r["layer"]) for r in rows}))
    ax1.set_ylim(0, 1.02)
    low = min([0.0] + [float(r["cknna"]) for r in rows if r.get("cknna") is not None and math.isfinite(float(r["cknna"]))])
    ax2.set_ylim(low - 0.02 if low < 0 else 0, 1.02)
    ax1.legend(title="denoising timestep", fontsize=8)
    fig.suptitle(title)
    return fig


def plot_cosine(rows: Sequence[Mapping], title: str = "Clean latent vs denoised prediction"):
    """Mean (+- std) cosine(z0, x_hat) against ``t``; dashed: cosine(z0, z_t) of the noisy input."""
    fig, (ax,) = _figure(1)
    rows = sorted(rows, key=lambda r: float(r["t"]))
    t = np.array([float(r["t"]) for r in rows])
    m = np.array([float(r["cosine_mean"]) for r in rows])
    s = np.array([float(r.get("cosine_std") or 0.0) for r in rows])
    ax.plot(t, m, "o-", label="prediction: cos(z0, x_hat)")
    ax.fill_between(t, m - s, m + s, alpha=0.2, label="+- 1 std over images")
    if rows and rows[0].get("input_cosine_mean") is not None:
        ax.plot(t, [float(r["input_cosine_mean"]) for r in rows], "--", color="gray",
                label="noisy input: cos(z0, z_t)")
    ax.set_xlabel("denoising timestep t (0 = pure noise, 1 = clean latent)")
    ax.set_ylabel("cosine similarity (unitless)")
    ax.set_title(title)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_probe(rows: Sequence[Mapping], title: str = "Linear probe on GE features (tokenization pass)"):
    """Validation accuracy per feature (GE blocks in order, then z0 and any baselines), with the
    majority-class chance level."""
    fig, (ax,) = _figure(1, width=6.0)
    blocks = sorted((r for r in rows if str(r["feature"]).startswith("block_")), key=lambda r: int(r["layer"]))
    others = [r for r in rows if not str(r["feature"]).startswith("block_")]
    others.sort(key=lambda r: (r["feature"] != "z0", str(r["feature"])))
    ordered = blocks + others
    x = np.arange(len(ordered))
    acc = [100 * float(r["val_accuracy"]) for r in ordered]
    colors = ["tab:blue"] * len(blocks) + ["tab:orange" if r["feature"] == "z0" else "tab:gray" for r in others]
    ax.bar(x, acc, color=colors, label="validation accuracy")
    if blocks:
        ax.plot(x[: len(blocks)], [100 * float(r["train_accuracy"]) for r in blocks], "k.--", label="train accuracy (blocks)")
    if ordered:
        chance = 100 * float(ordered[0]["chance"])
        ax.axhline(chance, color="red", ls=":", label=f"chance (majority class) {chance:.1f}%")
    for xi, a in zip(x, acc):
        ax.text(xi, a + 1, f"{a:.1f}", ha="center", fontsize=7)
    ax.set_xticks(x, [str(r["feature"]).replace("block_", "block ") for r in ordered], rotation=45, ha="right")
    ax.set_xlabel("feature (GE block, mean-pooled over latent tokens; z0 = latent)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    return fig


def plot_compression(rows: Sequence[Mapping], component: str = "ge",
                     title: str = "Description length of the GE weights per parameter group"):
    """Grouped bars: description length (Mbit) per parameter group, one bar per model (init,
    trained, variants) for one ``component`` (``ge`` by default)."""
    fig, (ax,) = _figure(1, width=7.0)
    sel = [r for r in rows if r["component"] == component and r["group"] != "total"]
    models = list(dict.fromkeys(r["model"] for r in sel))
    groups = [g for g in GROUPS if any(r["group"] == g for r in sel)]
    width = 0.8 / max(1, len(models))
    for i, (m, c) in enumerate(zip(models, _colors(len(models)))):
        vals = []
        for g in groups:
            hit = [r for r in sel if r["model"] == m and r["group"] == g]
            vals.append(float(hit[0]["total_bits"]) / 1e6 if hit else 0.0)
        ax.bar(np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width, vals, width, color=c, label=m)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_xlabel("parameter group")
    ax.set_ylabel("description length (Mbit)")
    ax.set_title(title + "\n(histogram entropy per value x number of values)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="weights")
    return fig


def plot_rate_distortion(rows: Sequence[Mapping], title: str = "Rate-distortion over the latent-size sweep"):
    """PSNR against latent rate, as raw size K*d and as empirical bits per image; a third panel
    with rFID when present. Points are labelled ``KxD`` and coloured by flow mini-batches M."""
    has_fid = any(r.get("rfid") is not None for r in rows)
    fig, axes = _figure(3 if has_fid else 2)
    ms = sorted({r.get("flow_minibatches") for r in rows}, key=lambda v: (v is None, v))
    colors = dict(zip(ms, _colors(len(ms))))
    panels = [(axes[0], "rate_floats", "psnr", "latent rate K x d (floats per image)", "PSNR (dB)"),
              (axes[1], "rate_bits", "psnr", "empirical latent rate (bits per image)", "PSNR (dB)")]
    if has_fid:
        panels.append((axes[2], "rate_floats", "rfid", "latent rate K x d (floats per image)", "rFID (lower is better)"))
    for ax, xk, yk, xl, yl in panels:
        for m in ms:
            sel = [r for r in rows if r.get("flow_minibatches") == m and r.get(xk) is not None and r.get(yk) is not None]
            if not sel:
                continue
            ax.scatter([float(r[xk]) for r in sel], [float(r[yk]) for r in sel], color=colors[m], s=40,
                       label=f"M = {m}" if m is not None else "trials")
            for r in sel:
                if r.get("latent_tokens") is not None:
                    ax.annotate(f"{r['latent_tokens']}x{r['latent_dim']}", (float(r[xk]), float(r[yk])),
                                textcoords="offset points", xytext=(4, 3), fontsize=7)
        if xk == "rate_floats":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="flow mini-batches")
    axes[0].set_title("distortion vs raw latent size")
    axes[1].set_title("distortion vs empirical rate")
    fig.suptitle(title)
    return fig


def plot_tradeoff(rows: Sequence[Mapping], keys: Sequence[str],
                  title: str = "Reconstruction vs generation over the sweep"):
    """Per trial, PSNR (left) and rFID (right) against gFID: the reconstruction/generation trade-off.

    Colour: the first swept key (e.g. loss.w_gen); marker: the combination of the other swept keys
    (e.g. flow.reduction x model.latent_dim). Trials without a gFID are left out."""
    from matplotlib.lines import Line2D

    keys = list(keys)
    rows = [r for r in rows if r.get("gfid") is not None and math.isfinite(float(r["gfid"]))]
    fig, axes = _figure(2)
    first = keys[0] if keys else None
    firsts = sorted({r.get(first) for r in rows}, key=lambda v: (isinstance(v, str), v)) if first else [None]
    colors = dict(zip(firsts, _colors(len(firsts))))
    rest = sorted({tuple(r.get(k) for k in keys[1:]) for r in rows}, key=str)
    markers = dict(zip(rest, "osD^vP*Xh<>p"))
    for ax, metric, label in ((axes[0], "val_psnr", "validation PSNR (dB, higher is better)"),
                              (axes[1], "rfid", "rFID (lower is better)")):
        for r in rows:
            if r.get(metric) is None:
                continue
            ax.scatter(float(r["gfid"]), float(r[metric]), color=colors[r.get(first) if first else None],
                       marker=markers.get(tuple(r.get(k) for k in keys[1:]), "o"), s=46, edgecolors="black",
                       linewidths=0.4)
        ax.set_xlabel("gFID (lower is better)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=f"{first.rsplit('.', 1)[-1]} = {v}")
               for v, c in colors.items()] if first else []
    handles += [Line2D([], [], ls="", marker=m, color="gray",
                       label=", ".join(f"{k.rsplit('.', 1)[-1]} = {v}" for k, v in zip(keys[1:], combo)))
                for combo, m in markers.items() if keys[1:]]
    if handles:
        axes[1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a figure as PNG (parent folders created) and release it."""
    return atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))


def save_and_show(fig, path: str | Path) -> Path:
    """Save `fig` as a PNG at `path`, show it in the notebook running this (IPython) and say where it went."""
    from IPython.display import Image, display

    png = save_figure(fig, path)
    display(Image(filename=str(png)))
    print(f"saved {png}")
    return png
