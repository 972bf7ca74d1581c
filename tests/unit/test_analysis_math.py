"""Numerical checks for unite_core.analysis (alignment, compression, probes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unite_core.analysis import (
    GROUPS,
    cknna,
    compare_description_lengths,
    cosine_similarity_curve,
    description_length,
    histogram_entropy_bits,
    latent_rate,
    layerwise_alignment,
    layerwise_probe,
    linear_cka,
    linear_probe,
    pool_activations,
    tensor_group,
)


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


@pytest.fixture()
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --- linear CKA ---------------------------------------------------------------------------------

def test_cka_self_is_one(gen):
    x = torch.randn(300, 16, generator=gen)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x.numpy(), x.numpy()) == pytest.approx(1.0, abs=1e-6)


def test_cka_orthogonal_and_scale_invariant(gen):
    x = torch.randn(400, 12, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(12, 8, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(400, 8, generator=gen, dtype=torch.float64)
    base = linear_cka(x, y)
    q = _orthogonal(8, gen)
    assert linear_cka(x, y @ q) == pytest.approx(base, abs=1e-6)
    assert linear_cka(x, 7.3 * y) == pytest.approx(base, abs=1e-6)
    assert linear_cka(x, 0.01 * (y @ q) + 3.0) == pytest.approx(base, abs=1e-6)  # + translation
    assert linear_cka(x @ _orthogonal(12, gen), y) == pytest.approx(base, abs=1e-6)


def test_cka_not_invariant_to_general_linear_map(gen):
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    a = torch.diag(torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0, 0.1], dtype=torch.float64))
    assert torch.linalg.matrix_rank(a) == 6
    value = linear_cka(x, x @ a)
    assert abs(value - 1.0) > 0.01


def test_cka_kernel_form_matches_feature_form(gen):
    # p > n switches to the kernel-space computation; it must agree with the feature-space one.
    x = torch.randn(20, 50, generator=gen, dtype=torch.float64)
    y = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = float((yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-10)


def test_cka_independent_features_small(gen):
    x = torch.randn(2000, 10, generator=gen)
    y = torch.randn(2000, 10, generator=gen)
    assert linear_cka(x, y) < 0.1


# --- CKNNA --------------------------------------------------------------------------------------

def test_cknna_self_is_one_and_invariant(gen):
    x = torch.randn(200, 10, generator=gen, dtype=torch.float64)
    assert cknna(x, x, k=10) == pytest.approx(1.0, abs=1e-6)
    y = torch.tanh(x @ torch.randn(10, 7, generator=gen, dtype=torch.float64)) + 0.3 * torch.randn(200, 7, generator=gen, dtype=torch.float64)
    base = cknna(x, y, k=10)
    assert -1.0 <= base <= 1.0
    q = _orthogonal(7, gen)
    assert cknna(x, y @ q, k=10) == pytest.approx(base, abs=1e-6)
    assert cknna(x, 4.2 * y, k=10) == pytest.approx(base, abs=1e-6)
    assert cknna(2.5 * (x @ _orthogonal(10, gen)), y, k=10) == pytest.approx(base, abs=1e-6)


def test_cknna_hand_example_partial_overlap():
    # 1-D, already centred. X = [-2,-1,1,2], Y = [-2,1,-1,2], k = 2. Kc[i,j] = x_i x_j.
    # X neighbours (top-2 by x_i x_j, j != i): 0->{1,2}, 1->{0,2}, 2->{3,1}, 3->{2,1}
    #   values on those pairs: (0,1)=2 (0,2)=-2 (1,0)=2 (1,2)=-1 (2,3)=2 (2,1)=-1 (3,2)=2 (3,1)=-2
    #   -> sum Kc^2 over X's pairs = 4+4+4+1+4+1+4+4 = 26
    # Y neighbours: 0->{2,1}, 1->{3,2}, 2->{0,1}, 3->{1,2}; by symmetry sum Lc^2 = 26
    # mutual pairs: (0,1),(0,2),(1,2),(2,1),(3,1),(3,2)
    #   Kc*Lc: 2*-2 + -2*2 + -1*-1 + -1*-1 + -2*2 + 2*-2 = -14
    # CKNNA = -14 / sqrt(26 * 26) = -7/13
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    y = np.array([[-2.0], [1.0], [-1.0], [2.0]])
    assert cknna(x, y, k=2) == pytest.approx(-7.0 / 13.0, abs=1e-12)


def test_cknna_hand_example_same_neighbours():
    # X = [-2,-1,1,2], Y = [-3,-1,2,2] (both mean 0), k = 1.
    # Both have neighbour pairs {(0,1),(1,0),(2,3),(3,2)}; Kc on them = 2,2,2,2; Lc = 3,3,4,4.
    # CKNNA = (2*3*2 + 2*4*2) / sqrt((4*4) * (9+9+16+16)) = 28 / sqrt(800) = 7 / sqrt(50)
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y = torch.tensor([[-3.0], [-1.0], [2.0], [2.0]])
    assert cknna(x, y, k=1) == pytest.approx(7.0 / math.sqrt(50.0), abs=1e-12)


def test_cknna_all_pairs_is_off_diagonal_cka(gen):
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = x[:, :3] ** 2 + torch.randn(30, 3, generator=gen, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    kc, lc = xc @ xc.T, yc @ yc.T
    off = ~torch.eye(30, dtype=torch.bool)
    expected = float((kc * lc)[off].sum() / torch.sqrt((kc**2)[off].sum() * (lc**2)[off].sum()))
    assert cknna(x, y, k=29) == pytest.approx(expected, abs=1e-12)


def test_cknna_independent_features_near_zero(gen):
    x = torch.randn(500, 10, generator=gen)
    y = torch.randn(500, 10, generator=gen)
    assert abs(cknna(x, y, k=10)) < 0.1


# --- layerwise / cosine -------------------------------------------------------------------------

def test_layerwise_alignment_and_pooling(gen):
    n, t, w = 64, 5, 8
    a = [torch.randn(n, t, w, generator=gen) for _ in range(3)]
    b = [a[0].clone(), a[1] @ _orthogonal(w, gen).float(), torch.randn(n, t, w, generator=gen)]
    rows = layerwise_alignment(a, b, k=5)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[0]["cka"] == pytest.approx(1.0, abs=1e-6) and rows[0]["cknna"] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["cka"] == pytest.approx(1.0, abs=1e-5)
    assert rows[2]["cka"] < rows[0]["cka"]
    flat = layerwise_alignment(a[:1], b[:1], k=5, pool="flatten")
    assert flat[0]["cka"] == pytest.approx(1.0, abs=1e-6)
    assert pool_activations(a[0], "mean").shape == (n, w)
    assert pool_activations(a[0], "flatten").shape == (n, t * w)
    with pytest.raises(ValueError):
        pool_activations(a[0], "max")


def test_cosine_similarity_curve(gen):
    z = torch.randn(16, 4, 3, generator=gen)
    preds = {0.9: torch.randn(16, 4, 3, generator=gen), 0.0: z * 2.0, 0.5: -z}
    rows = cosine_similarity_curve(z, preds)
    assert [r["t"] for r in rows] == [0.0, 0.5, 0.9]
    assert rows[0]["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and rows[0]["cosine_std"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["cosine_mean"] == pytest.approx(-1.0, abs=1e-6)
    assert abs(rows[2]["cosine_mean"]) < 0.5


# --- entropy / description length ---------------------------------------------------------------

def test_histogram_entropy_values(gen):
    assert histogram_entropy_bits(torch.full((100,), 3.5)) == 0.0
    assert histogram_entropy_bits(torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(250), bins=4) == pytest.approx(2.0, abs=1e-12)
    u = torch.rand(1_000_000, generator=gen)
    assert histogram_entropy_bits(u, bins=256) == pytest.approx(8.0, abs=0.05)
    assert histogram_entropy_bits(np.array([1.0, 2.0]), bins=2) == pytest.approx(1.0, abs=1e-12)
    assert histogram_entropy_bits(torch.empty(0)) == 0.0


@pytest.mark.parametrize(
    "name, group",
    [
        ("blocks.3.attn.qkv.weight", "attention"),
        ("blocks.3.attn.proj.weight", "attention"),
        ("blocks.3.attn.q_norm.weight", "normalization"),
        ("blocks.3.attn.k_norm.weight", "normalization"),
        ("blocks.3.mlp.w12.weight", "mlp"),
        ("blocks.3.mlp.w3.weight", "mlp"),
        ("blocks.3.ada.weight", "conditioning"),
        ("blocks.3.ada.bias", "conditioning"),
        ("blocks.3.block_norm.weight", "normalization"),
        ("final_norm.weight", "normalization"),
        ("final_norm.bias", "normalization"),
        ("latent_pos", "embedding"),
        ("latent_in.weight", "embedding"),
        ("in_context_pos", "embedding"),
        ("t_embed.mlp.0.weight", "conditioning"),
        ("t_embed.freqs", "conditioning"),
        ("y_embed.weight", "conditioning"),
        ("embed.proj.weight", "embedding"),
        ("out_ada.weight", "conditioning"),
        ("out_proj.weight", "output"),
        ("decoder.blocks.0.mlp.fc1.weight", "mlp"),
        ("decoder.blocks.0.mlp.fc2.bias", "mlp"),
        ("decoder.blocks.0.norm1.weight", "normalization"),
        ("decoder.blocks.0.attn.qkv.bias", "attention"),
        ("decoder.head.weight", "output"),
        ("decoder.pos_embed", "embedding"),
        ("encoder.layers.0.LayerNorm.weight", "normalization"),
        ("something_else", "other"),
    ],
)
def test_tensor_group(name, group):
    assert tensor_group(name) == group
    assert group in GROUPS


def test_description_length_sums(gen):
    sd = {
        "blocks.0.attn.qkv.weight": torch.randn(24, 8, generator=gen),
        "blocks.0.attn.q_norm.weight": torch.ones(4),
        "blocks.0.mlp.w12.weight": torch.randn(32, 8, generator=gen),
        "blocks.0.block_norm.weight": torch.randn(8, generator=gen),
        "latent_pos": torch.randn(4, 8, generator=gen),
        "out_proj.weight": torch.randn(4, 8, generator=gen),
        "t_embed.freqs": torch.randn(16, generator=gen),
    }
    res = description_length(sd, bins=16)
    tensors = res["tensors"]
    assert set(tensors) == set(sd)
    for name, row in tensors.items():
        assert row["numel"] == sd[name].numel()
        assert row["total_bits"] == pytest.approx(row["numel"] * row["entropy_bits"])
        assert 0.0 <= row["entropy_bits"] <= 4.0
    assert tensors["blocks.0.attn.q_norm.weight"]["entropy_bits"] == 0.0
    for g, agg in res["groups"].items():
        members = [r for r in tensors.values() if r["group"] == g]
        assert agg["numel"] == sum(r["numel"] for r in members)
        assert agg["total_bits"] == pytest.approx(sum(r["total_bits"] for r in members))
    assert res["total"]["numel"] == sum(v.numel() for v in sd.values())
    assert res["total"]["total_bits"] == pytest.approx(sum(r["total_bits"] for r in tensors.values()))
    assert res["total"]["total_bits"] == pytest.approx(sum(a["total_bits"] for a in res["groups"].values()))

    sd2 = dict(sd)
    sd2["blocks.0.attn.q_norm.weight"] = torch.randn(4, generator=gen)
    cmp = compare_description_lengths(res, description_length(sd2, bins=16))
    assert cmp["groups"]["normalization"]["delta_bits"] > 0
    assert cmp["groups"]["attention"]["delta_bits"] == pytest.approx(0.0)
    assert cmp["groups"]["mlp"]["ratio"] == pytest.approx(1.0)
    assert cmp["total"]["delta_bits"] == pytest.approx(cmp["groups"]["normalization"]["delta_bits"])


# --- latent rate --------------------------------------------------------------------------------

def test_latent_rate_grows_with_information(gen):
    n, K, d = 500, 4, 8
    small = latent_rate(0.25 * torch.randn(n, K, d, generator=gen), step=0.1)
    large = latent_rate(1.0 * torch.randn(n, K, d, generator=gen), step=0.1)
    more_dims = latent_rate(1.0 * torch.randn(n, 2 * K, d, generator=gen), step=0.1)
    assert small["raw_floats_per_image"] == K * d and more_dims["raw_floats_per_image"] == 2 * K * d
    assert large["bits_per_image"] > small["bits_per_image"] + K * d  # ~2 bits/dim more (4x std)
    assert more_dims["bits_per_image"] == pytest.approx(2 * large["bits_per_image"], rel=0.05)
    # Gaussian with sigma=1 quantised at step 0.1: ~0.5*log2(2*pi*e) - log2(0.1) = 5.37 bits/dim
    assert large["bits_per_dim_mean"] == pytest.approx(5.37, abs=0.3)
    assert large["bits_per_image"] <= large["max_bits_per_image"]
    mm = latent_rate(1.0 * torch.randn(n, K, d, generator=gen), step=0.1, miller_madow=True)
    assert mm["bits_per_image"] > large["bits_per_image"] - 0.5 * K * d
    const = latent_rate(torch.zeros(n, K, d), step=0.1)
    assert const["bits_per_image"] == 0.0


# --- linear probe -------------------------------------------------------------------------------

def _digits_split():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def test_linear_probe_digits():
    xtr, ytr, xva, yva = _digits_split()
    res = linear_probe(torch.from_numpy(xtr), torch.from_numpy(ytr), xva, yva)
    assert res["val_accuracy"] > 0.9
    assert res["num_classes"] == 10 and res["uniform_chance"] == pytest.approx(0.1)
    assert res["chance"] < 0.2
    shuffled = np.random.default_rng(1).permutation(ytr)
    res_shuf = linear_probe(xtr, shuffled, xva, yva)
    assert res_shuf["val_accuracy"] < 0.2


def test_layerwise_probe_pools(gen):
    xtr, ytr, xva, yva = _digits_split()
    # two fake "layers": layer 0 carries the pixels as 4 tokens of 16, layer 1 is noise
    tr0 = torch.from_numpy(xtr).float().reshape(-1, 4, 16)
    va0 = torch.from_numpy(xva).float().reshape(-1, 4, 16)
    tr1 = torch.randn(len(ytr), 4, 16, generator=gen)
    va1 = torch.randn(len(yva), 4, 16, generator=gen)
    rows = layerwise_probe([tr0, tr1], ytr, [va0, va1], yva, pool="flatten")
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0]["val_accuracy"] > 0.9 and rows[0]["num_features"] == 64
    assert rows[1]["val_accuracy"] < 0.2
    mean_rows = layerwise_probe([tr0], ytr, [va0], yva, pool="mean")
    assert mean_rows[0]["num_features"] == 16


def test_write_csv_round_trips_with_plain_line_ends(tmp_path):
    from unite_core.analysis.report import read_csv, write_csv

    path = write_csv([{"step": 1, "loss": 0.5, "note": "a"}, {"step": 2, "loss": float("nan"), "extra": 3}],
                     tmp_path / "t.csv")
    assert path.read_bytes().count(b"\r") == 0 and path.read_text().splitlines()[0] == "step,loss,note,extra"
    assert read_csv(path) == [{"step": 1, "loss": 0.5, "note": "a", "extra": None},
                              {"step": 2, "loss": None, "note": None, "extra": 3}]
