"""Evaluation: unite_core.eval_images, the classifier/evaluate stages, `unite compare` and their commands.

Everything runs on sklearn's 8x8 digits (1617 train / 180 val) with tiny models and a 200-step feature
classifier (val accuracy ~0.96).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, deep_merge
from tests.ray_fixtures import ray_cluster  # noqa: F401 (fixture)
from unite_core import ablations
from unite_core.analysis import claims
from unite_core.config import ConfigError, DataConfig, config_from_dict
from unite_core.data import load_image_data, prepare_image_data
from unite_core.eval_images import (
    CURVE_KEYS,
    FeatureSpec,
    LocalRunner,
    dataset_images,
    evaluate_generation,
    evaluate_reconstruction,
    fid_noise,
    generate_balanced,
    noise_floor,
    sample_noise,
)
from unite_core.metrics.images import (
    MetricsError,
    conditional_accuracy,
    reference_cache_name,
    register_own_extractor,
    save_classifier,
    train_feature_classifier,
)
from unite_core.pictures import class_grid, image_grid, pairs_grid
from unite_core.train import Trainer

# measured (seed 0, 200-step classifier): FID self 0.0, val-vs-train 0.49, noise(300)-vs-train ~65
FID_VAL_TRAIN_MAX = 3.0
FID_NOISE_MIN = 20.0


@pytest.fixture(scope="module")
def digits():
    return load_image_data(DataConfig(dataset="digits", image_size=8))


@pytest.fixture(scope="module")
def images(digits):
    tx, ty = dataset_images(digits.train)
    vx, vy = dataset_images(digits.val)
    return tx, ty, vx, vy


@pytest.fixture(scope="module")
def classifier(images):
    torch.set_num_threads(1)
    tx, ty, vx, vy = images
    model, _ = train_feature_classifier(tx, ty, vx, vy, steps=200, batch_size=64, seed=0)
    return model


def tiny_config(**sections):
    return config_from_dict(deep_merge(TINY, sections))


@pytest.fixture(scope="module")
def trained_model(digits):
    """A tiny UNITE trained for 80 steps (EMA weights): enough for guidance to change the samples."""
    torch.set_num_threads(1)
    cfg = tiny_config(train={"steps": 80, "batch_size": 32, "lr": 2e-3, "warmup_steps": 5, "log_every": 80,
                             "eval_every": 80, "checkpoint_every": 80, "ema_decay": 0.9, "precision": "bf16"})
    tr = Trainer(cfg, digits.info, digits.train)
    tr.run()
    return tr.ema.module.eval(), cfg


# ----------------------------------------------------------------------------------------------
# Library
# ----------------------------------------------------------------------------------------------
def test_dataset_images_are_unit_range_with_labels(images, digits):
    tx, ty, vx, vy = images
    assert tx.shape == (len(digits.train), 1, 8, 8) and vx.shape[0] == len(digits.val)
    assert float(tx.min()) == 0.0 and float(tx.max()) == 1.0
    assert ty.dtype == torch.int64 and set(ty.tolist()) == set(range(10))


def test_fid_sanity_self_val_noise(images, classifier, tmp_path):
    tx, _, vx, _ = images
    spec = FeatureSpec(classifier=classifier, cache_dir=str(tmp_path))
    self_fid = noise_floor(vx, vx, features=spec)
    val_train = noise_floor(tx, vx, features=spec)
    noise = fid_noise(tx, features=spec, n=300)
    assert abs(self_fid) < 1e-3
    assert 0.0 < val_train < FID_VAL_TRAIN_MAX
    assert noise > FID_NOISE_MIN and noise > 10 * val_train


def test_reference_statistics_cached_under_data_and_extractor_hash(images, classifier, tmp_path):
    tx, _, vx, _ = images
    spec = FeatureSpec(classifier=classifier, cache_dir=str(tmp_path))
    first = noise_floor(tx, vx, features=spec)
    name = reference_cache_name(tx, register_own_extractor(classifier))
    assert any(name in p.name for p in tmp_path.rglob("*")), "reference statistics were not cached"
    assert noise_floor(tx, vx, features=spec) == pytest.approx(first, rel=1e-9)  # read back from the cache
    changed = tx.clone()
    changed[0, 0, 0, 0] = 1.0 - changed[0, 0, 0, 0]
    other = reference_cache_name(changed, register_own_extractor(classifier))
    assert other != name
    noise_floor(changed, vx, features=spec)
    assert any(other in p.name for p in tmp_path.rglob("*"))


def test_conditional_accuracy_of_real_images_is_near_one(images, classifier):
    _, _, vx, vy = images
    assert conditional_accuracy(classifier, vx, vy) >= 0.9
    wrong = (vy + 1) % 10
    assert conditional_accuracy(classifier, vx, wrong) < 0.2


def test_generate_balanced_labels_range_and_seed(trained_model):
    model, cfg = trained_model
    images, labels = generate_balanced(model, 30, sample_cfg=cfg.sample, cfg_scale=2.0, batch_size=16, seed=3)
    assert images.shape == (30, 1, 8, 8)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10
    again, _ = generate_balanced(model, 30, sample_cfg=cfg.sample, cfg_scale=2.0, batch_size=16, seed=3)
    other, _ = generate_balanced(model, 30, sample_cfg=cfg.sample, cfg_scale=2.0, batch_size=16, seed=4)
    assert torch.equal(images, again)
    assert not torch.equal(images, other)
    assert model.training is False


def test_guidance_curve_one_row_per_scale_and_best_is_argmin(trained_model, images, classifier):
    model, cfg = trained_model
    tx = images[0]
    scales = [1.0, 2.5, 4.0]
    seen = []
    result = evaluate_generation(model, tx, classifier, cfg_scales=scales, n=40, sample_cfg=cfg.sample,
                                 batch_size=40, keep_samples=True, on_scale=seen.append)
    curve = result["curve"]
    assert [r["cfg_scale"] for r in curve] == scales and len(seen) == 3
    for row in curve:
        assert set(row) == set(CURVE_KEYS)
        assert row["fid"] > 0 and 0.0 <= row["conditional_accuracy"] <= 1.0 and row["seconds"] > 0
        assert 0.0 <= row["precision"] <= 1.0 and row["isc_mean"] >= 1.0
    assert len({round(r["fid"], 6) for r in curve}) == 3, "guidance scale did not change the samples"
    assert result["best"] == min(curve, key=lambda r: r["fid"])
    assert result["samples"].shape == (40, 1, 8, 8) and result["labels"].shape == (40,)


def test_sharded_generation_gives_the_single_process_images(trained_model):
    model, cfg = trained_model
    kw = dict(sample_cfg=cfg.sample, cfg_scale=2.0, batch_size=8, seed=3)
    whole, labels = generate_balanced(model, 30, **kw)
    s0, l0 = generate_balanced(model, 30, shard=0, num_shards=2, **kw)
    s1, l1 = generate_balanced(model, 30, shard=1, num_shards=2, **kw)
    # batches of 8 alternate between the shards: 0 holds [0, 8) and [16, 24), 1 holds [8, 16) and [24, 30)
    assert len(s0) == 16 and len(s1) == 14
    assert torch.equal(torch.cat([s0[:8], s1[:8], s0[8:], s1[8:]]), whole)
    assert torch.equal(torch.cat([l0[:8], l1[:8], l0[8:], l1[8:]]), labels)
    # a sample's starting noise is its own: the same whichever batch or shard draws it
    assert torch.equal(sample_noise(torch.arange(5, 9), (4, 4), 3), sample_noise(torch.arange(30), (4, 4), 3)[5:9])
    assert not torch.equal(sample_noise(torch.arange(4), (4, 4), 3), sample_noise(torch.arange(4), (4, 4), 4))


def test_sharded_guidance_sweep_equals_single_process(trained_model, images, classifier):
    """Two shards, run one after the other and merged as the Ray runner merges workers, give the metrics and the
    kept images of one process; KID/PRC over a kept subset (25 of 40) that does not depend on the sharding."""
    model, cfg = trained_model
    spec = FeatureSpec(classifier=classifier, subset_size=25, kid_subset_size=20)
    kw = dict(cfg_scales=[1.0, 3.0], n=40, sample_cfg=cfg.sample, batch_size=8, features=spec,
              keep_indices=[0, 9, 39])
    one = evaluate_generation(model, images[0], **kw)
    two = evaluate_generation(model, images[0], runner=LocalRunner(model, spec.net(), classifier=classifier,
                                                                   num_shards=2), **kw)
    for a, b in zip(one["curve"], two["curve"]):
        for k in ("fid", "kid_mean", "precision", "recall", "isc_mean", "conditional_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-9), k
    assert one["curve"][0]["fid"] != pytest.approx(one["curve"][1]["fid"], rel=1e-6)  # the scale changed the samples
    assert one["sample_index"].tolist() == [0, 9, 39] and torch.equal(one["samples"], two["samples"])


@pytest.mark.slow
def test_ray_workers_generate_what_one_process_generates(ray_cluster, trained_model, images, classifier):
    """Two Ray actors (one shard each) against this process: same kept images, same metrics."""
    from pipelines.evaluation import RayGenerationRunner, use_ray

    model, cfg = trained_model
    run_cfg = tiny_config(distributed={"num_workers": 2, "cpus_per_worker": 1.0}, eval={"parallel": "auto"})
    assert use_ray(run_cfg) and not use_ray(tiny_config(distributed={"num_workers": 1}))
    spec = FeatureSpec(classifier=classifier)
    kw = dict(cfg_scales=[2.0], n=40, sample_cfg=cfg.sample, batch_size=8, features=spec, keep_samples=True)
    runner = RayGenerationRunner(run_cfg, model, spec)
    try:
        via_ray = evaluate_generation(model, images[0], runner=runner, **kw)
    finally:
        runner.close()
    torch.set_num_threads(1)  # the workers' thread count: the same kernels, the same bits
    local = evaluate_generation(model, images[0], **kw)
    assert torch.equal(via_ray["samples"], local["samples"]) and len(local["samples"]) == 40
    for k in ("fid", "kid_mean", "precision", "recall", "isc_mean", "conditional_accuracy"):
        assert via_ray["best"][k] == pytest.approx(local["best"][k], rel=1e-9), k


def test_eval_config_checks_reference_stats_and_feature_subset():
    with pytest.raises(ConfigError, match=r"eval\.reference_stats=stats\.pt must be an \.npz"):
        tiny_config(eval={"reference_stats": "stats.pt"})
    with pytest.raises(ConfigError, match=r"eval\.kid_subset_size=600 exceeds eval\.feature_subset=500"):
        tiny_config(eval={"kid_subset_size": 600, "feature_subset": 500})
    with pytest.raises(ConfigError, match="eval.parallel"):
        tiny_config(eval={"parallel": "gpu"})


def test_evaluate_reconstruction_metrics(trained_model, images, classifier):
    model, _ = trained_model
    vx = images[2]
    rec = evaluate_reconstruction(model, vx, classifier, keep=12)
    assert set(rec) >= {"rfid", "psnr", "ssim"}
    assert rec["rfid"] > 0 and 5.0 < rec["psnr"] < 100.0 and -1.0 <= rec["ssim"] <= 1.0
    assert rec["originals"].shape == rec["reconstructions"].shape == (12, 1, 8, 8)
    assert torch.equal(rec["originals"][0], vx[0]) and torch.equal(rec["originals"][-1], vx[-1])


def test_own_extractor_needs_classifier(images):
    tx, _, vx, _ = images
    with pytest.raises(MetricsError, match="classifier"):
        noise_floor(tx, vx, classifier=None)


def test_grids_have_expected_size():
    imgs = torch.rand(23, 1, 8, 8)
    g = image_grid(imgs, nrow=10, padding=2)
    assert g.size == (10 * 8 + 11 * 2, 3 * 8 + 4 * 2) and g.mode == "L"
    rgb = image_grid(torch.rand(4, 3, 8, 8), nrow=2)
    assert rgb.mode == "RGB" and rgb.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    p = pairs_grid(imgs[:15], imgs[:15], ncol=10)
    assert p.size[1] == 4 * 8 + 5 * 2  # two pairs of rows
    labels = torch.arange(23) % 10
    c = class_grid(imgs, labels, per_class=5)
    assert c.size == (5 * 8 + 6 * 2, 10 * 8 + 11 * 2)


# ----------------------------------------------------------------------------------------------
# Stages and commands
# ----------------------------------------------------------------------------------------------
class RecordingTracker:
    def __init__(self):
        self.calls = []

    def log_params(self, params):
        self.calls.append(("params", params))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", dict(metrics), step))

    def log_artifact(self, path, artifact_path=None):
        assert Path(path).is_file()
        self.calls.append(("artifact", Path(path).name))

    def log_image(self, image, name):
        self.calls.append(("image", name, image.size))

    def log_dict(self, data, name):
        json.dumps(data)
        self.calls.append(("dict", name))

    def set_tags(self, tags):
        pass

    def names(self, kind):
        return [c[1] for c in self.calls if c[0] == kind]


STAGE_SECTIONS = {
    "eval": {"num_samples": 20, "batch_size": 20, "cfg_scales": [1.0, 2.0], "classifier_steps": 60,
             "kid_subset_size": 10},
    "train": {"steps": 20, "log_every": 10, "eval_every": 20, "checkpoint_every": 20, "device": "cpu"},
    "tracking": {"enabled": False},
}


@pytest.fixture
def project(tmp_path, digits):
    """A project root with prepared digits and a tiny trained checkpoint at models/unite.pt."""
    from pipelines.context import StageContext

    cfg = tiny_config(**STAGE_SECTIONS)
    prepare_image_data(cfg.data, tmp_path / "data" / "digits")
    ctx = StageContext(cfg, tmp_path, RecordingTracker())
    tr = Trainer(cfg, digits.info, digits.train)
    tr.run(checkpoint_path=ctx.paths.checkpoint)
    return ctx


def test_classifier_and_evaluate_stages_write_every_declared_file(project):
    from pipelines.stages import classifier as classifier_stage
    from pipelines.stages import evaluate as evaluate_stage

    ctx = project
    m = classifier_stage.run(ctx)
    assert (ctx.paths.models / "classifier.pt").is_file()
    assert 0.5 < m["val_accuracy"] <= 1.0 and m["steps"] == 60
    metrics = evaluate_stage.run(ctx)
    for name, path in evaluate_stage.outputs(ctx).items():
        assert path.is_file() and path.stat().st_size > 0, name
    with open(evaluate_stage.outputs(ctx)["curve"]) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["cfg_scale"]) for r in rows] == [1.0, 2.0]
    assert set(rows[0]) == set(CURVE_KEYS)
    for key in ("gfid", "best_cfg_scale", "kid_mean", "precision", "recall", "isc_mean", "conditional_accuracy",
                "rfid", "psnr", "ssim", "noise_floor_fid", "noise_fid", "checkpoint_step"):
        assert key in metrics, key
    assert metrics["gfid"] == min(float(r["fid"]) for r in rows)
    assert metrics["noise_floor_fid"] < metrics["noise_fid"]
    assert metrics["checkpoint_step"] == 20
    tr = ctx.tracker
    assert set(tr.names("image")) == {"samples.png", "reconstructions.png"}
    assert "guidance_curve.csv" in tr.names("artifact")
    curve_steps = [c[2] for c in tr.calls if c[0] == "metrics" and "curve_fid" in c[1]]
    assert curve_steps == [100, 200]  # one record per guidance scale, step = scale x 100
    assert any(p.is_file() for p in (ctx.paths.cache / "fidelity").rglob("*")), "no cached reference statistics"


def test_evaluate_stage_errors_are_clear(project, tmp_path):
    from pipelines.context import StageContext
    from pipelines.stages import evaluate as evaluate_stage

    ctx = project
    # inception without its local weights file: refused before any work, naming the param
    cfg = tiny_config(**deep_merge(STAGE_SECTIONS, {"eval": {"feature_extractor": "inception",
                                                               "inception_weights": str(tmp_path / "none.pth")}}))
    with pytest.raises(MetricsError, match="eval.inception_weights"):
        evaluate_stage.run(StageContext(cfg, ctx.root, RecordingTracker()))
    # no classifier yet
    with pytest.raises(MetricsError, match="classifier"):
        evaluate_stage.run(ctx)
    # a classifier trained on other data
    from unite_core.metrics.images import FeatureClassifier

    save_classifier(FeatureClassifier(1, 8, 10), ctx.paths.models / "classifier.pt", {"data_hash": "0" * 64})
    with pytest.raises(MetricsError, match="other data"):
        evaluate_stage.run(ctx)


def test_commands_run_stages_and_report_errors(project, monkeypatch, capsys):
    import yaml

    from pipelines.cli import main

    root = project.root
    monkeypatch.chdir(root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(project.cfg.to_dict()))

    def unite(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        out = capsys.readouterr()
        return exit_info.value.code, out.out + out.err

    code, out = unite("classifier", "--params", str(params), "--set", "eval.classifier_steps=30")
    assert code == 0, out
    assert json.loads((root / "metrics" / "classifier.json").read_text())["steps"] == 30
    code, out = unite("evaluate", "--params", str(params), "--set", "eval.cfg_scales=[1.5]")
    assert code == 0, out
    saved = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert saved["best_cfg_scale"] == 1.5 and saved["gfid"] > 0
    code, out = unite("evaluate", "--params", str(params), "--checkpoint", str(root / "missing.pt"))
    assert code == 1 and "missing.pt" in out and "Traceback" not in out
    code, out = unite("compare", "--params", str(params), "--variants", "unite,bogus")
    assert code == 1 and "unknown variant" in out


# ----------------------------------------------------------------------------------------------
# unite compare
# ----------------------------------------------------------------------------------------------
def test_compare_writes_one_row_per_variant_and_skips_finished(project, monkeypatch):
    from pipelines.stages import classifier as classifier_stage
    from pipelines.stages import compare

    ctx = project
    classifier_stage.run(ctx)
    opts = dict(variants="unite,no_shift", minutes=0.02, samples=20, scales="1,2", seeds=1)
    metrics = compare.run(ctx, **opts)
    paths = compare.report_paths(ctx)
    rows = claims.read_rows(paths["csv"])
    assert list(rows) == [("unite", 0), ("no_shift", 0)]
    for r in rows.values():
        assert r["gfid"] > 0 and r["steps"] >= 1 and r["train_seconds"] > 0 and r["params_hash"]
        assert r["best_cfg_scale"] in (1.0, 2.0) and r["parameters"] > 1000
    md = paths["md"].read_text()
    assert "| unite | 1 |" in md and "| no_shift | 1 |" in md  # the summary: one seed each
    assert "| unite | 0 |" in md and "| no_shift | 0 |" in md  # every run
    assert "UNITE <= two-stage (gFID): not measured" in md
    assert metrics["variants_run"] == 2 and "unite_gfid" in metrics

    def must_not_train(*a, **k):
        raise AssertionError("a finished variant was trained again")

    from unite_core import ablations

    monkeypatch.setattr(ablations, "train_variant", must_not_train)
    again = compare.run(ctx, **opts)
    assert again["variants_run"] == 0 and again["variants_skipped"] == 2
    assert claims.read_rows(paths["csv"])[("unite", 0)]["gfid"] == rows[("unite", 0)]["gfid"]
    # other evaluation settings: the trained checkpoints are reused, only the evaluation reruns
    third = compare.run(ctx, **{**opts, "samples": 24})
    assert third["variants_run"] == 2
    assert claims.read_rows(paths["csv"])[("unite", 0)]["num_samples"] == 24
    # a second seed: only the new (variant, seed) pairs train; the summary has mean and std over both
    monkeypatch.undo()
    fourth = compare.run(ctx, **{**opts, "samples": 24, "seeds": 2})
    assert fourth["variants_run"] == 2 and fourth["variants_skipped"] == 2
    rows = claims.read_rows(paths["csv"])
    assert sorted(rows) == [("no_shift", 0), ("no_shift", 1), ("unite", 0), ("unite", 1)]
    gfids = [rows[("unite", s)]["gfid"] for s in (0, 1)]
    assert fourth["unite_gfid"] == pytest.approx(sum(gfids) / 2)
    assert fourth["unite_gfid_std"] == pytest.approx(abs(gfids[0] - gfids[1]) / 2 ** 0.5)
    assert "| unite | 2 |" in paths["md"].read_text()


def test_compare_directions_use_the_seed_spread():
    def seeds(*gfids, acc=0.9):
        return [{"gfid": g, "conditional_accuracy": acc} for g in gfids]

    def table(**variants):
        return {(name, i): r for name, rs in variants.items() for i, r in enumerate(rs)}

    rows = table(unite=seeds(5.0, 5.2, 4.8), two_stage=seeds(7.0, 7.1, 6.9), separate_weights=seeds(4.0, 4.2, 3.8),
                 no_stop_grad=seeds(5.1, 5.6, 4.7), no_noise_aug=seeds(9.0, 9.5, 9.2, acc=0.1))
    summary = claims.summarize(rows)
    assert summary["unite"]["gfid"] == pytest.approx(5.0) and summary["unite"]["gfid_std"] == pytest.approx(0.2)
    verdicts = {d["worse"]: d["verdict"] for d in claims.directions(summary, num_classes=10)
                if d["better"] == "unite"}
    # two-stage: 2.0 apart, spread 0.3: reproduced; separate weights: 1.0 better, spread 0.4: reversed;
    # no stop-grad: 0.13 apart within its spread: not resolved, never "reproduced"
    assert verdicts == {"two_stage": "reproduced", "separate_weights": "reversed", "no_stop_grad": "not resolved",
                        "no_noise_aug": "reproduced", "flow_minibatches_1": "not measured",
                        "no_shift": "not measured"}
    others = {d["better"]: d["verdict"] for d in claims.directions(summary, 10) if d["better"] != "unite"}
    assert others == {"unite_2x_steps": "not measured", "unite_param_matched": "not measured"}
    md = claims.render_markdown(rows, list(ablations.VARIANTS), {"num_classes": 10})
    assert "| unite | 3 | 5.00 ± 0.20 |" in md
    assert "Warning: class-independent samples (conditional accuracy at chance) from no_noise_aug." in md
    assert "shared weights <= separate weights (gFID): **reversed**" in md
    assert "noise augmentation <= none (gFID): **reproduced**" in md
    # one seed each: however large the difference, there is no spread to judge it by
    single = claims.summarize(table(unite=seeds(1.0), two_stage=seeds(9.0)))
    assert claims.directions(single, 10)[0]["verdict"] == "not resolved"
    # the favoured variant itself at chance: its generator did not train, nothing is compared
    untrained = claims.summarize({**rows, **table(unite=seeds(5.0, 5.1, 4.9, acc=0.11))})
    verdicts = {d["worse"]: d["verdict"] for d in claims.directions(untrained, num_classes=10)
                if d["better"] == "unite"}
    assert verdicts["two_stage"] == verdicts["no_noise_aug"] == verdicts["no_stop_grad"] == "inconclusive"
    with pytest.raises(ablations.AblationError, match="unknown variant"):
        ablations.parse_variants("unite,bogus")
    assert ablations.parse_variants(None) == list(ablations.VARIANTS)
    cfg = tiny_config()
    v = ablations.variant_config(cfg, "no_shift", budget="time", minutes=1.5, steps=None)
    assert v.flow.shift is None and v.train.time_limit_minutes == 1.5
    assert ablations.variant_config(cfg, "flow_minibatches_1", budget="steps", minutes=1, steps=7).flow.minibatches == 1
    # the matched variants: twice the updates (or minutes), twice the GE depth, and the seed
    v2 = ablations.variant_config(cfg, "unite_2x_steps", budget="steps", minutes=None, steps=7, seed=4)
    assert v2.train.steps == 14 and v2.train.seed == 4
    s2 = ablations.variant_config(cfg, "separate_weights_2x_steps", budget="steps", minutes=None, steps=7)
    assert s2.train.steps == 14 and s2.model.weight_sharing == "separate"
    assert ablations.variant_config(cfg, "unite_2x_steps", budget="time", minutes=1.5, steps=7).train.time_limit_minutes == 3
    pm = ablations.variant_config(cfg, "unite_param_matched", budget="steps", minutes=None, steps=7)
    assert pm.model.ge_dims() == (2 * cfg.model.ge_dims()[0], *cfg.model.ge_dims()[1:])


def test_param_matched_unite_has_the_parameters_of_separate_weights():
    from unite_core.config import load_config
    from unite_core.model import UNITE, count_parameters

    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml")  # GE-T on MNIST, the study's model
    info = {"modality": "images", "channels": 1, "image_size": cfg.data.image_size, "num_classes": 10}
    counts = {name: count_parameters(UNITE(ablations.variant_config(cfg, name, budget="steps", minutes=None, steps=5),
                                           info)) for name in ("unite", "separate_weights", "unite_param_matched")}
    assert counts["separate_weights"] > 1.3 * counts["unite"]
    assert abs(counts["unite_param_matched"] - counts["separate_weights"]) < 0.05 * counts["separate_weights"]


def test_compare_logs_one_mlflow_child_run_per_variant(project):
    from mlflow.tracking import MlflowClient

    from pipelines.stages import classifier as classifier_stage
    from pipelines.stages import compare, execute
    from pipelines.tracking import tracking_uri

    ctx = project
    classifier_stage.run(ctx)
    cfg = tiny_config(**deep_merge(STAGE_SECTIONS, {"tracking": {"enabled": True, "experiment": "cmp"},
                                                     "train": {"log_every": 1}}))
    metrics = execute("compare", cfg, ctx.root, options={"variants": "two_stage,no_noise_aug", "minutes": 0.02,
                                                          "samples": 20, "scales": "1.5", "seeds": 1})
    assert metrics["variants_run"] == 2 and (ctx.root / "metrics" / "compare.json").is_file()
    client = MlflowClient(tracking_uri(ctx.root))
    exp = client.get_experiment_by_name("cmp")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`unite.variant` != ''")
    by_variant = {r.data.tags["unite.variant"]: r for r in runs}
    assert set(by_variant) == {"two_stage", "no_noise_aug"}
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    assert len(parents) == 1 and None not in parents
    for r in by_variant.values():
        assert r.info.status == "FINISHED" and "gfid" in r.data.metrics and r.data.params["compare.variant"]
    logged = by_variant["two_stage"].data.metrics
    assert "train_tokenizer_loss" in logged and "train_denoiser_flow" in logged
    assert "train_loss" in by_variant["no_noise_aug"].data.metrics
    rows = claims.read_rows(compare.report_paths(ctx)["csv"])
    assert "tokenizer" in rows[("two_stage", 0)]["details"] and rows[("two_stage", 0)]["steps"] >= 2


def test_evaluate_stage_dispatches_molecules_to_evaluate_molecules(tmp_path, monkeypatch):
    import unite_core.data.molecule_sets as molecule_data
    import unite_core.eval_molecules as molecules
    from pipelines.context import StageContext
    from pipelines.stages import evaluate as evaluate_stage

    cfg = config_from_dict({"modality": "molecules", "data": {"dataset": "molecules_embedded"},
                            "tracking": {"enabled": False}})
    calls = {}
    monkeypatch.setattr(evaluate_stage, "load_checkpoint", lambda path, cfg=None: {"step": 7, "ema": {}})
    monkeypatch.setattr(evaluate_stage, "model_from_checkpoint", lambda state, use_ema, device: "MODEL")
    monkeypatch.setattr(molecule_data, "load_prepared_molecules", lambda folder, data_cfg: "DATA")

    def fake_evaluate(model, data, c):
        calls["evaluate"] = (model, data, c is cfg)
        return {"validity": 95.0, "uniqueness": 99.0}

    def fake_write(model, n, out_dir, c):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples.png").write_bytes(b"png")
        calls["write"] = n
        return {"png": str(out_dir / "samples.png")}

    monkeypatch.setattr(molecules, "evaluate_molecules", fake_evaluate)
    monkeypatch.setattr(molecules, "write_samples", fake_write)
    tracker = RecordingTracker()
    metrics = evaluate_stage.run(StageContext(cfg, tmp_path, tracker))
    assert calls["evaluate"] == ("MODEL", "DATA", True) and calls["write"] == 64
    assert metrics["validity"] == 95.0 and "gfid" not in metrics
    assert tracker.names("artifact") == ["samples.png"]


def test_young_ema_is_reported(caplog):
    from unite_core.train import warn_if_ema_is_young

    state = {"step": 38, "ema": {}, "config": {"train": {"ema_decay": 0.999}}}
    with caplog.at_level("WARNING"):
        assert warn_if_ema_is_young(state, True, "models/unite.pt")
    assert "sample.use_ema=false" in caplog.text
    assert not warn_if_ema_is_young(state, False, "x")
    assert not warn_if_ema_is_young({**state, "step": 5000}, True, "x")
    # with the warm-up (train.ema_warmup, the default) the initialisation is gone within a few dozen steps
    warm = {**state, "config": {"train": {"ema_decay": 0.999, "ema_warmup": True}}}
    assert not warn_if_ema_is_young({**warm, "step": 38}, True, "x")
    assert warn_if_ema_is_young({**warm, "step": 0}, True, "x")


def test_evaluate_stage_against_a_reference_stats_file(project):
    """The stage's own cached training-set statistics (.npz, mu/sigma) given back as eval.reference_stats give
    the same gFID and noise floor as the training images themselves."""
    from pipelines.context import StageContext
    from pipelines.stages import classifier as classifier_stage
    from pipelines.stages import evaluate as evaluate_stage

    ctx = project
    classifier_stage.run(ctx)
    direct = evaluate_stage.run(ctx)
    cached = sorted((ctx.paths.cache / "fidelity").glob("ref-*-train-*.npz"))
    assert len(cached) == 1, cached
    cfg = tiny_config(**deep_merge(STAGE_SECTIONS, {"eval": {"reference_stats": str(cached[0])}}))
    via_file = evaluate_stage.run(StageContext(cfg, ctx.root, RecordingTracker()))
    for k in ("gfid", "noise_floor_fid", "kid_mean", "precision", "rfid"):
        assert via_file[k] == pytest.approx(direct[k], rel=1e-9), k


def test_evaluate_stage_refuses_a_bad_reference_stats_file_first(tmp_path):
    from pipelines.context import StageContext
    from pipelines.stages import evaluate as evaluate_stage

    cfg = tiny_config(**deep_merge(STAGE_SECTIONS, {"eval": {"reference_stats": str(tmp_path / "missing.npz")}}))
    with pytest.raises(MetricsError, match=r"^eval\.reference_stats .*missing\.npz does not exist"):
        evaluate_stage.run(StageContext(cfg, tmp_path, RecordingTracker()))  # no checkpoint needed to fail


def test_compare_trains_seeds_in_parallel_processes(project):
    from pipelines.stages import classifier as classifier_stage
    from pipelines.stages import compare

    ctx = project
    classifier_stage.run(ctx)
    metrics = compare.run(ctx, variants="unite", budget="steps", steps=3, samples=10, scales="1", seeds=2, jobs=2)
    rows = claims.read_rows(compare.report_paths(ctx)["csv"])
    assert sorted(rows) == [("unite", 0), ("unite", 1)] and metrics["variants_run"] == 2
    assert all(r["steps"] == 3 and "1 threads" in r["device"] for r in rows.values())  # each process: one thread
    assert rows[("unite", 0)]["gfid"] != rows[("unite", 1)]["gfid"]  # two seeds, two models
