import math

import pytest
import torch
from torch import nn

from unite_core.config import config_from_dict
from unite_core.encoder import GenerativeEncoder
from unite_core.flow import GuidanceConfig, guided_prediction, integrate, sample_timesteps, shift_timesteps
from unite_core.model import UNITE, balanced_labels, parameter_report

from tests.conftest import DIGITS_INFO, wake

IMAGENET = {"modality": "images", "channels": 3, "image_size": 256, "num_classes": 1000}


def imagenet_cfg(ge="B", dec="B"):
    return config_from_dict({
        "data": {"dataset": "imagefolder", "root": "/unused", "image_size": 256},
        "model": {"ge_size": ge, "decoder_size": dec, "patch_size": 16, "latent_tokens": 256, "latent_dim": 32},
    })


def test_paper_parameter_counts_within_2_percent():
    with torch.device("meta"):
        rep = parameter_report(UNITE(imagenet_cfg(), IMAGENET))
    assert rep["ge"] == pytest.approx(130.6e6, rel=0.02)
    assert rep["decoder"] == pytest.approx(86.2e6, rel=0.02)
    assert rep["total"] == pytest.approx(217.6e6, rel=0.02)


@pytest.mark.parametrize("size,depth,width", [("S", 12, 384), ("M", 12, 1024), ("L", 24, 1024), ("XL", 28, 1152)])
def test_named_sizes_build_with_their_dimensions(size, depth, width):
    with torch.device("meta"):
        m = UNITE(imagenet_cfg(ge=size), IMAGENET)
    assert len(m.encoder.blocks) == depth and m.encoder.width == width
    # attention+MLP+adaLN per block ~ (4 + 3*(8/3) + 6) width^2 -> total within 5%
    approx = depth * 18 * width**2
    blocks = sum(p.numel() for p in m.encoder.blocks.parameters())
    assert blocks == pytest.approx(approx, rel=0.05)


@pytest.mark.parametrize("kind,k", [("queries", 5), ("patch_tokens", 4), ("patch_tokens", 16)])
def test_shapes_any_size_and_channels(tiny_cfg, kind, k):
    # patch_tokens: K=4 is resampled from a 2x2 grid to the 4x4 patch grid, K=16 is the patch grid
    cfg = tiny_cfg(data={"image_size": 12},
                   model={"patch_size": 3, "latent_tokens": k, "latent_dim": 3, "decoder_kind": kind})
    m = UNITE(cfg, {"modality": "images", "channels": 3, "image_size": 12, "num_classes": 7})
    x = torch.rand(2, 3, 12, 12) * 2 - 1
    z = m.tokenize(x)
    assert z.shape == (2, k, 3)
    assert m.decode(z).shape == (2, 3, 12, 12)
    z_hat, _ = m.denoiser.denoise(torch.randn(2, k, 3), torch.rand(2), torch.tensor([0, 6]))
    assert z_hat.shape == (2, k, 3)


def test_unconditional_model_generates(tiny_cfg):
    m = UNITE(tiny_cfg(), {**DIGITS_INFO, "num_classes": 0}).eval()
    imgs, nfe = m.generate(torch.zeros(3, dtype=torch.long), solver="euler", steps=3, cfg_scale=3.0)
    assert imgs.shape == (3, 1, 8, 8) and nfe == 3
    assert imgs.min() >= 0 and imgs.max() <= 1


def test_weight_sharing_and_separate_variant(tiny_cfg):
    shared = UNITE(tiny_cfg(), DIGITS_INFO)
    assert shared.denoiser is shared.encoder
    sep = UNITE(tiny_cfg(model={"weight_sharing": "separate"}), DIGITS_INFO)
    assert sep.denoiser is not sep.encoder
    enc_ids = {id(p) for p in sep.encoder.parameters()}
    assert not enc_ids & {id(p) for p in sep.denoiser.parameters()}
    # the separate denoiser has no observation embedding: otherwise the same size
    n_embed = sum(p.numel() for p in sep.encoder.embed.parameters())
    assert sum(p.numel() for p in sep.denoiser.parameters()) == sum(p.numel() for p in sep.encoder.parameters()) - n_embed


def _flow_grad_on_embed(cfg) -> float:
    torch.manual_seed(0)
    m = wake(UNITE(cfg, DIGITS_INFO))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.arange(4)
    z0 = m.tokenize(x)
    m.flow_objective(z0, y)[0].backward()
    # the patch embedding takes part only in tokenization: any gradient reached it through z0
    grad = m.encoder.embed.proj.weight.grad
    return 0.0 if grad is None else float(grad.abs().sum())  # None: autograd never reached it


def test_stop_gradient_blocks_flow_loss_from_z0(tiny_cfg):
    assert _flow_grad_on_embed(tiny_cfg(flow={"stop_grad": True})) == 0.0
    assert _flow_grad_on_embed(tiny_cfg(flow={"stop_grad": False})) > 0.0


def test_shared_weights_receive_both_gradients(tiny_cfg):
    m = wake(UNITE(tiny_cfg(), DIGITS_INFO))
    loss, metrics = m.compute_loss((torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4)))
    loss.backward()
    assert {"recon", "flow", "loss", "l1"} <= set(metrics)
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.decoder.head.weight.grad.abs().sum() > 0


def test_recon_only_has_no_flow_term(tiny_cfg):
    m = UNITE(tiny_cfg(loss={"recon_only": True}), DIGITS_INFO)
    _, metrics = m.compute_loss((torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4)))
    assert "flow" not in metrics


@pytest.mark.parametrize("kind", ["layernorm_affine", "layernorm", "rmsnorm"])
def test_final_norm_variants(tiny_cfg, kind):
    m = UNITE(tiny_cfg(model={"final_norm": kind}), DIGITS_INFO)
    z = m.tokenize(torch.rand(3, 1, 8, 8) * 2 - 1)
    has_affine = any(True for _ in m.encoder.final_norm.parameters())
    assert has_affine == (kind != "layernorm")
    if kind.startswith("layernorm"):
        assert z.mean(-1).abs().max() < 1e-4  # zero mean per token at init (affine = identity)


def test_timesteps_logit_normal_and_shift():
    t = sample_timesteps(200_000, shift=None, generator=torch.Generator().manual_seed(0))
    assert float(t.median()) == pytest.approx(0.5, abs=0.01)
    ts = sample_timesteps(200_000, shift=0.5, generator=torch.Generator().manual_seed(0))
    # the shift maps the median 0.5 to 0.5*0.5/(1-0.5*0.5) = 1/3: more weight on the noise end
    assert float(ts.median()) == pytest.approx(1 / 3, abs=0.01)
    assert float(shift_timesteps(torch.tensor(1.0), 0.5)) == pytest.approx(1.0)


def test_guidance_scale_one_equals_conditional_and_interval_is_respected():
    torch.manual_seed(0)
    W = torch.randn(4, 4)

    def raw_fn(z, t, y):
        return z @ W + (y.float() - 5)[:, None, None] * torch.arange(4.0) * 0.3 + t[:, None, None]

    def norm(r):
        return torch.nn.functional.layer_norm(r, (r.shape[-1],))

    z = torch.randn(6, 3, 4)
    y = torch.arange(6)
    t = torch.tensor([0.0, 0.05, 0.2, 0.5, 0.95, 1.0])
    cond = norm(raw_fn(z, t, y))
    one = guided_prediction(raw_fn, norm, z, t, y, 10, GuidanceConfig(1.0, (0.1, 1.0)))
    assert torch.equal(one, cond)
    g = guided_prediction(raw_fn, norm, z, t, y, 10, GuidanceConfig(3.0, (0.1, 0.9)))
    outside = (t < 0.1) | (t > 0.9)
    assert torch.equal(g[outside], cond[outside])
    assert (g[~outside] - cond[~outside]).abs().max() > 1e-3
    uncond = norm(raw_fn(z, t, torch.full_like(y, 10)))
    expected = uncond + 3.0 * (cond - uncond)
    assert torch.allclose(g[~outside], expected[~outside], atol=1e-6)
    # norm order: "norm after" normalises the combination (so each token has zero mean)
    g_after = guided_prediction(raw_fn, norm, z, t, y, 10, GuidanceConfig(3.0, (0.0, 1.0), norm_first=False))
    assert g_after.mean(-1).abs().max() < 1e-5


def test_euler_with_many_steps_matches_dopri5_on_known_solution():
    # dz/dt = -z + t has solution z(t) = t - 1 + (z0 + 1) e^{-t}
    z0 = torch.tensor([[0.5, -2.0, 3.0]])
    exact = 1 - 1 + (z0 + 1) * math.exp(-1.0)
    vel = lambda t, z: -z + t  # noqa: E731
    dopri, nfe = integrate(vel, z0, solver="dopri5", rtol=1e-7, atol=1e-9)
    euler, n_euler = integrate(vel, z0, solver="euler", steps=2000)
    heun, _ = integrate(vel, z0, solver="heun", steps=100)
    assert torch.allclose(dopri, exact, atol=1e-6)
    assert n_euler == 2000 and nfe > 6
    assert torch.allclose(euler, dopri, atol=5e-4)
    assert torch.allclose(heun, dopri, atol=1e-5)


def test_balanced_labels_equal_counts():
    labels = balanced_labels(100, 10)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 10))
    assert torch.equal(balanced_labels(3, 10), torch.tensor([0, 1, 2]))


def test_ge_is_modality_agnostic():
    """The GE consumes any token sequence from its embed module (here: sets of 3-D points)."""

    class PointEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 32)

        def forward(self, pts):
            mask = pts.abs().sum(-1) > 0
            return self.proj(pts), torch.zeros(pts.shape[1], dtype=torch.long), mask

    ge = wake(GenerativeEncoder(depth=2, width=32, heads=2, latent_tokens=3, latent_dim=4, num_classes=0,
                                embed=PointEmbed(), in_context_tokens=0))
    pts = torch.randn(1, 5, 3)
    ge.eval()

    def tok(p):
        return ge.tokenize(p, generator=torch.Generator().manual_seed(0))[0]

    z = tok(pts)
    assert z.shape == (1, 3, 4)
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert torch.allclose(z, tok(pts[:, perm]), atol=1e-5)  # position 0 for all points: order-free
    padded = torch.cat([pts[:, :3], torch.zeros(1, 2, 3)], dim=1)
    assert torch.allclose(tok(pts[:, :3]), tok(padded), atol=1e-5)  # masked padding is ignored
    assert not torch.allclose(z, tok(pts[:, :3]), atol=1e-3)
