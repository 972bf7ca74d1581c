"""`dvc repro` end to end in a copy of the repository, what it leaves in MLflow and its UI, and two
`dvc exp run` experiments compared with `dvc exp show`, `dvc metrics diff` and `dvc plots diff`.

One module-scoped run of the whole pipeline (`unite preset digits_tiny`: 8x8 digits, 40 in-process
training steps) feeds every test here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.ray_fixtures import (active_runs, copy_repo, mlflow_client, read_json, subprocess_env,
                                tiny_params)

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")
GIT_USER = ["-c", "user.name=unite tests", "-c", "user.email=tests@unite.invalid"]
# stages whose code is written elsewhere: present in dvc.yaml, run here when this build has them
OPTIONAL_STAGES = ("classifier", "evaluate", "analyze")


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *GIT_USER, *args], cwd=root, check=True, capture_output=True)


def dvc(root: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([DVC, *args], cwd=root, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - t0


def available(stage: str) -> bool:
    return importlib.util.find_spec(f"pipelines.stages.{stage}") is not None


def declared_outputs(root: Path) -> dict[str, list[Path]]:
    """Every out, metric and plot file of every stage of the root dvc.yaml, as DVC resolves them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.name: [Path(out.fs_path) for out in stage.outs] for stage in repo.index.stages
                if Path(stage.path).resolve() == (root / "dvc.yaml").resolve()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("repo"))
    made = subprocess.run([str(Path(sys.executable).parent / "unite"), "preset", "digits_tiny"], cwd=root,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)  # as README says
    assert made.returncode == 0, made.stderr
    assert yaml.safe_load((root / "params.yaml").read_text()) == tiny_params()
    missing = [s for s in OPTIONAL_STAGES if not available(s)]
    if missing:  # a build without some stages: test the rest, and say so
        spec = yaml.safe_load((root / "dvc.yaml").read_text())
        for name in missing:
            spec["stages"].pop(name)
        (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        print(f"note: stages {missing} are not in this build; testing dvc.yaml without them")
    git(root, "init", "-q")
    if not (root / ".dvc").is_dir():
        dvc(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "pipeline test")
    first, first_s = dvc(root, "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    second, second_s = dvc(root, "repro")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    print(f"dvc repro: first {first_s:.1f} s, second (nothing changed) {second_s:.1f} s")
    return {"root": root, "first": first, "second": second, "first_s": first_s, "second_s": second_s,
            "stages": list(declared_outputs(root)), "outputs": declared_outputs(root), "missing": missing}


def test_repro_runs_every_stage_and_writes_every_declared_output(pipeline):
    root, out = pipeline["root"], pipeline["first"].stdout
    assert pipeline["stages"][:1] == ["prepare"] and "train" in pipeline["stages"]
    for stage in pipeline["stages"]:
        assert f"Running stage '{stage}'" in out, stage
    assert "experiments/dvc.yaml" not in out  # compare and sweep are not part of a plain `dvc repro`
    for stage, paths in pipeline["outputs"].items():
        for path in paths:
            assert path.exists(), f"{stage}: declared output {path.relative_to(root)} missing"
            if path.is_dir():
                assert any(path.iterdir()), path
            else:
                assert path.stat().st_size > 0, path
    train = read_json(root / "metrics" / "train.json")
    assert train["steps"] == 40 and train["trained_now"] and train["workers"] == 0
    prepare = read_json(root / "metrics" / "prepare.json")
    assert (prepare["num_train"], prepare["num_val"]) == (1617, 180)
    curve = (root / "plots" / "train_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,time_s,loss,recon,flow,lr,val_psnr") and len(curve) == 1 + 40 // 5
    assert (root / "dvc.lock").is_file()


def test_metrics_and_plots_are_tracked_by_git_and_dvc_metrics_show_has_no_warning(pipeline):
    """metrics/ and plots/ are outputs git sees (so experiments and commits carry them); after a
    fresh repro `dvc metrics show` lists every stage's metrics and says nothing on stderr, although
    the stages of experiments/dvc.yaml have not run (their committed metrics files are `{}`)."""
    root = pipeline["root"]
    ignored = subprocess.run(["git", "check-ignore", "metrics/train.json", "plots/train_curve.csv",
                              "plots/samples.png"], cwd=root, capture_output=True, text=True)
    assert ignored.stdout.strip() == "", ignored.stdout
    shown, _ = dvc(root, "metrics", "show", "--json")
    assert shown.returncode == 0 and shown.stderr.strip() == "", shown.stderr
    plain, _ = dvc(root, "metrics", "show")
    assert plain.returncode == 0 and plain.stderr.strip() == "", plain.stderr
    assert "metrics/train.json" in plain.stdout and "final_loss" in plain.stdout


def test_second_repro_does_nothing(pipeline):
    out = pipeline["second"].stdout
    assert "Running stage" not in out
    for stage in pipeline["stages"]:
        assert f"Stage '{stage}' didn't change, skipping" in out, stage
    assert "Data and pipelines are up to date." in out
    # target on this 2-core machine: <= 10 s (measured ~2.5 s); the margin covers a loaded machine
    assert pipeline["second_s"] < 30


def test_mlflow_has_one_parent_run_with_a_child_per_stage(pipeline):
    root = pipeline["root"]
    runs = active_runs(root)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("pipeline-")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(pipeline["stages"])
    assert all(r.info.status == "FINISHED" for r in runs)

    (train,) = [r for r in children if r.info.run_name == "train"]
    params = train.data.params  # the whole params file, flattened
    assert params["train.lr"] == "0.002" and params["model.latent_tokens"] == "4"
    assert params["data.dataset"] == "digits" and params["train.steps"] == "40"
    assert params["eval.cfg_scales"] == "[1.0, 2.0]"
    assert parents[0].data.params == params

    client = mlflow_client(root)
    for key in ("loss", "recon", "flow", "lr"):
        history = client.get_metric_history(train.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(5, 41, 5)), key
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val_psnr")] == [20, 40]
    assert train.data.metrics["final_loss"] > 0 and train.data.metrics["samples_per_s"] > 0

    artifacts = {a.path for a in client.list_artifacts(train.info.run_id, "images")}
    assert artifacts == {"images/train_reconstructions.png"}
    local = client.download_artifacts(train.info.run_id, "images/train_reconstructions.png", str(root / "dl"))
    from PIL import Image

    with Image.open(local) as img:  # 10 digits above their reconstructions, upscaled 8x
        assert img.format == "PNG" and img.width > img.height * 4
    # the trained model is an MLflow model (not a second copy of the checkpoint file)
    assert "model" not in {a.path for a in client.list_artifacts(train.info.run_id)}
    (logged,) = client.get_run(train.info.run_id).outputs.model_outputs
    assert client.get_logged_model(logged.model_id).name == "model" and logged.step == 40
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    for run in runs:
        assert run.data.tags["mlflow.source.git.commit"] == head
        assert run.data.tags["unite.params_hash"] == run.data.tags["unite.pipeline"]
    assert "plots/train_curve.csv" in {a.path for a in client.list_artifacts(train.info.run_id, "plots")}
    assert "metrics/train.json" in {a.path for a in client.list_artifacts(train.info.run_id, "metrics")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_unite_ui_serves_a_page_listing_the_run(pipeline):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    root = pipeline["root"]
    (parent,) = [r for r in active_runs(root) if "mlflow.parentRunId" not in r.data.tags]
    port = _free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "unite"), "ui", "--port", str(port)], cwd=root,
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert ui.poll() is None, ui.stderr.read()[-2000:]
            assert time.time() < deadline, "the MLflow UI did not answer within 120 s"
            time.sleep(1)
        # MLflow 3 opens an experiment on its "Overview" tab; the runs table is the /runs route
        url = f"http://127.0.0.1:{port}/#/experiments/{parent.info.experiment_id}/runs"
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--virtual-time-budget=15000", "--dump-dom", url],
                capture_output=True, text=True, timeout=180,
            ).stdout
        assert parent.info.run_name in dom, re.sub(r"\s+", " ", dom)[:2000]
    finally:
        ui.terminate()
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui.kill()
    assert ui.returncode == 0
    with pytest.raises(OSError):  # stopping `unite ui` stopped the MLflow server it started
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)


def test_dvc_exp_run_with_a_changed_param_retrains(pipeline):
    """Last in this module: it applies the experiment's results to the workspace."""
    root = pipeline["root"]
    before = read_json(root / "metrics" / "train.json")
    proc, seconds = dvc(root, "exp", "run", "-S", "train.lr=0.001", "-n", "lr-test")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Running stage 'train'" in proc.stdout and "Stage 'prepare' didn't change" in proc.stdout
    after = read_json(root / "metrics" / "train.json")
    assert after["trained_now"] and after["run_name"].startswith("unite-lr-test-")
    assert after["run_name"] != before["run_name"] and after["final_loss"] != before["final_loss"]
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["lr"] == 0.001
    names = {r.info.run_name for r in active_runs(root) if "mlflow.parentRunId" not in r.data.tags}
    assert "pipeline-lr-test" in names
    print(f"dvc exp run -S train.lr=0.001: {seconds:.1f} s")


def test_two_experiments_compare_in_exp_show_metrics_diff_and_plots_diff(pipeline):
    """After the one above: a second experiment; `dvc exp show --json` holds both experiments'
    metrics (read from the experiments' commits: metrics/ is tracked by git), and `dvc metrics diff`
    and `dvc plots diff` between them show their differences."""
    root = pipeline["root"]
    proc, seconds = dvc(root, "exp", "run", "-S", "train.lr=0.003", "-n", "lr-test2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"dvc exp run -S train.lr=0.003: {seconds:.1f} s")

    shown, _ = dvc(root, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    experiments = {}
    for baseline in json.loads(shown.stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                experiments[rev["name"]] = rev["data"]
    assert {"lr-test", "lr-test2"} <= set(experiments)
    losses = {}
    for name in ("lr-test", "lr-test2"):
        metrics = experiments[name]["metrics"]
        for path in ("metrics/prepare.json", "metrics/train.json", "metrics/evaluate.json"):
            if path == "metrics/evaluate.json" and "evaluate" in pipeline["missing"]:
                continue
            assert "error" not in metrics[path] and metrics[path]["data"], (name, path)
        losses[name] = metrics["metrics/train.json"]["data"]["final_loss"]
        assert experiments[name]["params"]["params.yaml"]["data"]["train"]["lr"] == \
            {"lr-test": 0.001, "lr-test2": 0.003}[name]
    assert losses["lr-test"] != losses["lr-test2"]

    diff, _ = dvc(root, "metrics", "diff", "lr-test", "lr-test2", "--json")
    assert diff.returncode == 0 and diff.stderr.strip() == "", diff.stderr
    train = json.loads(diff.stdout)["metrics/train.json"]
    assert train["final_loss"]["old"] == losses["lr-test"] and train["final_loss"]["new"] == losses["lr-test2"]
    text, _ = dvc(root, "metrics", "diff", "lr-test", "lr-test2")
    assert "final_loss" in text.stdout

    plots, _ = dvc(root, "plots", "diff", "lr-test", "lr-test2", "--json")
    assert plots.returncode == 0, plots.stderr[-3000:]
    (curve,) = json.loads(plots.stdout)["data"]["train_losses"]
    assert curve["revisions"] == ["lr-test", "lr-test2"]
    revs = {row["rev"] for row in curve["content"]["data"]["values"]}
    assert revs == {"lr-test", "lr-test2"}
