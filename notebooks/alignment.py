# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Representation alignment: tokenization pass vs denoising pass
#
# The same validation images go through the GE twice: the **tokenization pass** (image patches + noise
# registers -> latent `z0`) and, after the latent is corrupted to `z_t = t z0 + (1 - t) eps`, the
# **denoising pass** (`z_t` alone -> predicted `z0`). Per GE block, the latent-token activations of the two
# passes are mean-pooled and compared with linear CKA and CKNNA (k nearest neighbours). The paper finds
# strong alignment, strongest in the later blocks, and weaker late-block alignment without stop-gradient.
# The cosine similarity between `z0` and the denoised prediction against `t` shows how much of the latent
# the denoiser recovers.
#
# Inputs: `plots/alignment.csv`, `plots/cosine.csv`, `plots/alignment_variants.csv` (the `analyze` stage),
# or the same files from an MLflow run (`source_run_id`). Outputs: PNGs (logged to `mlflow_run_id`).

# %% tags=["parameters"]
alignment_csv = "plots/alignment.csv"
cosine_csv = "plots/cosine.csv"
variants_csv = "plots/alignment_variants.csv"  # ablation checkpoints (may have no rows)
out_dir = "reports/notebooks"
source_run_id = None  # read the plots/*.csv files from this MLflow run's artifacts instead
mlflow_run_id = None  # log the figures to this MLflow run
tracking_uri = None  # MLflow store; default sqlite:///<cwd>/mlflow.db

# %%
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from unite_core.analysis import report


def load_rows(path, artifact, required=True):
    """Rows of a tracked CSV (file or MLflow artifact); [] for a missing optional file."""
    if not source_run_id and not required and not Path(path).is_file():
        return []
    return report.read_tracked_csv(path, artifact, source_run_id, tracking_uri)


align = load_rows(alignment_csv, "plots/alignment.csv")
cosine = load_rows(cosine_csv, "plots/cosine.csv")
variants = load_rows(variants_csv, "plots/alignment_variants.csv", required=False)
summary = report.alignment_summary(align)
layers = sorted({r["layer"] for r in align})
print(f"{len(align)} (t, block) pairs, blocks {layers[0]}..{layers[-1]}, t in {sorted({r['t'] for r in align})}")
print("CKA per block (mean over t):", ", ".join(f"{summary[f'cka_block_{l}']:.3f}" for l in layers))

# %% [markdown]
# ## CKA and CKNNA per GE block

# %%
pngs = []
fig = report.plot_alignment(align)
pngs.append(report.save_and_show(fig, Path(out_dir) / "alignment.png"))

# %% [markdown]
# ## Cosine similarity of the clean latent and the denoised prediction

# %%
fig = report.plot_cosine(cosine)
pngs.append(report.save_and_show(fig, Path(out_dir) / "alignment_cosine.png"))

# %% [markdown]
# ## Ablations (when `unite compare` checkpoints were analysed)
# Mean CKA over the timesteps, per block, one line per model: the main model and each ablation.

# %%
models = {"main": align}
for r in variants:
    models.setdefault(r["model"], []).append(r)
fig = Figure(figsize=(6, 4), layout="constrained")
ax = fig.subplots()
for name, rows in models.items():
    ls = sorted({r["layer"] for r in rows})
    ax.plot(ls, [np.mean([r["cka"] for r in rows if r["layer"] == l]) for l in ls], "o-", label=name)
ax.set_xlabel("GE block (layer index, 0 = first)")
ax.set_ylabel("linear CKA, mean over t (unitless)")
ax.set_title("Tokenization vs denoising alignment per model")
ax.set_ylim(0, 1.02)
ax.set_xticks(layers)
ax.grid(alpha=0.3)
ax.legend(title="checkpoint", fontsize=8)
pngs.append(report.save_and_show(fig, Path(out_dir) / "alignment_variants.png"))
if not variants:
    print("no ablation checkpoints analysed (run `unite compare`, then `unite analyze`)")

# %% [markdown]
# ## Numbers

# %%
result = {
    **{k: v for k, v in summary.items() if k.startswith("cka_") or k.startswith("cknna_")},
    "cosine_by_t": {f"{r['t']:g}": r["cosine_mean"] for r in cosine},
    "variants": sorted(set(models) - {"main"}),
}
print("RESULT " + json.dumps(result))
late = summary.get("cka_late_minus_early")
if late is not None:
    print(f"later blocks align {'more' if late > 0 else 'less'} than earlier ones (late - early CKA = {late:+.3f})")

# %%
if all([report.log_to_run(png, mlflow_run_id, tracking_uri) for png in pngs]) and pngs:
    print(f"logged {len(pngs)} figures to MLflow run {mlflow_run_id}")
