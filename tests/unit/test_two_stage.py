"""The two-stage baseline: stage 1 trains the tokenizer alone, stage 2 freezes it and trains a separate
denoiser GE on its latents; the result is an ordinary separate-weights checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, deep_merge
from unite_core.config import DataConfig, config_from_dict
from unite_core.data import load_image_data
from unite_core.train import load_checkpoint, model_from_checkpoint
from unite_core.two_stage import (
    DenoiserTrainer,
    LatentDataset,
    TwoStageBudget,
    denoiser_config,
    encode_dataset,
    tokenizer_config,
    tokenizer_weights,
    train_two_stage,
)


@pytest.fixture(scope="module")
def digits():
    return load_image_data(DataConfig(dataset="digits", image_size=8))


def cfg_with(**sections):
    base = {"train": {"steps": 60, "batch_size": 32, "lr": 2e-3, "warmup_steps": 5, "log_every": 5,
                      "eval_every": 30, "checkpoint_every": 100, "precision": "fp32"}}
    return config_from_dict(deep_merge(deep_merge(TINY, base), sections))


def test_stage_configs():
    cfg = cfg_with(model={"weight_sharing": "shared"})
    tok = tokenizer_config(cfg, steps=7)
    assert tok.loss.recon_only and tok.model.weight_sharing == "shared" and tok.train.steps == 7
    assert tok.train.warmup_steps == 5
    assert tokenizer_config(cfg, steps=3).train.warmup_steps == 2  # kept below the step count
    den = denoiser_config(cfg)
    assert not den.loss.recon_only and den.model.weight_sharing == "separate"
    assert den.flow == cfg.flow and den.train.steps == cfg.train.steps
    with pytest.raises(ValueError, match="tokenizer_fraction"):
        TwoStageBudget(minutes=1.0, tokenizer_fraction=1.0)


@pytest.mark.slow
def test_two_stage_freezes_tokenizer_and_trains_denoiser(digits, tmp_path):
    cfg = cfg_with()
    tok_path, final_path = tmp_path / "tokenizer.pt", tmp_path / "two_stage.pt"
    logs = []
    result = train_two_stage(
        cfg, digits.info, digits.train, val_set=digits.val,
        budget=TwoStageBudget(tokenizer_steps=30, denoiser_steps=60), checkpoint_path=final_path,
        tokenizer_checkpoint_path=tok_path, on_log=lambda stage, step, rec: logs.append((stage, step, rec)),
    )
    assert (result.tokenizer_steps, result.denoiser_steps) == (30, 60)
    assert {s for s, _, _ in logs} == {"tokenizer", "denoiser"}

    tok_state = load_checkpoint(tok_path)
    assert tok_state["config"]["loss"]["recon_only"] is True
    final = load_checkpoint(final_path)
    assert final["config"]["model"]["weight_sharing"] == "separate"
    assert final["two_stage"]["denoiser_steps"] == 60 and final["two_stage"]["tokenizer_steps"] == 30
    frozen = tokenizer_weights(tok_state["ema"])
    assert frozen and set(frozen) == set(tokenizer_weights(final["model"]))
    for weights in (final["model"], final["ema"]):  # stage 2 left the tokenizer alone, bit for bit
        for k, v in frozen.items():
            assert torch.equal(weights[k], v), k

    # the denoiser moved away from its initialisation and its flow loss fell
    torch.manual_seed(cfg.train.seed)
    init = denoiser_config(cfg)
    from unite_core.model import UNITE

    fresh = UNITE(init, digits.info).state_dict()
    moved = [k for k in final["model"] if k.startswith("denoiser_ge.") and not torch.equal(final["model"][k], fresh[k])]
    assert len(moved) > 10
    flow = [rec["flow"] for stage, _, rec in logs if stage == "denoiser"]
    assert len(flow) == 12
    assert sum(flow[-3:]) / 3 < 0.7 * sum(flow[:2]) / 2

    # an ordinary checkpoint: the model rebuilds from its own config and generates
    model = model_from_checkpoint(final)
    images, _ = model.generate(torch.arange(4), solver="euler", steps=3, cfg_scale=2.0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_denoiser_trainer_optimises_only_the_denoiser(digits):
    cfg = denoiser_config(cfg_with())
    from unite_core.model import UNITE

    torch.manual_seed(0)
    frozen = tokenizer_weights(UNITE(tokenizer_config(cfg), digits.info).state_dict())
    latents = LatentDataset(torch.randn(64, 4, 4), torch.arange(64) % 10)
    tr = DenoiserTrainer(cfg, digits.info, latents, frozen)
    names = tr.trainable_parameter_names()
    assert names and all(n.startswith("denoiser_ge.") for n in names)
    optimised = {id(p) for o in tr.optimizers for g in o.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in tr.model.named_parameters() if n.startswith("denoiser_ge.")}
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    metrics = tr.train_step()
    # flow.reduction=sum: the M=3 noisings' mean losses add up
    assert set(metrics) >= {"flow", "loss"} and metrics["loss"] == pytest.approx(3 * metrics["flow"], rel=1e-5)
    after = tr.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    # the same warm-up EMA as every UNITE run: after one update the average has moved 90% of the way
    # (decay min(0.999, 1/10)), not 0.1% (torch's plain EMA at 0.999 kept 16.5% of the random init
    # after 1,800 steps in the old baseline)
    k = "denoiser_ge.blocks.0.attn.qkv.weight"
    moved = tr.ema_weights()[k] - before[k]
    assert torch.allclose(moved, 0.9 * (after[k] - before[k]), atol=1e-6)
    with pytest.raises(ValueError, match="separate"):
        DenoiserTrainer(cfg_with(), digits.info, latents, frozen)


def test_encode_dataset_gives_normalised_latents(digits):
    cfg = cfg_with()
    from unite_core.model import UNITE

    model = UNITE(tokenizer_config(cfg), digits.info)
    latents = encode_dataset(model, digits.val, batch_size=64, seed=1)
    assert latents.latents.shape == (len(digits.val), 4, 4) and len(latents) == len(digits.val)
    assert torch.equal(latents.labels, digits.val.labels)
    again = encode_dataset(model, digits.val, batch_size=50, seed=1)
    assert torch.allclose(latents.latents[:50], again.latents[:50], atol=1e-5)
    z, y = latents.get_batch(torch.tensor([0, 3]))
    assert z.shape == (2, 4, 4) and y.tolist() == digits.val.labels[[0, 3]].tolist()


def test_time_budget_is_split_between_the_stages(digits, tmp_path):
    cfg = cfg_with(train={"steps": 100000, "warmup_steps": 5, "log_every": 1000, "eval_every": 100000,
                          "checkpoint_every": 100000})
    minutes = 0.06  # 3.6 s in all, 30% to the tokenizer
    result = train_two_stage(cfg, digits.info, digits.train,
                             budget=TwoStageBudget(minutes=minutes, tokenizer_fraction=0.3),
                             checkpoint_path=tmp_path / "ts.pt")
    total = minutes * 60
    # each stage stops at its first step past its share (a step takes well under a second here)
    assert 0.3 * total <= result.tokenizer_seconds < 0.3 * total + 1.5
    assert result.tokenizer_seconds + result.encode_seconds + result.denoiser_seconds < total + 1.5
    assert result.denoiser_steps > 0 and result.tokenizer_steps > 0
    assert result.tokenizer_steps < 100000 and result.denoiser_steps < 100000
