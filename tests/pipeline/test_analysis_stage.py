"""The `analyze` stage on tiny digits checkpoints: every declared out, sane numbers, ablations, options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipelines.context import StageContext
from pipelines.stages import analyze, execute
from tests.conftest import TINY, deep_merge, wake
from unite_core.analysis import report
from unite_core.config import config_from_dict
from unite_core.data import load_prepared, prepare_image_data
from unite_core.train import Trainer

ANALYSIS = {"num_images": 96, "timesteps": [0.3, 0.99], "knn": 5, "probe_max_iter": 300, "entropy_bins": 64}
CSVS = ("alignment.csv", "alignment_variants.csv", "cosine.csv", "probe.csv", "compression.csv",
        "rate_distortion.csv")
PNGS = ("alignment.png", "cosine.png", "probe.png", "compression.png", "rate_distortion.png")


def make_cfg(**sections):
    return config_from_dict(deep_merge(deep_merge(TINY, {"analysis": ANALYSIS}), sections))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root with prepared digits data (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("analyze")
    cfg = make_cfg()
    prepare_image_data(cfg.data, root / "data" / "digits")
    return root


def train_checkpoint(root: Path, cfg, path: Path, steps: int) -> Path:
    data = load_prepared(root / "data" / "digits")
    tr = Trainer(cfg, data.info, data.train, "cpu", val_set=data.val)
    tr.run(until_step=steps)
    return tr.save(path)


def fresh_root(project: Path, tmp_path: Path) -> Path:
    """A project root of its own that shares the prepared data."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(project / "data" / "digits")
    return tmp_path


SWEEP_ROWS = [  # a tiny synthetic sweep table: PSNR grows with K*d, M=1 and M=3 at each size
    {"trial": f"t{i:03d}", "model.latent_tokens": k, "model.latent_dim": d, "flow.minibatches": m,
     "status": "finished", "val_psnr": 10 + 0.1 * k * d + 0.01 * m, "bits_per_image": 3.0 * k * d,
     "rate_floats": k * d}
    for i, (k, d, m) in enumerate([(2, 2, 1), (2, 2, 3), (4, 4, 1), (4, 4, 3)])
]


@pytest.mark.slow
def test_analyze_writes_every_out_with_sane_numbers(project, tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    root = fresh_root(project, tmp_path)
    cfg = make_cfg(train={"steps": 40, "ema_decay": 0.9, "lr": 2e-3, "batch_size": 32})
    train_checkpoint(root, cfg, root / "models" / "unite.pt", 40)
    report.write_csv(SWEEP_ROWS, root / "reports" / "sweep.csv")

    result = execute("analyze", cfg, root)  # the stage runner: MLflow child run + metrics/analyze.json

    for name in CSVS + PNGS:
        assert (root / "plots" / name).is_file() and (root / "plots" / name).stat().st_size > 0, name
    saved = json.loads((root / "metrics" / "analyze.json").read_text())
    assert saved["cka_mean"] == pytest.approx(result["cka_mean"])
    assert not (root / "metrics" / "analysis.json").exists()  # one metrics file per stage

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("unite").experiment_id],
                             filter_string="tags.`unite.stage` = 'analyze'")[0]
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert set(CSVS + PNGS) <= logged
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cka_t0.3")] == [0, 1]  # step = block
    assert run.data.metrics["cka_mean"] == pytest.approx(saved["cka_mean"])
    assert saved["num_images"] == 96 and saved["class_mode"] == "null"

    # alignment: one row per (t, block); CKA in [0, 1], CKNNA in [-1, 1]
    align = report.read_csv(root / "plots" / "alignment.csv")
    assert sorted({(r["t"], r["layer"]) for r in align}) == [(t, l) for t in (0.3, 0.99) for l in (0, 1)]
    for r in align:
        assert 0.0 <= r["cka"] <= 1.0 + 1e-9
        assert -1.0 - 1e-9 <= r["cknna"] <= 1.0 + 1e-9
    assert saved["alignment"]["cka_block_1"] == pytest.approx(
        sum(r["cka"] for r in align if r["layer"] == 1) / 2, rel=1e-9)
    assert report.read_csv(root / "plots" / "alignment_variants.csv") == []  # no ablation checkpoints

    # cosine(z0, x_hat): near 1 close to the clean end, on a grid from 0 to 1
    cosine = {r["t"]: r for r in report.read_csv(root / "plots" / "cosine.csv")}
    assert {0.0, 0.5, 0.99, 1.0} <= set(cosine)
    assert cosine[1.0]["cosine_mean"] > 0.95 and cosine[0.99]["cosine_mean"] > 0.95
    assert all(-1 <= r["cosine_mean"] <= 1 for r in cosine.values())
    assert cosine[0.99]["input_cosine_mean"] > cosine[0.0]["input_cosine_mean"]  # z_t -> z0 as t -> 1
    assert result["cosine_t1"] == pytest.approx(cosine[1.0]["cosine_mean"])

    # probe rows: every block, z0 and the pixel baseline; pixels of digits are easy
    probe = {r["feature"]: r for r in report.read_csv(root / "plots" / "probe.csv")}
    assert set(probe) == {"block_0", "block_1", "z0", "pixels"}
    assert probe["pixels"]["val_accuracy"] > 0.8 > 3 * probe["pixels"]["chance"]
    assert all(0 <= r["val_accuracy"] <= 1 for r in probe.values())
    assert probe["z0"]["num_features"] == 4 * 4  # K * d

    # compression: init vs trained, per group and in total; the GE's total is the sum of its groups
    comp = report.read_csv(root / "plots" / "compression.csv")
    ge = {(r["model"], r["group"]): r for r in comp if r["component"] == "ge"}
    for model in ("init", "trained"):
        groups = [r["total_bits"] for (m, g), r in ge.items() if m == model and g != "total"]
        assert sum(groups) == pytest.approx(ge[(model, "total")]["total_bits"], rel=1e-9)
    assert ge[("init", "attention")]["numel"] == ge[("trained", "attention")]["numel"] > 0
    assert ge[("init", "total")]["total_bits"] != ge[("trained", "total")]["total_bits"]
    assert saved["compression"]["ge_total_bits_init"] == pytest.approx(ge[("init", "total")]["total_bits"])

    # rate-distortion: one point per trial of the sweep table, rate K*d and bits, PSNR
    rd = report.read_csv(root / "plots" / "rate_distortion.csv")
    assert len(rd) == 4 and [r["rate_floats"] for r in rd] == [4, 4, 16, 16]
    assert sorted(r["psnr"] for r in rd) == pytest.approx(sorted(row["val_psnr"] for row in SWEEP_ROWS))
    assert saved["rate_distortion"]["trials"] == 4
    assert saved["rate_distortion"]["spearman_rate_floats_psnr"] > 0.8


def test_probe_on_informative_features_is_far_above_chance(project, tmp_path):
    """A GE whose blocks are live and whose register noise is switched off (what training learns):
    its features carry the image, and the stage's probe must find it (labels and features aligned)."""
    root = fresh_root(project, tmp_path)
    cfg = make_cfg()
    data = load_prepared(root / "data" / "digits")
    tr = Trainer(cfg, data.info, data.train, "cpu")
    wake(tr.model)
    with torch.no_grad():
        tr.model.encoder.latent_in.weight.zero_()
    tr.ema.module.load_state_dict(tr.model.state_dict())
    tr.save(root / "models" / "unite.pt")

    result = analyze.run(StageContext(cfg, root), notebooks=False)

    probe = {r["feature"]: r for r in report.read_csv(root / "plots" / "probe.csv")}
    chance = probe["block_0"]["chance"]
    assert max(probe["block_0"]["val_accuracy"], probe["block_1"]["val_accuracy"]) > chance + 0.4
    assert probe["z0"]["val_accuracy"] > chance + 0.1
    assert result["probe_best_block_accuracy"] == max(probe["block_0"]["val_accuracy"], probe["block_1"]["val_accuracy"])


def test_ablation_checkpoints_are_compared(project, tmp_path):
    root = fresh_root(project, tmp_path)
    cfg = make_cfg(train={"steps": 6, "ema_decay": 0.5, "warmup_steps": 1})
    train_checkpoint(root, cfg, root / "models" / "unite.pt", 6)
    compare = root / "models" / "compare"
    train_checkpoint(root, make_cfg(train={"steps": 6, "ema_decay": 0.5, "warmup_steps": 1},
                                    model={"weight_sharing": "separate"}), compare / "separate_weights-abc.pt", 6)
    train_checkpoint(root, make_cfg(train={"steps": 6, "ema_decay": 0.5, "warmup_steps": 1},
                                    flow={"stop_grad": False}), compare / "no_stop_grad-abc.pt", 6)
    train_checkpoint(root, make_cfg(train={"steps": 6, "ema_decay": 0.5, "warmup_steps": 1},
                                    loss={"decoder_noise": False}), compare / "no_noise_aug-abc.pt", 6)

    result = analyze.run(StageContext(cfg, root))

    variants = report.read_csv(root / "plots" / "alignment_variants.csv")
    assert {r["model"] for r in variants} == {"separate", "no_stop_grad"}  # other ablations are not analysed
    assert len(variants) == 2 * 2 * 2  # models x timesteps x blocks
    assert all(0 <= r["cka"] <= 1 + 1e-9 for r in variants if r["cka"] is not None)
    comp = report.read_csv(root / "plots" / "compression.csv")
    sep = {r["component"] for r in comp if r["model"] == "separate"}
    assert {"ge", "denoiser", "decoder"} <= sep
    c = result["comparisons"]
    assert c["shared_vs_separate"]["reference"] == "main"
    total = c["shared_vs_separate"]["compression"]
    sep_bits = sum(r["total_bits"] for r in comp if r["model"] == "separate" and r["group"] == "total"
                   and r["component"] in ("ge", "denoiser"))
    assert total["total_separate_bits"] == pytest.approx(sep_bits, rel=1e-9)
    assert total["total_separate_bits"] > total["total_shared_bits"]  # two networks cost more than one
    assert "cka_block_1_no_stop_grad" in c["stop_grad_vs_not"]
    assert result["variants"]["separate"]["kind"] == "separate"


def test_bad_options_are_user_errors(project, tmp_path):
    root = fresh_root(project, tmp_path)
    cfg = make_cfg()
    with pytest.raises(analyze.AnalyzeError, match="class mode"):
        analyze.run(StageContext(cfg, root), class_mode="true_label")
    with pytest.raises(analyze.AnalyzeError, match="unknown analyze option"):
        analyze.run(StageContext(cfg, root, options={"layers": 3}))
    from pipelines.stages.analyze import AnalyzeError as AnalyzeOptionError, parse_variants

    assert parse_variants(["separate=models/x.pt"]) == {"separate": Path("models/x.pt")}
    with pytest.raises(AnalyzeOptionError, match="NAME=PATH"):
        parse_variants(["models/x.pt"])
    from unite_core.train import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        analyze.run(StageContext(cfg, root))


def test_rate_distortion_rows_and_spearman():
    rows = report.rate_distortion_rows(SWEEP_ROWS + [{"trial": "t9", "model.latent_tokens": 8, "status": "error"}])
    assert len(rows) == 4  # the trial without a PSNR is left out
    assert report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert report.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(report.spearman([1, 2], [1, 2]))


def test_tradeoff_plot_has_a_point_per_trial_with_gfid():
    from unite_core.analysis.report import plot_tradeoff

    keys = ["loss.w_gen", "flow.reduction", "model.latent_dim"]
    rows = [{"loss.w_gen": w, "flow.reduction": red, "model.latent_dim": d, "gfid": 10.0 / w + d,
             "val_psnr": 20.0 - w, "rfid": 1.0 + w}
            for w in (0.3, 1, 3, 10) for red in ("sum", "mean") for d in (4, 16)]
    rows.append({"loss.w_gen": 1, "flow.reduction": "sum", "model.latent_dim": 4, "gfid": None, "val_psnr": 9.0})
    fig = plot_tradeoff(rows, keys)
    left, right = fig.axes[:2]
    assert sum(len(c.get_offsets()) for c in left.collections) == 16  # the trial without gFID is left out
    assert sorted(float(c.get_offsets()[0][1]) for c in right.collections)[0] == 1.3
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert labels[:4] == ["w_gen = 0.3", "w_gen = 1", "w_gen = 3", "w_gen = 10"] and len(labels) == 4 + 4
