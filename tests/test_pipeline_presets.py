"""Presets: every params file in presets/ validates and builds its model (on the meta device: no memory,
no weights files needed), and the embedded default preset is params.yaml itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unite_core.config import load_config
from unite_core.model import UNITE, parameter_report

PRESETS = Path(__file__).resolve().parents[1] / "presets"
NAMES = sorted(p.stem for p in PRESETS.glob("*.yaml"))


def data_info(cfg) -> dict:
    """What prepare would report for the preset's data, without reading it."""
    if cfg.modality == "molecules":
        return {"modality": "molecules", "max_atoms": cfg.data.max_atoms, "num_classes": 0}
    folder = cfg.data.dataset == "imagefolder"
    return {"modality": "images", "channels": 3 if folder else 1, "image_size": cfg.data.image_size,
            "num_classes": 1000 if folder else 10}


def test_the_expected_presets_exist():
    assert {"mnist5k", "digits_tiny", "imagenet256_unite_b", "molecules", "molecules_large"} <= set(NAMES)


def test_molecules_large_preset_is_moses_with_the_model_of_the_molecules_preset():
    small, large = load_config(PRESETS / "molecules.yaml"), load_config(PRESETS / "molecules_large.yaml")
    d = large.data
    assert (d.dataset, d.root, d.num_molecules, d.max_atoms, d.max_items) == ("moses3d", None, 20000, 32, None)
    assert d.max_heavy_atoms >= 25  # not binding at 32 atoms: MOSES's QM9-element molecules have 16-25 heavy atoms
    # only the data differ: the same model, objective and optimizer as the 479-molecule preset
    for section in ("model", "flow", "loss", "sample", "distributed"):
        assert getattr(large, section) == getattr(small, section), section
    assert (large.train.batch_size, large.train.lr, large.train.time_limit_minutes) == (16, 3e-3, 15)


def test_mnist5k_preset_is_the_embedded_default():
    root = PRESETS.parent
    assert (PRESETS / "mnist5k.yaml").read_bytes() == (root / "params.yaml").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_preset_validates_and_builds_its_model_on_the_meta_device(name):
    cfg = load_config(PRESETS / f"{name}.yaml")
    # the perceptual network is loaded from loss.perceptual_weights (a file only the user has) and is
    # kept outside the model's weights; building the model itself does not need it
    build_cfg = load_config(PRESETS / f"{name}.yaml", ["loss.w_perc=0"]) if cfg.loss.w_perc > 0 else cfg
    with torch.device("meta"):
        model = UNITE(build_cfg, data_info(cfg))
    params = parameter_report(model)["total"]
    assert params > 0
    assert all(p.is_meta for p in model.parameters())
    if name == "imagenet256_unite_b":
        assert params == pytest.approx(217.6e6, rel=0.01)  # the paper's UNITE-B: 217.6M


def test_imagenet_preset_is_the_papers_configuration():
    cfg = load_config(PRESETS / "imagenet256_unite_b.yaml")
    m, t, f = cfg.model, cfg.train, cfg.flow
    assert (m.ge_size, m.decoder_size, m.patch_size, m.latent_tokens, m.latent_dim) == ("B", "B", 16, 256, 32)
    assert (m.in_context_tokens, m.in_context_start, m.final_norm) == (32, 4, "layernorm_affine")
    steps_per_epoch = 1_281_167 // t.batch_size
    assert t.batch_size == 1024 and t.warmup_steps == 20 * steps_per_epoch and t.steps == 240 * steps_per_epoch
    assert (t.optimizer, t.lr, t.lr_min, t.ema_decay, t.precision, t.grad_clip) == (
        "muon_adamw", 1e-4, 1e-5, 0.9978, "bf16", 3.0)  # the authors' final_lr
    assert (f.minibatches, f.shift, f.stop_grad) == (3, 0.5, True)
    assert cfg.loss.w_perc == 1.0 and cfg.loss.perceptual_weights
    assert cfg.data.dataset == "imagefolder" and cfg.data.root and cfg.data.image_size == 256
    assert cfg.eval.feature_extractor == "inception" and cfg.eval.inception_weights
    assert (cfg.distributed.num_workers, cfg.distributed.use_gpu) == (8, True)
    assert t.batch_size % (cfg.distributed.num_workers * t.grad_accum) == 0
