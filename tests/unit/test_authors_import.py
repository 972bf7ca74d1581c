"""Importing the authors' released checkpoints (unite_core/authors.py, `unite import-checkpoint`).

The fixtures tests/unit/fixtures/authors_unite_{b,l}.json list the authors' state_dict layout for UNITE-B
and UNITE-L (names in state_dict order, shapes, parameter or buffer), written down from a reading of
their modules. `reference_*` below is an independent, plain-torch statement of the authors' forward
passes in their own layout; the imported model must reproduce it on identical weights and noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unite_core.authors import (
    AuthorsCheckpointError, authors_params, convert_state_dict, import_checkpoint, read_authors_checkpoint,
)
from unite_core.config import config_from_dict
from unite_core.model import UNITE
from unite_core.train import Trainer, load_checkpoint, model_from_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"authors_{name}.json").read_text())


# ----------------------------------------------------------------------------------------------
# The authors' layout with values
# ----------------------------------------------------------------------------------------------
def rope_table(n: int, head_dim: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Their rotary buffers: frequencies 1/10000^(2i/head_dim), each repeated for its channel pair;
    `pad` leading rows of identity (cos 1, sin 0) for the in-context tokens."""
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    ang = torch.arange(n).float()[:, None] * freqs[None]
    ang = ang.repeat_interleave(2, dim=-1)
    cos, sin = ang.cos(), ang.sin()
    if pad:
        cos = torch.cat([torch.ones(pad, head_dim), cos])
        sin = torch.cat([torch.zeros(pad, head_dim), sin])
    return cos, sin


def layout_state(entries, *, device="cpu", seed=0) -> dict:
    """Values for a layout: random weights (std 0.02; norm weights near 1; unit-normal Fourier
    frequencies), the all-zero patch position table, and the standard rotary tables."""
    g = torch.Generator().manual_seed(seed)
    main_len = next(shape[0] for name, shape, *_ in entries if name == "encoder.feat_rope.freqs_cos")
    sd = {}
    for name, shape, *_ in entries:
        if name.startswith("encoder.feat_rope"):
            n, head_dim = shape
            cos, sin = rope_table(main_len, head_dim, pad=n - main_len)
            sd[name] = cos if name.endswith("cos") else sin
        elif name == "patch_embed.position_embeddings":
            sd[name] = torch.zeros(shape)
        elif device == "meta":
            sd[name] = torch.empty(shape, device="meta")
        elif name.endswith("t_embedder.W"):
            sd[name] = torch.randn(shape, generator=g)
        elif "norm" in name and name.endswith(".weight") and len(shape) == 1:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = 0.02 * torch.randn(shape, generator=g)
    return sd


# ----------------------------------------------------------------------------------------------
# 1. Names and shapes of UNITE-B and UNITE-L load with no missing and no unexpected key
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params_m", [("unite_b", 217.6), ("unite_l", 545.5)])
def test_released_layouts_map_onto_the_project_model_exactly(name, params_m):
    fx = fixture(name)
    sd = layout_state(fx["entries"], device="meta")
    params = authors_params(sd)
    cfg = config_from_dict(params)
    assert cfg.model.ge_dims() == {"Base": (12, 768, 12), "Large": (24, 1024, 16)}[fx["encoder_size"]]
    assert cfg.model.decoder_dims() == (12, 768, 12) and cfg.model.decoder_kind == "patch_tokens"
    assert (cfg.model.latent_tokens, cfg.model.latent_dim, cfg.model.patch_size) == (256, 32, 16)
    ours, dropped, lpips = convert_state_dict(sd, cfg)
    with torch.device("meta"):
        model = UNITE(cfg, {"modality": "images", "channels": 3, "image_size": 256, "num_classes": 1000})
    expected = model.state_dict()
    assert sorted(set(expected) - set(ours)) == []  # no missing key
    assert sorted(set(ours) - set(expected)) == []  # no unexpected key
    assert all(tuple(ours[k].shape) == tuple(v.shape) for k, v in expected.items())
    # what does not carry over: unused tensors, recomputed rope tables, the all-zero patch table
    assert set(dropped) == {"encoder.pos_embed", "encoder.t_embedder.special_time_emb",
                            "patch_embed.position_embeddings", "encoder.feat_rope.freqs_cos",
                            "encoder.feat_rope.freqs_sin", "encoder.feat_rope_incontext.freqs_cos",
                            "encoder.feat_rope_incontext.freqs_sin"}
    assert lpips is not None and len(lpips) == 13 * 2 + 5  # VGG16 convolutions + LPIPS heads
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params / 1e6 == pytest.approx(params_m, abs=0.1)
    assert fx["trainable_parameters"] / 1e6 == pytest.approx(params_m, abs=0.1)


# ----------------------------------------------------------------------------------------------
# 2. A small model in the authors' layout: identical outputs after import
# ----------------------------------------------------------------------------------------------
SMALL = dict(W=768, depth=2, heads=12, K=16, d=8, patch=16, image=64, ctx=4, ctx_start=1, dec_w=384, dec_depth=1,
             dec_heads=6, classes=10)


def small_entries(s=SMALL) -> list:
    W, K, d, p = s["W"], s["K"], s["d"], s["patch"]
    n = (s["image"] // p) ** 2
    hd = W // s["heads"]
    hidden = int(2 / 3 * int(W * 4.0))
    e = [["latent_tokens", [1, K, W], "param", True],
         ["patch_embed.position_embeddings", [1, n + 1, W], "param", False],
         ["patch_embed.patch_embeddings.projection.weight", [W, 3, p, p], "param", True],
         ["patch_embed.patch_embeddings.projection.bias", [W], "param", True],
         ["encoder.pos_embed", [1, 256, W], "param", False],
         ["encoder.in_context_posemb", [1, s["ctx"], W], "param", True],
         ["encoder.up_sample.weight", [W, d], "param", True], ["encoder.up_sample.bias", [W], "param", True],
         ["encoder.t_embedder.W", [256], "param", False], ["encoder.t_embedder.special_time_emb", [W], "param", True],
         ["encoder.t_embedder.mlp.0.weight", [W, 512], "param", True], ["encoder.t_embedder.mlp.0.bias", [W], "param", True],
         ["encoder.t_embedder.mlp.2.weight", [W, W], "param", True], ["encoder.t_embedder.mlp.2.bias", [W], "param", True],
         ["encoder.y_embedder.embedding_table.weight", [s["classes"] + 2, W], "param", True],
         ["encoder.feat_rope.freqs_cos", [K + n, hd], "buffer", False],
         ["encoder.feat_rope.freqs_sin", [K + n, hd], "buffer", False],
         ["encoder.feat_rope_incontext.freqs_cos", [s["ctx"] + K + n, hd], "buffer", False],
         ["encoder.feat_rope_incontext.freqs_sin", [s["ctx"] + K + n, hd], "buffer", False]]
    for i in range(s["depth"]):
        b = f"encoder.blocks.{i}."
        e += [[b + "norm1.weight", [W], "param", True], [b + "norm2.weight", [W], "param", True],
              [b + "norm3.weight", [W], "param", True],
              [b + "attn.qkv.weight", [3 * W, W], "param", True], [b + "attn.qkv.bias", [3 * W], "param", True],
              [b + "attn.q_norm.weight", [hd], "param", True], [b + "attn.k_norm.weight", [hd], "param", True],
              [b + "attn.proj.weight", [W, W], "param", True], [b + "attn.proj.bias", [W], "param", True],
              [b + "mlp.w12.weight", [2 * hidden, W], "param", True], [b + "mlp.w12.bias", [2 * hidden], "param", True],
              [b + "mlp.w3.weight", [W, hidden], "param", True], [b + "mlp.w3.bias", [W], "param", True],
              [b + "adaLN_modulation.1.weight", [6 * W, W], "param", True],
              [b + "adaLN_modulation.1.bias", [6 * W], "param", True]]
    f = "encoder.final_layer."
    e += [[f + "norm_final.weight", [W], "param", True], [f + "linear.weight", [d, W], "param", True],
          [f + "linear.bias", [d], "param", True], [f + "adaLN_modulation.1.weight", [2 * W, W], "param", True],
          [f + "adaLN_modulation.1.bias", [2 * W], "param", True],
          ["encoder_layer_norm.weight", [d], "param", True], ["encoder_layer_norm.bias", [d], "param", True]]
    D = s["dec_w"]
    e += [["decoder.decoder_pos_embed", [1, n + 1, D], "param", False], ["decoder.trainable_cls_token", [D], "param", True],
          ["decoder.decoder_embed.weight", [D, 768], "param", True], ["decoder.decoder_embed.bias", [D], "param", True]]
    for i in range(s["dec_depth"]):
        b = f"decoder.decoder_layers.{i}."
        e += [[b + "layernorm_before.weight", [D], "param", True], [b + "layernorm_before.bias", [D], "param", True],
              [b + "qkv.weight", [3 * D, D], "param", True], [b + "qkv.bias", [3 * D], "param", True],
              [b + "attn_proj.weight", [D, D], "param", True], [b + "attn_proj.bias", [D], "param", True],
              [b + "layernorm_after.weight", [D], "param", True], [b + "layernorm_after.bias", [D], "param", True],
              [b + "ffn_up.weight", [4 * D, D], "param", True], [b + "ffn_up.bias", [4 * D], "param", True],
              [b + "ffn_down.weight", [D, 4 * D], "param", True], [b + "ffn_down.bias", [D], "param", True]]
    e += [["decoder.decoder_norm.weight", [D], "param", True], ["decoder.decoder_norm.bias", [D], "param", True],
          ["decoder.decoder_pred.weight", [p * p * 3, D], "param", True],
          ["decoder.decoder_pred.bias", [p * p * 3], "param", True],
          ["up_sample_decoder.weight", [768, d], "param", True], ["up_sample_decoder.bias", [768], "param", True]]
    return e


def _rms(x, w, eps=1e-6):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)) * w


def _rotate(x, cos, sin):
    pairs = x.unflatten(-1, (-1, 2))
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rot * sin


def reference_ge(sd, x_lat, t, y, patches=None, s=SMALL):
    """The authors' Generative Encoder forward (encoder.py semantics) on their own state_dict."""
    W, H = s["W"], s["heads"]
    hd = W // H
    x = F.linear(x_lat, sd["encoder.up_sample.weight"], sd["encoder.up_sample.bias"]) + sd["latent_tokens"]
    if patches is not None:
        x = torch.cat([x, patches], dim=1)
    ang = t[:, None] * sd["encoder.t_embedder.W"][None] * (2 * math.pi)
    feats = torch.cat([ang.sin(), ang.cos()], dim=-1)
    temb = F.linear(F.silu(F.linear(feats, sd["encoder.t_embedder.mlp.0.weight"], sd["encoder.t_embedder.mlp.0.bias"])),
                    sd["encoder.t_embedder.mlp.2.weight"], sd["encoder.t_embedder.mlp.2.bias"])
    yemb = sd["encoder.y_embedder.embedding_table.weight"][y]
    c = temb + yemb
    C = s["ctx"]
    for i in range(s["depth"]):
        b = f"encoder.blocks.{i}."
        if i == s["ctx_start"]:
            ctx = yemb[:, None].repeat(1, C, 1) + sd["encoder.in_context_posemb"]
            x = torch.cat([ctx, x], dim=1)
        key = "encoder.feat_rope" if i < s["ctx_start"] else "encoder.feat_rope_incontext"
        L = x.shape[1]
        cos, sin = sd[key + ".freqs_cos"][:L], sd[key + ".freqs_sin"][:L]
        mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        h = _rms(x, sd[b + "norm1.weight"]) * (1 + sc1[:, None]) + sh1[:, None]
        B, N, _ = h.shape
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = _rms(q, sd[b + "attn.q_norm.weight"]), _rms(k, sd[b + "attn.k_norm.weight"])
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W)
        x = x + g1[:, None] * F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = _rms(x, sd[b + "norm2.weight"]) * (1 + sc2[:, None]) + sh2[:, None]
        a1, a2 = F.linear(h, sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, dim=-1)
        x = x + g2[:, None] * F.linear(F.silu(a1) * a2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        x = _rms(x, sd[b + "norm3.weight"])
    x = x[:, C:][:, : s["K"]]
    f = "encoder.final_layer."
    sh, sc = F.linear(F.silu(c), sd[f + "adaLN_modulation.1.weight"], sd[f + "adaLN_modulation.1.bias"]).chunk(2, dim=1)
    raw = F.linear(_rms(x, sd[f + "norm_final.weight"]) * (1 + sc[:, None]) + sh[:, None],
                   sd[f + "linear.weight"], sd[f + "linear.bias"])
    return F.layer_norm(raw, (raw.shape[-1],), sd["encoder_layer_norm.weight"], sd["encoder_layer_norm.bias"])


def reference_tokenize(sd, imgs, noise, t, s=SMALL):
    p = s["patch"]
    pt = F.conv2d(imgs, sd["patch_embed.patch_embeddings.projection.weight"],
                  sd["patch_embed.patch_embeddings.projection.bias"], stride=p).flatten(2).transpose(1, 2)
    pt = pt + sd["patch_embed.position_embeddings"][:, 1:]
    null = torch.full((imgs.shape[0],), s["classes"], dtype=torch.long)
    return reference_ge(sd, noise, t, null, pt, s)


def reference_decode(sd, z, s=SMALL):
    D, H, p = s["dec_w"], s["dec_heads"], s["patch"]
    x = F.linear(F.linear(z, sd["up_sample_decoder.weight"], sd["up_sample_decoder.bias"]),
                 sd["decoder.decoder_embed.weight"], sd["decoder.decoder_embed.bias"])
    B, L, _ = x.shape
    g, side = s["image"] // p, int(L**0.5)
    if side != g:
        x = F.interpolate(x.reshape(B, side, side, D).permute(0, 3, 1, 2), size=(g, g), mode="bilinear",
                          align_corners=False).permute(0, 2, 3, 1).reshape(B, g * g, D)
    x = torch.cat([sd["decoder.trainable_cls_token"].expand(B, 1, D), x], dim=1) + sd["decoder.decoder_pos_embed"]
    for i in range(s["dec_depth"]):
        b = f"decoder.decoder_layers.{i}."
        h = F.layer_norm(x, (D,), sd[b + "layernorm_before.weight"], sd[b + "layernorm_before.bias"], eps=1e-12)
        N = h.shape[1]
        qkv = F.linear(h, sd[b + "qkv.weight"], sd[b + "qkv.bias"]).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(B, N, D)
        x = x + F.linear(a, sd[b + "attn_proj.weight"], sd[b + "attn_proj.bias"])
        h = F.layer_norm(x, (D,), sd[b + "layernorm_after.weight"], sd[b + "layernorm_after.bias"], eps=1e-12)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "ffn_up.weight"], sd[b + "ffn_up.bias"])),
                         sd[b + "ffn_down.weight"], sd[b + "ffn_down.bias"])
    x = F.layer_norm(x, (D,), sd["decoder.decoder_norm.weight"], sd["decoder.decoder_norm.bias"], eps=1e-12)
    out = F.linear(x, sd["decoder.decoder_pred.weight"], sd["decoder.decoder_pred.bias"])[:, 1:]
    out = out.reshape(B, g, g, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, 3, g * p, g * p)


@pytest.fixture(scope="module")
def small_import(tmp_path_factory):
    torch.manual_seed(0)
    entries = small_entries()
    sd = layout_state(entries, seed=1)
    sd["decoder.decoder_pos_embed"] = 0.1 * torch.randn_like(sd["decoder.decoder_pos_embed"])
    folder = tmp_path_factory.mktemp("authors")
    src = folder / "unite_small.pt"
    torch.save({"step": 99, "epoch": 3, "model": sd, "ema": sd, "current_best_cfg_scale": 2.4}, src)
    result = import_checkpoint(src, folder / "out" / "unite_small.pt", in_context_start=SMALL["ctx_start"])
    return sd, result


def test_imported_model_reproduces_the_authors_forward_passes(small_import):
    sd, result = small_import
    state = load_checkpoint(result.checkpoint)
    model = model_from_checkpoint(state, use_ema=False)
    g = torch.Generator().manual_seed(3)
    imgs = torch.rand(2, 3, SMALL["image"], SMALL["image"], generator=g)  # the authors' [0, 1] range
    noise = torch.randn(2, SMALL["K"], SMALL["d"], generator=g)
    t = torch.rand(2, generator=g) * 0.01
    with torch.no_grad():
        z = model.tokenize(imgs, noise=noise, t=t)
        assert torch.allclose(z, reference_tokenize(sd, imgs, noise, t), atol=2e-5)
        z_t = torch.randn(2, SMALL["K"], SMALL["d"], generator=g)
        tt, y = torch.tensor([0.3, 0.8]), torch.tensor([4, SMALL["classes"]])
        assert torch.allclose(model.denoise(z_t, tt, y), reference_ge(sd, z_t, tt, y), atol=2e-5)
        assert torch.allclose(model.decode(z), reference_decode(sd, z), atol=2e-5)


def test_import_writes_params_that_rebuild_and_resume(small_import):
    sd, result = small_import
    assert result.step == 100 and result.params.is_file()
    state = load_checkpoint(result.checkpoint)
    assert state["config"]["flow"]["minibatches"] == 14 and state["config"]["sample"]["solver"] == "dopri5"
    from unite_core.config import load_config

    cfg = load_config(result.params)
    assert cfg.train.init_from == str(result.checkpoint.resolve())
    assert cfg.to_dict()["model"] == state["config"]["model"]
    # a Trainer built from those params takes the state as its own (the resumed `unite train` path)
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3, 64, 64), torch.zeros(4, dtype=torch.long))
    cfg = load_config(result.params, ["train.batch_size=2", "train.device=cpu"])
    trainer = Trainer(cfg, state["info"], data)
    trainer.load_state_dict(state)
    assert trainer.step == 100
    model = model_from_checkpoint(state)
    images, nfe = model.generate(torch.tensor([1, 2]), solver="euler", steps=2, cfg_scale=2.0)
    assert images.shape == (2, 3, 64, 64) and nfe == 2 and 0 <= images.min() and images.max() <= 1


def test_wrong_files_are_one_clear_error(tmp_path, small_import):
    _, result = small_import
    with pytest.raises(AuthorsCheckpointError, match="already a unite checkpoint"):
        read_authors_checkpoint(result.checkpoint)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(result.checkpoint.read_bytes()[:1000])
    with pytest.raises(AuthorsCheckpointError, match="truncated, corrupt"):
        read_authors_checkpoint(truncated)
    with pytest.raises(AuthorsCheckpointError, match="does not exist"):
        read_authors_checkpoint(tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(AuthorsCheckpointError, match="not an authors' UNITE checkpoint"):
        read_authors_checkpoint(other)
    # a different size: the ema weights of another model
    sd = layout_state(small_entries())
    bigger = layout_state(small_entries({**SMALL, "depth": 3}))
    mixed = tmp_path / "mixed.pt"
    torch.save({"model": sd, "ema": bigger, "step": 0}, mixed)
    with pytest.raises(AuthorsCheckpointError, match="ema weights do not fit"):
        import_checkpoint(mixed, tmp_path / "mixed_out.pt", in_context_start=1)


def test_import_summary_names_the_model_and_the_next_commands(small_import):
    _, result = small_import
    text = result.describe(Path("released/unite_small.pt"))
    first, model_line = text.splitlines()[:2]
    assert first == f"imported released/unite_small.pt (step 100) -> {result.checkpoint}"
    assert f"K={SMALL['K']} x d={SMALL['d']}" in model_line and f"{SMALL['image']}px" in model_line
    assert "optimiser state not present" in model_line  # the file had no optimizer state
    assert f"unite sample -c {result.checkpoint} -p {result.params}" in text
