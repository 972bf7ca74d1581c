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

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "params.yaml")
    assert cfg.data.dataset == "mnist5k"


def _schema_keys(model, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: a nested section (a model) is walked, any other field is a key."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _schema_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_project_params_file_lists_every_key_of_the_schema():
    """params.yaml shows every setting there is (each with its value and, mostly, a comment)."""
    from pathlib import Path

    import yaml

    from unite_core.config import Config

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    keys = _schema_keys(Config)
    assert len(keys) > 140 and "train.two_phase.lr2" in keys and "sweep.space" in keys
    missing = []
    for dotted in keys:
        node = params
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(dotted)
                break
            node = node[part]
    assert missing == [], f"params.yaml lacks {missing}: add them at their defaults, with a comment"


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


# ----------------------------------------------------------------------------------------------
# Presets: `base:` and the merge
# ----------------------------------------------------------------------------------------------
def test_a_preset_is_merged_over_its_base_section_by_section(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "train:\n  lr: 0.002\n  steps: 1000\n  two_phase:\n    hold_until: 5\n    decay_until: 8\n"
        "sweep:\n  steps: 7\n  space:\n    model.latent_tokens: [2, 4]\n    model.latent_dim: [4]\n")
    (tmp_path / "presets").mkdir()
    preset = tmp_path / "presets" / "p.yaml"
    preset.write_text("# notes\nbase: ../params.yaml\ntrain:\n  lr: 0.01\n  two_phase:\n    hold_until: 6\n"
                      "sweep:\n  space:\n    model.latent_tokens: [8]\n")
    cfg = load_config(preset)
    assert (cfg.train.lr, cfg.train.steps) == (0.01, 1000)  # a section: key by key
    assert (cfg.train.two_phase.hold_until, cfg.train.two_phase.decay_until) == (6, 8)  # nested sections too
    assert cfg.sweep.steps == 7 and cfg.sweep.space == {"model.latent_tokens": [8]}  # a mapping value: replaced
    # a base of a base, and overrides on top
    (tmp_path / "presets" / "q.yaml").write_text("base: p.yaml\ntrain:\n  steps: 500\n")
    cfg = load_config(tmp_path / "presets" / "q.yaml", ["train.steps=600"])
    assert (cfg.train.lr, cfg.train.steps, cfg.train.two_phase.hold_until) == (0.01, 600, 6)


def test_a_preset_whose_base_is_missing_loops_or_was_overwritten_by_unite_preset(tmp_path):
    from unite_core.config import PRESET_MARK

    p = tmp_path / "p.yaml"
    p.write_text("base: nowhere.yaml\ntrain:\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match="builds on .*nowhere.yaml.* not a file"):
        load_config(p)
    p.write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="must name the params file it builds on"):
        load_config(p)
    p.write_text("base: q.yaml\n")
    (tmp_path / "q.yaml").write_text("base: p.yaml\n")
    with pytest.raises(ConfigError, match="a loop of bases"):
        load_config(p)
    (tmp_path / "params.yaml").write_text(f"{PRESET_MARK}digits_tiny`: presets/digits_tiny.yaml ...\ntrain:\n  lr: 1\n")
    p.write_text("base: params.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "holds preset digits_tiny" in msg and "git checkout params.yaml" in msg and "\n" not in msg
