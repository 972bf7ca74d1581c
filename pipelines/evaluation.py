"""The image evaluation the `evaluate` stage and `unite compare` share, and its generation on Ray workers.

`evaluate_checkpoint_images`: guidance sweep (gFID, KID, precision/recall, IS, conditional accuracy per
scale), reconstruction (rFID, PSNR, SSIM) and noise floor, against at most MAX_REFERENCE reference images.
Generation runs here or (`eval.parallel`: `ray`, or `auto` with distributed.num_workers > 1 or use_gpu and
no GPU here) on distributed.num_workers Ray actors that build the model and the feature network (the
Inception file at the same absolute path: shared storage on a multi-node cluster). Actor r of W generates
batches r, r + W, ... with per-sample noise, so the merged shards equal the single-process run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from unite_core.analysis.report import write_csv
from unite_core.devices import autocast_dtype_for, resolve_device
from unite_core.eval_images import (CURVE_KEYS, MAX_REFERENCE, FeatureSpec, GenerationJob, LocalRunner, ShardResult,
                                    evaluate_images, flat_metrics, reference_sources, reference_with_stats_file,
                                    run_generation_shard)
from unite_core.io import atomic_write
from unite_core.metrics.images import FeatureClassifier, MetricsError
from unite_core.pictures import evaluation_pictures, grid_indices

from .context import Reporter

log = logging.getLogger(__name__)


RECONSTRUCTION_PAIRS = 50


def use_ray(cfg) -> bool:
    """Whether the evaluate stage generates on Ray workers (see the module docstring)."""
    mode, d = cfg.eval.parallel, cfg.distributed
    if mode == "local":
        return False
    if mode == "ray":
        if d.num_workers < 1:
            raise MetricsError("eval.parallel=ray needs distributed.num_workers >= 1 generation workers: raise it, "
                               "or set eval.parallel=local")
        return True
    return d.num_workers > 1 or (d.use_gpu and d.num_workers >= 1 and not torch.cuda.is_available())


def generation_runner(cfg, model, features, device, *, debug: bool = False):
    if use_ray(cfg):
        return RayGenerationRunner(cfg, model, features, debug=debug)
    return LocalRunner(model, features.net(), classifier=features.classifier, device=device)


def _model_payload(model) -> dict:  # a checkpoint's format (model_from_checkpoint rebuilds it)
    return {"config": model.cfg.to_dict(), "info": dict(model.info),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def _feature_payload(features) -> dict:
    clf = features.classifier
    payload: dict[str, Any] = {"extractor": features.extractor, "classifier": None,
                               "inception_weights": (os.path.abspath(features.inception_weights)
                                                     if features.inception_weights else None)}
    if isinstance(clf, FeatureClassifier):
        payload["classifier"] = {"config": clf.config,
                                 "state_dict": {k: v.detach().cpu() for k, v in clf.state_dict().items()}}
    elif clf is not None:
        raise MetricsError(f"Ray generation workers need a FeatureClassifier, got {type(clf).__name__}")
    return payload


class GenerationWorker:
    """A Ray actor: the model and the feature network on this worker's device, ready for GenerationJobs."""

    def __init__(self, model_payload: dict, feature_payload: dict, threads: int):
        from unite_core.metrics.images import build_feature_net
        from unite_core.train import model_from_checkpoint

        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model_from_checkpoint(model_payload, use_ema=False, device=self.device)
        classifier = None
        if feature_payload["classifier"] is not None:
            classifier = FeatureClassifier(**feature_payload["classifier"]["config"])
            classifier.load_state_dict(feature_payload["classifier"]["state_dict"])
            classifier.eval()
        self.net = build_feature_net(feature_payload["extractor"], classifier=classifier,
                                     inception_weights=feature_payload["inception_weights"], device=self.device)
        self.classifier = LocalRunner(self.model, self.net, classifier=classifier, device=self.device).classifier

    def ready(self) -> str:
        return str(self.device)

    def run(self, job: GenerationJob, shard: int, num_shards: int) -> ShardResult:
        return run_generation_shard(self.model, self.net, job, shard=shard, num_shards=num_shards,
                                    classifier=self.classifier, device=self.device)


def _first_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


class RayGenerationRunner:
    """Runs each GenerationJob as `distributed.num_workers` shards on Ray actors and merges the results."""

    def __init__(self, cfg, model, features, *, debug: bool = False):
        from .distributed import check_resources, ensure_ray

        d = cfg.distributed
        self.num_workers = int(d.num_workers)
        self.started = ensure_ray(cfg, debug=debug)
        import ray

        self._ray = ray
        try:
            check_resources(cfg, d.use_gpu, ray.cluster_resources(), "generation workers",
                            fix=", or set eval.parallel=local")
            model_ref = ray.put(_model_payload(model))
            feature_ref = ray.put(_feature_payload(features))
            actor = ray.remote(num_cpus=float(d.cpus_per_worker), num_gpus=1 if d.use_gpu else 0)(GenerationWorker)
            threads = max(1, int(d.cpus_per_worker))
            self.workers = [actor.remote(model_ref, feature_ref, threads) for _ in range(self.num_workers)]
            devices = self._get([w.ready.remote() for w in self.workers])
            log.info("generation on %d Ray workers (%s)", self.num_workers, ", ".join(devices))
        except BaseException:
            self.close()
            raise

    def _get(self, refs):
        ray = self._ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, MetricsError):
                raise MetricsError(str(cause)) from None
            what = f"{type(cause).__name__}: {_first_line(str(cause))}" if cause is not None else _first_line(str(e))
            raise MetricsError(f"a generation worker failed ({what}); rerun with --debug for its log") from None
        except ray.exceptions.RayActorError as e:
            raise MetricsError(
                f"a generation worker died or could not start ({_first_line(str(e))}); rerun with --debug for its "
                "log, or set eval.parallel=local"
            ) from None

    def __call__(self, job: GenerationJob) -> ShardResult:
        refs = [w.run.remote(job, rank, self.num_workers) for rank, w in enumerate(self.workers)]
        return ShardResult.merge(self._get(refs))

    def close(self) -> None:
        for w in getattr(self, "workers", []):
            try:
                self._ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers = []
        if getattr(self, "started", False) and self._ray.is_initialized():
            self._ray.shutdown()
            self.started = False


# --- The evaluation of one model ---
def evaluate_checkpoint_images(ctx, model, data, *, num_samples: int | None = None,
                               cfg_scales=None, device=None, tracker=None,
                               sanity: bool = True, features: FeatureSpec | None = None, references=None,
                               progress: bool = True, outputs: dict[str, Path] | None = None):
    """(flat metrics, full result) of ``model`` on ``data``; ``references``: (train, val) tensors or sources
    (default :func:`reference_sources`); ``outputs``: curve / samples / reconstructions files (None: numbers only)."""
    cfg = ctx.cfg
    device = device or resolve_device(cfg.train.device)
    tracker = tracker if tracker is not None else ctx.tracker
    features = features or ctx.feature_spec(data, device)
    stats_file = cfg.eval.reference_stats
    if references is not None:
        train_x, val_x = references
    else:  # with reference statistics the training images serve only KID and precision/recall
        max_train = cfg.eval.feature_subset if stats_file else MAX_REFERENCE
        train_x, val_x = reference_sources(data, max_train=max_train, num_workers=cfg.data.num_workers)
    reference = reference_with_stats_file(stats_file, features, train_x) if stats_file else None
    n = int(num_samples or cfg.eval.num_samples)
    scales = list(cfg_scales or cfg.eval.cfg_scales)
    write_outputs = outputs is not None
    keep = grid_indices(n, int(getattr(model, "num_classes", 0))) if write_outputs else None

    reporter = ctx.reporter if progress else Reporter()  # no nested progress bars (`unite compare` has its own)
    runner = generation_runner(cfg, model, features, device, debug=bool(getattr(ctx, "debug", False)))
    try:
        with reporter.progress(f"guidance sweep ({n} samples per scale)", len(scales)) as task:
            done = []

            def on_scale(row):
                done.append(row)
                step = int(round(row["cfg_scale"] * 100))  # MLflow step axis: the guidance scale x 100
                tracker.log_metrics({f"curve_{k}": v for k, v in row.items() if k != "cfg_scale" and v is not None},
                                    step=step)
                task.update(len(done), cfg=row["cfg_scale"], fid=row["fid"])

            result = evaluate_images(
                model, train_x, val_x, features, sample_cfg=cfg.sample, cfg_scales=scales, num_samples=n,
                batch_size=cfg.eval.batch_size, device=device, seed=cfg.sample.seed,
                autocast_dtype=autocast_dtype_for(cfg.train.precision), keep_indices=keep,
                keep_reconstructions=RECONSTRUCTION_PAIRS if write_outputs else 0, on_scale=on_scale, sanity=sanity,
                runner=runner, reference=reference,
            )
    finally:
        runner.close()
    metrics = flat_metrics(result, n)
    if write_outputs:
        write_csv(result["curve"], outputs["curve"], CURVE_KEYS)
        tracker.log_artifact(outputs["curve"], "plots")
        for key, img in evaluation_pictures(result).items():
            atomic_write(outputs[key], lambda f, img=img: img.save(f, format="PNG"))
            tracker.log_image(img, outputs[key].name)
        tracker.log_dict({"curve": result["curve"], "best": result["best"]}, "guidance_curve.json")
    return metrics, result
