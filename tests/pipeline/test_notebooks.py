"""The analysis notebooks (notebooks/*.py, jupytext percent format) execute with papermill on small tracked
outputs, write their PNGs, print the numbers of the CSVs, and log to MLflow when given a run."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from unite_core.analysis import report
from unite_core.analysis.notebooks import NOTEBOOKS, execute_notebook, notebook_dir, notebook_parameters

REPO = Path(__file__).resolve().parents[2]

PROBE = [
    {"feature": "block_0", "layer": 0, "val_accuracy": 0.42, "train_accuracy": 0.55, "chance": 0.11,
     "uniform_chance": 0.1, "num_features": 64},
    {"feature": "block_1", "layer": 1, "val_accuracy": 0.61, "train_accuracy": 0.70, "chance": 0.11,
     "uniform_chance": 0.1, "num_features": 64},
    {"feature": "z0", "layer": 2, "val_accuracy": 0.37, "train_accuracy": 0.40, "chance": 0.11,
     "uniform_chance": 0.1, "num_features": 16},
    {"feature": "pixels", "layer": -1, "val_accuracy": 0.93, "train_accuracy": 1.0, "chance": 0.11,
     "uniform_chance": 0.1, "num_features": 64},
]
ALIGN = [{"t": t, "layer": l, "cka": 0.2 + 0.3 * l + 0.1 * t, "cknna": 0.1 + 0.2 * l} for t in (0.3, 0.9) for l in (0, 1, 2)]
VARIANTS = [{"model": "no_stop_grad", "t": t, "layer": l, "cka": 0.2 + 0.1 * l, "cknna": 0.1} for t in (0.3, 0.9)
            for l in (0, 1, 2)]
COSINE = [{"t": t, "cosine_mean": 0.5 + 0.5 * t, "cosine_std": 0.05, "input_cosine_mean": 0.3 + 0.7 * t}
          for t in (0.0, 0.5, 1.0)]
SWEEP = [
    {"trial": f"t{i:03d}", "model.latent_tokens": k, "model.latent_dim": d, "flow.minibatches": m, "status": "finished",
     "val_psnr": p, "bits_per_image": b, "rate_floats": k * d, "rfid": f}
    for i, (k, d, m, p, b, f) in enumerate([(4, 4, 1, 12.0, 40.0, 30.0), (4, 4, 3, 12.5, 42.0, 28.0),
                                            (16, 16, 1, 18.0, 600.0, 9.0), (16, 16, 3, 18.4, 610.0, 8.5)])
]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """A project root holding only the tracked outputs the notebooks read."""
    root = tmp_path_factory.mktemp("nbroot")
    report.write_csv(PROBE, root / "plots" / "probe.csv", report.PROBE_COLUMNS)
    report.write_csv(ALIGN, root / "plots" / "alignment.csv", report.ALIGNMENT_COLUMNS)
    report.write_csv(VARIANTS, root / "plots" / "alignment_variants.csv", ("model",) + report.ALIGNMENT_COLUMNS)
    report.write_csv(COSINE, root / "plots" / "cosine.csv", report.COSINE_COLUMNS)
    report.write_csv(SWEEP, root / "reports" / "sweep.csv")
    return root


def run_notebook(name: str, root: Path, out: Path, **params) -> tuple[dict, nbformat.NotebookNode]:
    parameters = {**notebook_parameters(name, root, out), **params}
    executed = execute_notebook(notebook_dir(REPO) / f"{name}.py", out / f"{name}.ipynb", parameters, root)
    nb = nbformat.read(executed, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, text
    return json.loads(lines[0].removeprefix("RESULT ")), nb


def check_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def figures_in(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))


def test_every_notebook_is_a_parameterised_jupytext_file():
    import jupytext

    for name in NOTEBOOKS:
        nb = jupytext.read(notebook_dir(REPO) / f"{name}.py")
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        assert "out_dir" in tagged[0].source and "mlflow_run_id" in tagged[0].source


@pytest.mark.slow  # papermill runs the notebook in a kernel
def test_linear_probe_notebook_matches_csv_and_logs_to_mlflow(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("nb", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    # the CSV is read back from the run's artifacts (source_run_id), not from the path given
    client.log_artifact(run.info.run_id, str(tracked / "plots" / "probe.csv"), "plots")

    res, nb = run_notebook("linear_probe", tracked, tmp_path / "out", probe_csv="/nonexistent.csv",
                           source_run_id=run.info.run_id, mlflow_run_id=run.info.run_id, tracking_uri=uri)

    assert res["best_block"] == 1 and res["best_block_val_accuracy"] == pytest.approx(0.61)
    assert res["z0_val_accuracy"] == pytest.approx(0.37) and res["chance"] == pytest.approx(0.11)
    assert res["val_accuracy_by_feature"] == pytest.approx({r["feature"]: r["val_accuracy"] for r in PROBE})
    check_png(tmp_path / "out" / "linear_probe.png")
    assert figures_in(nb) == 1
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "notebooks")]
    assert logged == ["notebooks/linear_probe.png"]


@pytest.mark.slow  # papermill runs the notebook in a kernel
def test_rate_distortion_notebook_matches_csv(tracked, tmp_path):
    res, nb = run_notebook("rate_distortion", tracked, tmp_path)
    assert res["trials"] == 4
    assert res["best_trial"] == "t003" and res["best_psnr"] == pytest.approx(18.4)
    assert res["mean_psnr_by_rate_floats"] == pytest.approx({"16": 12.25, "256": 18.2})
    assert res["spearman_rate_floats_psnr"] == pytest.approx(
        report.spearman([r["rate_floats"] for r in SWEEP], [r["val_psnr"] for r in SWEEP]))
    assert res["spearman_rate_bits_psnr"] == pytest.approx(1.0)
    check_png(tmp_path / "rate_distortion.png")
    assert figures_in(nb) == 1
    text = json.dumps(nb.cells[-2].outputs)
    assert "more capacity -> higher PSNR: yes" in text


@pytest.mark.slow  # papermill runs the notebook in a kernel
def test_alignment_notebook_matches_csv(tracked, tmp_path):
    res, nb = run_notebook("alignment", tracked, tmp_path)
    for layer in (0, 1, 2):
        want = sum(r["cka"] for r in ALIGN if r["layer"] == layer) / 2
        assert res[f"cka_block_{layer}"] == pytest.approx(want)
    assert res["cka_late_minus_early"] == pytest.approx(0.6)
    assert res["cosine_by_t"] == pytest.approx({"0": 0.5, "0.5": 0.75, "1": 1.0})
    assert res["variants"] == ["no_stop_grad"]
    for png in ("alignment.png", "alignment_cosine.png", "alignment_variants.png"):
        check_png(tmp_path / png)
    assert figures_in(nb) == 3


@pytest.mark.slow  # papermill runs two notebooks in kernels
def test_execute_notebooks_skips_rate_distortion_without_a_sweep(tracked, tmp_path):
    from unite_core.analysis.notebooks import execute_notebooks

    root = tmp_path / "project"
    (root / "plots").mkdir(parents=True)
    for name in ("probe.csv", "alignment.csv", "alignment_variants.csv", "cosine.csv"):
        (root / "plots" / name).write_bytes((tracked / "plots" / name).read_bytes())
    files = execute_notebooks(root, root / "reports" / "notebooks")
    assert [p.name for p in files if p.suffix == ".ipynb"] == ["linear_probe.ipynb", "alignment.ipynb"]
    assert {"linear_probe.png"} <= {p.name for p in files if p.suffix == ".png"}
    assert not (root / "reports" / "notebooks" / "rate_distortion.ipynb").exists()
