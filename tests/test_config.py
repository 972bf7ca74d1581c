import pytest

from unite_core.config import ConfigError, config_from_dict, load_config


def err(data=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data or {}, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_valid_and_fingerprint_is_stable():
    a, b = config_from_dict({}), config_from_dict({})
    assert a.fingerprint() == b.fingerprint()
    assert config_from_dict({}, ["train.lr=0.002"]).fingerprint() != a.fingerprint()


def test_unknown_key_names_the_key():
    msg = err({"train": {"lrr": 1e-3}})
    assert "train.lrr" in msg and "unknown key" in msg


def test_wrong_type_names_key_and_value():
    msg = err({"train": {"steps": "many"}})
    assert "train.steps" in msg and "'many'" in msg


def test_negative_lr():
    msg = err(overrides=["train.lr=-1"])
    assert "train.lr" in msg and "-1" in msg and "greater than 0" in msg


def test_zero_latent_tokens():
    msg = err(overrides=["model.latent_tokens=0"])
    assert "model.latent_tokens" in msg and "greater than or equal to 1" in msg


def test_guidance_interval_low_above_high():
    msg = err(overrides=["sample.cfg_interval=[0.9, 0.2]"])
    assert "sample.cfg_interval" in msg and "low <= high" in msg


def test_literal_lists_allowed_values():
    msg = err(overrides=["sample.solver=rk45"])
    assert "sample.solver" in msg and "dopri5" in msg and "heun" in msg


def test_patch_must_divide_image():
    msg = err(overrides=["model.patch_size=5"])
    assert "model.patch_size=5" in msg and "data.image_size=32" in msg


def test_imagefolder_needs_root():
    assert "data.root" in err(overrides=["data.dataset=imagefolder"])


def test_perceptual_needs_local_weights():
    msg = err(overrides=["loss.w_perc=1.0"])
    assert "loss.perceptual_weights" in msg


def test_inception_needs_weights_file():
    assert "eval.inception_weights" in err(overrides=["eval.feature_extractor=inception"])


def test_bad_override_syntax():
    assert "section.key=value" in err(overrides=["train.lr"])


def test_override_through_a_value_is_refused():
    assert "is a value" in err({"modality": "images"}, overrides=["modality.x=1"])


def test_overrides_are_typed():
    cfg = config_from_dict({}, ["train.lr=3e-4", "flow.shift=null", "model.rope=false"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.flow.shift is None and cfg.model.rope is False


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_project_params_file_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "params.yaml")
    assert cfg.data.dataset == "mnist5k"
