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
# # Linear probe of the Generative Encoder's features
#
# A logistic-regression probe (standardised features, scikit-learn) trained on the GE's tokenization-pass
# activations of training images, mean-pooled over the K latent tokens, one probe per GE block, plus one on
# the latent `z0` itself and one on raw pixels as a baseline; accuracy on validation images. The paper
# reports ~30% on ImageNet (comparable to VAE latents) and calls it a limitation.
#
# Input: `plots/probe.csv`, written by the `analyze` stage (`unite analyze` / `dvc repro analyze`), or the
# same file from an MLflow run's artifacts (`source_run_id`). Output: a PNG (and, with `mlflow_run_id`,
# the PNG logged to that run). Run it with papermill, or `unite analyze --notebooks`.

# %% tags=["parameters"]
probe_csv = "plots/probe.csv"  # the analyze stage's table (path relative to the project root)
out_dir = "reports/notebooks"  # where the PNG goes
source_run_id = None  # read plots/probe.csv from this MLflow run's artifacts instead of probe_csv
mlflow_run_id = None  # log the figure to this MLflow run
tracking_uri = None  # MLflow store; default sqlite:///<cwd>/mlflow.db

# %%
import json
from pathlib import Path


from unite_core.analysis import report


def load_rows(path, artifact):
    """Rows of a tracked CSV: from the file, or from an MLflow run's artifacts when source_run_id is set."""
    return report.read_tracked_csv(path, artifact, source_run_id, tracking_uri)


rows = load_rows(probe_csv, "plots/probe.csv")
print(f"{len(rows)} probes from {source_run_id or probe_csv}")
for r in rows:
    print(f"  {r['feature']:>10}  val {100 * r['val_accuracy']:5.1f}%   train {100 * r['train_accuracy']:5.1f}%"
          f"   ({r['num_features']} features)")

# %% [markdown]
# ## Accuracy per block

# %%
fig = report.plot_probe(rows)
png = report.save_and_show(fig, Path(out_dir) / "linear_probe.png")

# %% [markdown]
# ## Numbers
# One JSON line (the tests compare it with the CSV): the best block, its accuracy, the latent's and
# the chance level (majority class of the validation images).

# %%
blocks = [r for r in rows if str(r["feature"]).startswith("block_")]
best = max(blocks, key=lambda r: r["val_accuracy"])
by_feature = {r["feature"]: r for r in rows}
summary = {
    "best_block": best["layer"],
    "best_block_val_accuracy": best["val_accuracy"],
    "z0_val_accuracy": by_feature["z0"]["val_accuracy"],
    "pixels_val_accuracy": by_feature["pixels"]["val_accuracy"] if "pixels" in by_feature else None,
    "chance": best["chance"],
    "val_accuracy_by_feature": {r["feature"]: r["val_accuracy"] for r in rows},
}
print("RESULT " + json.dumps(summary))
print(f"best GE block: {best['layer']} at {100 * best['val_accuracy']:.1f}% "
      f"(z0 {100 * summary['z0_val_accuracy']:.1f}%, chance {100 * summary['chance']:.1f}%)")

# %%
if report.log_to_run(png, mlflow_run_id, tracking_uri):
    print(f"logged {png.name} to MLflow run {mlflow_run_id}")
