"""What a run reads, with one set of checks: the prepared data (its manifest against the params' data
settings), the dataset's feature classifier (against the data it was trained on) and the evaluation's
feature network (own classifier or a local Inception file).

Without a manifest the embedded image sets (mnist5k, digits) are built in memory by `open_data`; any other
dataset asks for `unite prepare`. The pipeline's stages reach these through StageContext, which knows the
project's folders.
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


# --- Prepared data ---
def prepare(cfg, out_dir: Path, progress=None) -> tuple[dict, dict]:
    """Write the dataset the params describe to `out_dir` once (images report their phases, molecules their
    conformers, through `progress`); (its manifest, its counts: metrics/prepare.json)."""
    if cfg.modality == "molecules":
        from unite_core.data.molecule_sets import prepare_molecule_data

        manifest = info = prepare_molecule_data(cfg.data, out_dir, progress=progress)
    else:
        from unite_core.data import prepare_image_data

        manifest = prepare_image_data(cfg.data, out_dir, progress=progress)
        info = manifest["info"]
    counts = {"modality": cfg.modality, "dataset": cfg.data.dataset, "num_train": int(info["num_train"]),
              "num_val": int(info["num_val"]), "num_classes": int(info.get("num_classes", 0)),
              "content_hash": manifest["content_hash"]}
    for key in ("image_size", "channels", "max_atoms", "num_failed", "num_unreadable", "num_failed_embedding"):
        if isinstance(info.get(key), (int, float)):
            counts[key] = info[key]
    if manifest.get("skipped_corrupt"):
        counts["num_corrupt_skipped"] = len(manifest["skipped_corrupt"])
    if manifest.get("format"):
        counts["format"] = manifest["format"]
    return manifest, counts


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


def open_data(cfg, folder: Path, cache_dir: Path, *, embedded: bool = True):
    """`folder` (data/<dataset>/), checked; the embedded image sets in memory when not prepared (`embedded`)."""
    folder = Path(folder)
    if not (folder / "manifest.json").is_file() and embedded and cfg.modality == "images" \
            and cfg.data.dataset in EMBEDDED:
        from unite_core.data import load_image_data

        log.info("no prepared data in %s: building the embedded %s set in memory", folder, cfg.data.dataset)
        return load_image_data(cfg.data, Path(cache_dir))
    if cfg.modality == "images":  # load_prepared_molecules checks its manifest itself (and names the molecule data)
        check_prepared(cfg, folder)
    return load_prepared_data(cfg, folder)


def data_hash(data) -> str:
    return str(data.info.get("content_hash", ""))


def check_checkpoint_data(state: dict, data, path) -> None:
    """CheckpointError when the checkpoint at `path` was trained on data of another shape than `data`."""
    from unite_core.train import CheckpointError

    made, have = state.get("info", {}), data.info
    for key in ("modality", "channels", "image_size", "num_classes", "max_atoms"):
        if key in made and key in have and made[key] != have[key]:
            raise CheckpointError(
                f"checkpoint '{path}' was trained on data with {key}={made.get(key)} but the prepared data has "
                f"{key}={have.get(key)}: use the params it was trained with (its data section), or retrain")


# --- The feature classifier (models/classifier.pt) and the feature network of the evaluation ---
def load_checked_classifier(path: Path, data, required: bool = True):
    """The classifier at `path`, refused when it was trained on other data. (None, {}) if absent and not required."""
    from unite_core.metrics.images import MetricsError, load_classifier

    if not Path(path).is_file() and not required:
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


def train_classifier(cfg, data, path: Path, *, steps: int | None = None, progress=None):
    """Train the own feature classifier on `data` and write it to `path`; (model, meta). `progress`: a
    reporter's progress(description, total) context (per-step loss), or None."""
    from contextlib import nullcontext

    from unite_core.devices import resolve_device
    from unite_core.eval_images import dataset_images
    from unite_core.metrics.images import MetricsError, save_classifier, train_feature_classifier

    if int(data.info.get("num_classes", 0)) < 2:
        raise MetricsError("the own feature classifier needs a labelled dataset with >= 2 classes; "
                           "use eval.feature_extractor=inception for unlabelled data")
    tx, ty = dataset_images(data.train)
    vx, vy = dataset_images(data.val)
    total = int(steps or cfg.eval.classifier_steps)
    with (progress("classifier", total) if progress else nullcontext()) as task:
        model, result = train_feature_classifier(
            tx, ty, vx, vy, steps=total, seed=cfg.train.seed, device=resolve_device(cfg.train.device),
            num_classes=int(data.info["num_classes"]),
            on_step=(lambda step, loss: task.update(step, loss=loss)) if task is not None else None,
        )
    meta = {k: result[k] for k in ("val_accuracy", "train_accuracy", "steps", "seconds")}
    meta.update(data_hash=data_hash(data), dataset=cfg.data.dataset)
    save_classifier(model.cpu(), path, meta)
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


def check_reference_stats(cfg) -> None:
    """eval.reference_stats, when set, must be a readable mu/sigma .npz (checked before any expensive work)."""
    from unite_core.metrics.images import FeatureStats

    if cfg.eval.reference_stats:
        FeatureStats.load(cfg.eval.reference_stats, what="eval.reference_stats",
                          fix="point eval.reference_stats at an .npz with 'mu' (D,) and 'sigma' (D, D), or set it "
                              "to null to compare with the training images")


def feature_spec(cfg, data, device, classifier_file: Path, cache_dir: Path | None):
    """The feature network the params ask for; the own classifier is loaded in both modes (conditional
    accuracy), required only for extractor=own."""
    from unite_core.eval_images import FeatureSpec

    check_inception_weights(cfg)
    classifier, _ = load_checked_classifier(classifier_file, data, required=cfg.eval.feature_extractor == "own")
    return FeatureSpec(
        extractor=cfg.eval.feature_extractor, classifier=classifier,
        inception_weights=cfg.eval.inception_weights, cache_dir=str(cache_dir) if cache_dir else None,
        kid_subset_size=cfg.eval.kid_subset_size, batch_size=min(cfg.eval.batch_size, 512), device=device,
        subset_size=cfg.eval.feature_subset,
    )
