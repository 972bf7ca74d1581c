"""Stage `classifier`: the dataset's own feature network for the embedded FID (eval.feature_extractor=own).

Trains a small CNN classifier (unite_core.metrics.images.FeatureClassifier) on the prepared training set
for eval.classifier_steps steps, reports its validation accuracy, and writes models/classifier.pt with the
data's content hash in its metadata (the `evaluate` stage refuses a classifier trained on other data).
Its penultimate features serve FID/KID/precision-recall, its logits IS and conditional accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from unite_core.data import DataError, load_image_data, load_prepared
from unite_core.eval_images import dataset_images
from unite_core.metrics.images import MetricsError, load_classifier, save_classifier, train_feature_classifier
from unite_core.devices import resolve_device

from ..context import StageContext

log = logging.getLogger(__name__)

#: the accuracy the issue asks of the embedded default's classifier (MNIST val)
TARGET_VAL_ACCURACY = 0.97
CLASSIFIER_FILE = "classifier.pt"


def classifier_path(ctx: StageContext) -> Path:
    return ctx.paths.models / CLASSIFIER_FILE


def load_stage_data(ctx: StageContext):
    """The prepared image data (data/<dataset>/); the embedded sets are built in memory when not prepared."""
    cfg = ctx.cfg
    folder = ctx.paths.dataset_dir(cfg)
    if (folder / "manifest.json").is_file():
        data = load_prepared(folder)
        size = int(data.info.get("image_size", cfg.data.image_size))
        if data.info.get("dataset", cfg.data.dataset) != cfg.data.dataset or size != cfg.data.image_size:
            raise DataError(
                f"prepared data in '{folder}' was made with dataset={data.info.get('dataset')} image_size={size}, "
                f"but the params say data.dataset={cfg.data.dataset} data.image_size={cfg.data.image_size}: "
                "run `unite prepare` again"
            )
        return data
    if cfg.data.dataset in ("mnist5k", "digits"):
        log.info("no prepared data in %s: building the embedded %s set in memory", folder, cfg.data.dataset)
        return load_image_data(cfg.data, ctx.paths.cache / "data")
    raise DataError(f"no prepared data in '{folder}' (manifest.json missing): run `unite prepare` first")


def data_hash(data) -> str:
    return str(data.info.get("content_hash", ""))


def load_checked_classifier(ctx: StageContext, data, required: bool = True):
    """models/classifier.pt, refused when it was trained on other data. None if absent and not required."""
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


def train_and_save(ctx: StageContext, data, steps: int | None = None) -> tuple[torch.nn.Module, dict]:
    cfg = ctx.cfg
    if int(data.info.get("num_classes", 0)) < 2:
        raise MetricsError("the own feature classifier needs a labelled dataset with >= 2 classes; "
                           "use eval.feature_extractor=inception for unlabelled data")
    tx, ty = dataset_images(data.train)
    vx, vy = dataset_images(data.val)
    device = resolve_device(cfg.train.device)
    total = int(steps or cfg.eval.classifier_steps)
    with ctx.reporter.progress("classifier", total) as task:
        model, result = train_feature_classifier(
            tx, ty, vx, vy, steps=total, seed=cfg.train.seed, device=device,
            num_classes=int(data.info["num_classes"]), on_step=lambda step, loss: task.update(step, loss=loss),
        )
    meta = {
        "val_accuracy": result["val_accuracy"],
        "train_accuracy": result["train_accuracy"],
        "steps": result["steps"],
        "seconds": result["seconds"],
        "data_hash": data_hash(data),
        "dataset": cfg.data.dataset,
    }
    save_classifier(model.cpu(), classifier_path(ctx), meta)
    return model.cpu().eval(), meta


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    if cfg.modality != "images":
        log.info("classifier stage: modality=%s has no image classifier; nothing to do", cfg.modality)
        return {"skipped": 1}
    if cfg.data.dataset == "imagefolder" and cfg.eval.feature_extractor == "inception":
        # the classifier trains on the whole training set in memory: not for ImageNet-sized folders, whose
        # evaluation uses Inception features (and no conditional accuracy)
        log.info("classifier stage: skipped for imagefolder data with eval.feature_extractor=inception")
        return {"skipped": 1}
    data = load_stage_data(ctx)
    _, meta = train_and_save(ctx, data)
    metrics = {
        "val_accuracy": float(meta["val_accuracy"]),
        "train_accuracy": float(meta["train_accuracy"]),
        "seconds": float(meta["seconds"]),
        "steps": int(meta["steps"]),
    }
    if cfg.data.dataset == "mnist5k" and metrics["val_accuracy"] < TARGET_VAL_ACCURACY:
        log.warning("classifier val accuracy %.4f is below the %.2f target on MNIST: raise eval.classifier_steps",
                    metrics["val_accuracy"], TARGET_VAL_ACCURACY)
    log.info("classifier: val accuracy %.4f in %.1f s (%d steps)", metrics["val_accuracy"], metrics["seconds"],
             metrics["steps"])
    ctx.tracker.log_artifact(classifier_path(ctx), "models")
    return metrics
