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


def test_a_list_item_is_named_by_its_position():
    msg = err({"sample": {"cfg_interval": [0.1, "x"]}})
    assert msg.startswith("sample.cfg_interval[1]='x' is invalid")


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


# ----------------------------------------------------------------------------------------------
# The resume key (Config.fingerprint) and unreadable params files
# ----------------------------------------------------------------------------------------------
def _changed(cfg, dotted: str):
    """cfg with one key set to a value no setting has (no validation: the rule, not the schema)."""
    section, key = dotted.split(".")
    sub = getattr(cfg, section).model_copy(update={key: "__changed__"})
    return cfg.model_copy(update={section: sub})


def test_operational_keys_stay_out_of_the_resume_key_and_every_other_key_counts():
    """Every key of the model-defining sections changes the fingerprint, except the operational ones:
    a key added to model/flow/loss/train later counts without touching the rule."""
    import warnings

    from unite_core.config import MODEL_SECTIONS, OPERATIONAL_KEYS, Config

    assert {"train.log_every", "train.eval_every", "train.time_limit_minutes", "train.device", "train.threads",
            "data.root"} <= set(OPERATIONAL_KEYS)
    base = Config()
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic warns when serialising the placeholder value
        for section in MODEL_SECTIONS:
            if section == "modality":
                continue
            for key in type(getattr(base, section)).model_fields:
                dotted = f"{section}.{key}"
                same = _changed(base, dotted).fingerprint() == base.fingerprint()
                assert same == (dotted in OPERATIONAL_KEYS), dotted
                checked += 1
    assert checked > 50
    assert config_from_dict({}, ["modality=molecules", "data.dataset=qm9", "data.root=/x"]).fingerprint() != \
        config_from_dict({}, ["data.dataset=imagefolder", "data.root=/x"]).fingerprint()
    # sections outside the model's definition never count
    assert config_from_dict({}, ["sample.cfg_scale=4", "eval.num_samples=10", "distributed.num_workers=3",
                                 "tracking.experiment=x"]).fingerprint() == base.fingerprint()


def test_a_binary_params_file_is_named_as_such(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "binary" in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)
    p.write_bytes(b"train:\n  lr: 0.1\n\x00\x00")  # valid UTF-8 with NUL bytes: still no YAML text
    with pytest.raises(ConfigError, match="binary"):
        load_config(p)


def test_a_yaml_date_names_the_key_and_the_fix(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("tracking:\n  experiment: 2026-12-01\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "tracking.experiment=2026-12-01" in msg and "date" in msg and "quote it" in msg and "\n" not in msg
    p.write_text("tracking:\n  experiment: '2026-12-01'\n")
    assert load_config(p).tracking.experiment == "2026-12-01"  # quoted, it is the text it looks like
    assert "train.lr=2026-12-01" in err(overrides=["train.lr=2026-12-01"])


def test_a_folder_as_params_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
