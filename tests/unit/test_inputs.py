"""What a run reads (unite_core.inputs): prepared data checked against the params, checkpoints against the
data, each refusal naming the fix."""

import types

import pytest

from unite_core.data import DataError, prepare_image_data
from unite_core.inputs import check_checkpoint_data, check_prepared, open_data
from unite_core.train import CheckpointError


def test_prepared_data_made_with_other_params_is_refused(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    folder = tmp_path / "data" / cfg.data.dataset
    prepare_image_data(cfg.data, folder)
    assert check_prepared(cfg, folder)["content_hash"]
    other = tiny_cfg(data={"val_fraction": 0.2})
    with pytest.raises(DataError, match=r"data.val_fraction=0.1 \(params: 0.2\): run `unite prepare` again"):
        check_prepared(other, folder)
    with pytest.raises(DataError, match="val_fraction"):  # open_data checks before it loads
        open_data(other, folder, tmp_path / "cache")
    assert len(open_data(cfg, folder, tmp_path / "cache").val) > 0


def test_checkpoint_trained_on_other_data_is_refused():
    data = types.SimpleNamespace(info={"modality": "images", "channels": 1, "image_size": 8, "num_classes": 10})
    check_checkpoint_data({"info": dict(data.info)}, data, "m.pt")  # the same shape passes
    with pytest.raises(CheckpointError, match="image_size=16 but the prepared data has image_size=8: use the params"):
        check_checkpoint_data({"info": {**data.info, "image_size": 16}}, data, "m.pt")
