"""What the stages read: the prepared data (one set of checks) and the feature classifier / network.

`open_data` opens data/<dataset>/ (manifest checked against the params' data settings by `check_prepared`,
read-time settings from the params in force); without a manifest the embedded image sets (mnist5k, digits)
are built in memory, anything else asks for `unite prepare`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from unite_core.data import DataError
from unite_core.data.images import read_manifest

log = logging.getLogger(__name__)

_IMAGE_DATA_KEYS = ("dataset", "image_size", "val_fraction", "split_seed", "max_items", "flip", "format")
EMBEDDED = ("mnist5k", "digits")
CLASSIFIER_FILE = "classifier.pt"


# --- Prepared data ---
def check_prepared(cfg, data_dir: Path) -> dict:
    """The prepared data's manifest; DataError when it is missing or was made from other data params."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if cfg.modality == "images":
        made, want = manifest.get("settings", {}), cfg.data.model_dump()
        diff = [k for k in _IMAGE_DATA_KEYS if k in made and made.get(k) != want.get(k)]
        if diff:
            detail = ", ".join(f"data.{k}={made.get(k)!r} (params: {want.get(k)!r})" for k in diff)
            raise DataError(f"the data in '{data_dir}' was prepared with {detail}: run `unite prepare` again")
    return manifest


def load_prepared_data(cfg, data_dir: Path):
    """The prepared data (.train, .val, .info) of a checked folder, with the params' read-time settings."""
    if cfg.modality == "molecules":
        from unite_core.data.molecule_sets import load_prepared_molecules

        return load_prepared_molecules(Path(data_dir), cfg.data)
    from unite_core.data import load_prepared

    return load_prepared(Path(data_dir), cfg.data)


def open_data(ctx, *, embedded: bool = True):
    """data/<dataset>/ of ctx.cfg, checked; the embedded image sets in memory when not prepared (`embedded`)."""
    cfg = ctx.cfg
    folder = ctx.paths.dataset_dir(cfg)
    if not (folder / "manifest.json").is_file() and embedded and cfg.modality == "images" \
            and cfg.data.dataset in EMBEDDED:
        from unite_core.data import load_image_data

        log.info("no prepared data in %s: building the embedded %s set in memory", folder, cfg.data.dataset)
        return load_image_data(cfg.data, ctx.paths.cache / "data")
    if cfg.modality == "images":  # load_prepared_molecules checks its manifest itself (and names the molecule data)
        check_prepared(cfg, folder)
    return load_prepared_data(cfg, folder)


def data_hash(data) -> str:
    return str(data.info.get("content_hash", ""))


# --- The feature classifier (models/classifier.pt) and the feature network of the evaluation ---
def classifier_path(ctx) -> Path:
    return ctx.paths.models / CLASSIFIER_FILE


def load_checked_classifier(ctx, data, required: bool = True):
    """models/classifier.pt, refused when it was trained on other data. (None, {}) if absent and not required."""
    from unite_core.metrics.images import MetricsError, load_classifier

    path = classifier_path(ctx)
    if not path.is_file() and not required:
        return None, {}
    model, meta = load_classifier(path)
    want = data_hash(data)
    if meta.get("data_hash") and want and meta["data_hash"] != want:
        raise MetricsError(
            f"feature classifier {path} was trained on other data (hash {meta['data_hash'][:12]} != "
            f"{want[:12]}): run `unite classifier` again"
        )
    info = data.info
    if (model.channels, model.image_size, model.num_classes) != (
        int(info["channels"]), int(info["image_size"]), int(info["num_classes"])
    ):
        raise MetricsError(
            f"feature classifier {path} expects {model.channels}x{model.image_size}x{model.image_size} images of "
            f"{model.num_classes} classes, the data has {info['channels']}x{info['image_size']} / "
            f"{info['num_classes']}: run `unite classifier` again"
        )
    return model, meta


def train_classifier(ctx, data, steps: int | None = None):
    """Train the own feature classifier on `data` and write models/classifier.pt; (model, meta)."""
    from unite_core.eval_images import dataset_images
    from unite_core.metrics.images import MetricsError, save_classifier, train_feature_classifier
    from unite_core.devices import resolve_device

    cfg = ctx.cfg
    if int(data.info.get("num_classes", 0)) < 2:
        raise MetricsError("the own feature classifier needs a labelled dataset with >= 2 classes; "
                           "use eval.feature_extractor=inception for unlabelled data")
    tx, ty = dataset_images(data.train)
    vx, vy = dataset_images(data.val)
    total = int(steps or cfg.eval.classifier_steps)
    with ctx.reporter.progress("classifier", total) as task:
        model, result = train_feature_classifier(
            tx, ty, vx, vy, steps=total, seed=cfg.train.seed, device=resolve_device(cfg.train.device),
            num_classes=int(data.info["num_classes"]), on_step=lambda step, loss: task.update(step, loss=loss),
        )
    meta = {k: result[k] for k in ("val_accuracy", "train_accuracy", "steps", "seconds")}
    meta.update(data_hash=data_hash(data), dataset=cfg.data.dataset)
    save_classifier(model.cpu(), classifier_path(ctx), meta)
    return model.cpu().eval(), meta


def check_inception_weights(cfg) -> None:
    from unite_core.metrics.images import MetricsError

    if cfg.eval.feature_extractor != "inception":
        return
    path = cfg.eval.inception_weights
    if not path or not os.path.isfile(path) or not os.access(path, os.R_OK) or os.path.getsize(path) == 0:
        raise MetricsError(
            f"eval.feature_extractor=inception needs eval.inception_weights=<readable local Inception-v3 weights "
            f"file for torch-fidelity's inception-v3-compat>; got {path!r} (nothing is downloaded), or use "
            "eval.feature_extractor=own"
        )


def feature_spec(ctx, data, device):
    """The feature network the params ask for; the own classifier is loaded in both modes (conditional
    accuracy), required only for extractor=own."""
    from unite_core.eval_images import FeatureSpec

    cfg = ctx.cfg
    check_inception_weights(cfg)
    classifier, _ = load_checked_classifier(ctx, data, required=cfg.eval.feature_extractor == "own")
    return FeatureSpec(
        extractor=cfg.eval.feature_extractor, classifier=classifier,
        inception_weights=cfg.eval.inception_weights, cache_dir=str(ctx.paths.cache / "fidelity"),
        kid_subset_size=cfg.eval.kid_subset_size, batch_size=min(cfg.eval.batch_size, 512), device=device,
        subset_size=cfg.eval.feature_subset,
    )
