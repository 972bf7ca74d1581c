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
# # Rate-distortion over the latent-size sweep
#
# Each point is one `unite sweep` trial: the latent's **rate** — its raw size K x d (floats per image) and an
# empirical estimate of its information content (entropy of the latent quantised with step 0.1, summed
# over the K x d dimensions, in bits per image) — against its **distortion**: validation PSNR (dB) of the
# reconstructions, and rFID when the sweep computed it. Expected: more capacity, higher PSNR.
#
# Input: `reports/sweep.csv` (written by `unite sweep`), or that file from an MLflow run's artifacts
# (`source_run_id`). Output: a PNG (logged to `mlflow_run_id` when given).

# %% tags=["parameters"]
sweep_csv = "reports/sweep.csv"  # written by `unite sweep` (path relative to the project root)
out_dir = "reports/notebooks"
source_run_id = None  # read reports/sweep.csv from this MLflow run's artifacts instead
mlflow_run_id = None  # log the figure to this MLflow run
tracking_uri = None  # MLflow store; default sqlite:///<cwd>/mlflow.db

# %%
import json
from pathlib import Path


from unite_core.analysis import report


def load_rows(path, artifact):
    """Rows of a tracked CSV: from the file, or from an MLflow run's artifacts when source_run_id is set."""
    return report.read_tracked_csv(path, artifact, source_run_id, tracking_uri)


sweep_rows = load_rows(sweep_csv, "reports/sweep.csv")
rows = report.rate_distortion_rows(sweep_rows)
print(f"{len(sweep_rows)} trials in {source_run_id or sweep_csv}, {len(rows)} with a PSNR")
for r in rows:
    fid = f"   rFID {r['rfid']:.2f}" if r["rfid"] is not None else ""
    bits = f"{r['rate_bits']:7.1f}" if r["rate_bits"] is not None else "      -"
    print(f"  {r['trial']}: K={r['latent_tokens']:>3} d={r['latent_dim']:>3} M={r['flow_minibatches']}  "
          f"rate {r['rate_floats']:5} floats / {bits} bits   PSNR {r['psnr']:6.2f} dB{fid}")

# %% [markdown]
# ## PSNR against rate

# %%
fig = report.plot_rate_distortion(rows)
png = report.save_and_show(fig, Path(out_dir) / "rate_distortion.png")

# %% [markdown]
# ## Does more capacity give higher PSNR?
# Spearman rank correlation between rate and PSNR (1 = PSNR rises with every step up in rate), and the
# mean PSNR per latent size (averaged over the other swept settings, e.g. flow mini-batches M).

# %%
by_size = {}
for r in rows:
    by_size.setdefault(r["rate_floats"], []).append(r["psnr"])
mean_by_size = {int(k): sum(v) / len(v) for k, v in sorted(by_size.items())}
with_bits = [r for r in rows if r["rate_bits"] is not None]
summary = {
    "trials": len(rows),
    "spearman_rate_floats_psnr": report.spearman([r["rate_floats"] for r in rows], [r["psnr"] for r in rows]),
    "spearman_rate_bits_psnr": report.spearman([r["rate_bits"] for r in with_bits], [r["psnr"] for r in with_bits]),
    "best_trial": max(rows, key=lambda r: r["psnr"])["trial"] if rows else None,
    "best_psnr": max(r["psnr"] for r in rows) if rows else None,
    "mean_psnr_by_rate_floats": mean_by_size,
}
print("RESULT " + json.dumps(summary))
sizes = list(mean_by_size)
if len(sizes) >= 2:
    monotone = all(mean_by_size[a] <= mean_by_size[b] for a, b in zip(sizes, sizes[1:]))
    print("mean PSNR by K x d: " + ", ".join(f"{k}: {v:.2f} dB" for k, v in mean_by_size.items()))
    print("more capacity -> higher PSNR:", "yes (monotone in K x d)" if monotone else "not monotone in K x d")

# %%
if report.log_to_run(png, mlflow_run_id, tracking_uri):
    print(f"logged {png.name} to MLflow run {mlflow_run_id}")
