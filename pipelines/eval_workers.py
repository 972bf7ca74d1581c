"""Generation for the `evaluate` stage on Ray workers: a guidance sweep sharded over GPUs (or CPU processes).

Each of `distributed.num_workers` Ray actors (one GPU each with `distributed.use_gpu`,
`distributed.cpus_per_worker` CPUs and as many torch threads) builds the model (weights shipped once through
Ray's object store) and the feature network (the own classifier's weights, or the Inception file at the
same absolute path: shared storage on a multi-node cluster). For each guidance scale the driver sends the
same GenerationJob to every actor; actor r generates batches r, r + W, r + 2W, ... with per-sample noise
(unite_core.eval_images.sample_noise), so the union of the shards is exactly the single-process run, and
returns only statistics (FID moments, IS sums, the kept feature subset), classifier hits and the few images
kept for pictures. The driver merges them (ShardResult.merge) and computes the metrics.

When Ray is used (`eval.parallel`): `ray` always; `local` never; `auto` when distributed.num_workers > 1,
or when distributed.use_gpu is set and the driver itself sees no GPU.
Self-contained on purpose: it needs only `ensure_ray` from pipelines.distributed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from unite_core.eval_images import GenerationJob, LocalRunner, ShardResult, run_generation_shard
from unite_core.metrics.images import FeatureClassifier, MetricsError

log = logging.getLogger(__name__)


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
    """A runner of GenerationJobs: :class:`RayGenerationRunner` or, in this process, ``LocalRunner``."""
    if use_ray(cfg):
        return RayGenerationRunner(cfg, model, features, debug=debug)
    return LocalRunner(model, features.net(), classifier=features.classifier, device=device)


def _model_payload(model) -> dict:
    return {"config": model.cfg.to_dict(), "info": dict(model.info),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


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
        from unite_core.config import config_from_dict
        from unite_core.metrics.images import build_feature_net
        from unite_core.model import UNITE

        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = UNITE(config_from_dict(model_payload["config"]), model_payload["info"])
        model.load_state_dict(model_payload["state_dict"])
        self.model = model.to(self.device).eval()
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
        from pipelines.distributed import ensure_ray

        d = cfg.distributed
        self.num_workers = int(d.num_workers)
        self.started = ensure_ray(cfg, debug=debug)
        import ray

        self._ray = ray
        try:
            have = ray.cluster_resources()
            if d.use_gpu and have.get("GPU", 0) < self.num_workers:
                raise MetricsError(
                    f"distributed.use_gpu=true with {self.num_workers} generation workers needs {self.num_workers} "
                    f"GPUs but the Ray cluster has {have.get('GPU', 0):g}: lower distributed.num_workers, set "
                    "distributed.use_gpu=false, or eval.parallel=local"
                )
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
