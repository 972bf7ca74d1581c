"""Presets: every params file in presets/ validates and builds its model (on the meta device: no memory,
no weights files needed), holds only what it changes in its base (params.yaml, the embedded default),
resolves to the settings it always had, and the embedded default preset is params.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

from unite_core.config import Config, load_config, read_params
from unite_core.model import UNITE, parameter_report

PRESETS = Path(__file__).resolve().parents[2] / "presets"
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
    assert read_params(PRESETS / "mnist5k.yaml") == read_params(root / "params.yaml")
    assert load_config(PRESETS / "mnist5k.yaml") == load_config(root / "params.yaml")


def _flat(data: dict, schema=Config, prefix: str = "") -> dict:
    """{dotted key: value}, down to the schema's sections (a mapping value such as sweep.space is one value)."""
    out = {}
    for key, value in data.items():
        field = schema.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            out.update(_flat(value, sub, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("name", NAMES)
def test_preset_holds_only_what_it_changes_in_its_base(name):
    raw = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    base = raw.pop("base")
    assert base == "../params.yaml"  # a base of a base works too (tests/unit/test_config.py), but `unite sweep`
    # copies the params file it was given into reports/best_params.yaml, where ../params.yaml still resolves
    base_values = _flat(read_params(PRESETS / base))
    same = [k for k, v in _flat(raw).items() if k in base_values and base_values[k] == v]
    assert same == [], f"presets/{name}.yaml repeats its base's values for {same}: leave them out"


# A few values of every preset, frozen when the presets were full params files (the overlays resolve to
# the same settings; the full comparison was made when they were converted).
FROZEN = {
    "mnist5k": {"data.dataset": "mnist5k", "data.image_size": 32, "model.ge_size": "T", "model.latent_out_init": "xavier",
                "loss.recon": "mse", "train.steps": 1800, "train.lr": 0.002, "train.time_limit_minutes": 10.0,
                "sample.steps": 25, "distributed.num_workers": 1, "sweep.space": {
                    "model.latent_tokens": [2, 4, 8, 16], "model.latent_dim": [4, 16]}},
    "digits_tiny": {"data.dataset": "digits", "data.image_size": 8, "model.ge_size": "custom", "model.ge_depth": 2,
                    "model.latent_out_init": "zero", "loss.recon": "l1", "train.steps": 40, "train.lr": 0.002,
                    "train.threads": 1, "train.precision": "fp32", "sample.solver": "euler", "eval.cfg_scales": [1.0, 2.0],
                    "distributed.num_workers": 0, "sweep.space": {"model.latent_tokens": [2, 4]},
                    "analysis.probe_max_iter": 100},
    "molecules": {"modality": "molecules", "data.dataset": "molecules_embedded", "data.max_atoms": 29,
                  "model.latent_dim": 16, "model.in_context_tokens": 0, "model.latent_out_init": "zero",
                  "loss.recon": "l1", "loss.flow_warmup_steps": 200, "train.steps": 4500, "train.lr": 0.003,
                  "train.precision": "fp32", "sample.cfg_scale": 1.0, "tracking.experiment": "unite-molecules",
                  "sweep.scheduler": "asha", "sweep.space": {"model.latent_tokens": [8, 16]}},
    "molecules_large": {"modality": "molecules", "data.dataset": "moses3d", "data.num_molecules": 20000,
                        "data.max_heavy_atoms": 32, "data.max_atoms": 32, "model.ge_width": 128, "train.steps": 4500,
                        "train.batch_size": 16, "tracking.experiment": "unite-molecules-large",
                        "sweep.metric": "val_match_rate"},
    "imagenet256_unite_b": {"data.dataset": "imagefolder", "data.flip": True, "model.ge_size": "B",
                            "model.decoder_kind": "patch_tokens", "model.latent_out_init": "zero",
                            "flow.chunk_size": 3, "loss.recon": "l1", "train.lr": 1e-4, "train.schedule": "two_phase",
                            "train.two_phase.lr2": 5e-5, "train.two_phase.decay_until": 62550,
                            "train.betas": [0.9, 0.999], "train.time_limit_minutes": None, "sample.solver": "dopri5",
                            "sample.norm_unguided": False, "eval.num_samples": 50000, "eval.cfg_scales": [
                                1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0], "sweep.space": {"flow.minibatches": [3, 7]},
                            "analysis.num_images": 1024},
    "sweep_loss_weights": {"data.dataset": "mnist5k", "loss.w_gen": 1.0, "train.steps": 1800, "sweep.scheduler": "none",
                           "sweep.metric": "gfid", "sweep.mode": "min", "sweep.steps": 600, "sweep.gfid_samples": 500,
                           "sweep.gfid_scale": 2.0, "sweep.space": {"loss.w_gen": [0.3, 1.0, 3.0, 10.0],
                                                                  "flow.reduction": ["sum", "mean"],
                                                                  "model.latent_dim": [4, 16]}},
}


@pytest.mark.parametrize("name", NAMES)
def test_preset_resolves_to_its_frozen_settings(name):
    """--params presets/NAME.yaml and the params.yaml that `unite preset NAME` writes: the same settings."""
    from unite_core.config import config_from_dict, preset_params_text

    values = _flat(load_config(PRESETS / f"{name}.yaml").to_dict())
    assert {k: values[k] for k in FROZEN[name]} == FROZEN[name]
    written = config_from_dict(yaml.safe_load(preset_params_text(PRESETS / f"{name}.yaml", name)))
    assert written == load_config(PRESETS / f"{name}.yaml")


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


def test_best_params_of_a_sweep_over_a_preset_is_a_full_params_file(tmp_path):
    from unite_core.config import params_as_written

    preset = PRESETS / "sweep_loss_weights.yaml"
    doc = params_as_written(preset, ["train.steps=77"], load_config(preset))
    assert "base" not in doc and doc["sweep"]["metric"] == "gfid" and doc["train"]["steps"] == 77
    assert doc["model"] == load_config(preset).to_dict()["model"]  # the base's sections are all there
