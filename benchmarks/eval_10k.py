"""Evaluation cost of 10,000 samples on the embedded default: time, throughput and peak memory per phase.

Phases (each timed, its peak resident memory sampled every 10 ms with psutil; ru_maxrss after it):
- generation: class-balanced sampling with the params' sampler (sample.solver/steps/cfg_interval) at one
  guidance scale (default sample.cfg_scale), eval.batch_size per batch, train.precision autocast;
- features: the feature network over the generated images and the reference (training) set, batch by
  batch, as torch-fidelity runs it (own classifier: its registered torch-fidelity extractor);
- fid: unite_core.metrics.images.fidelity_metrics as the `evaluate` stage computes the metrics (features
  streamed through torch-fidelity's extractor into statistics, then its FID/KID/precision-recall functions
  and the streamed IS; reference statistics not cached, so it includes its own feature pass).

    python benchmarks/eval_10k.py [CHECKPOINT] [--samples 10000] [--params params.yaml] [--threads N]
                                  [--generate N]

--generate N (< samples) generates only N samples and repeats them up to --samples for the feature and
FID phases (their cost does not depend on the pixels); the generation phase then reports the measured rate
and `extrapolated_seconds` for --samples. Use it where generating 10k samples takes hours (a CPU).

Without CHECKPOINT the model is freshly initialised (same cost per sample; the FID is meaningless) and the
JSON says so; without models/classifier.pt (or --classifier) an untrained feature classifier is used (same
cost). Prints one JSON line on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak RSS of this process during a block (a sampling thread) plus tracemalloc's Python-heap peak."""

    def __init__(self, interval: float = 0.01, trace_python: bool = True):
        self.interval = interval
        self.trace_python = trace_python  # tracemalloc slows every allocation down: off where RSS is what counts
        self.proc = psutil.Process()

    def __enter__(self):
        self.start_rss = self.proc.memory_info().rss
        self.peak_rss = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.trace_python:
            tracemalloc.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.py_peak = 0
        if self.trace_python:
            _, self.py_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
        return False

    def report(self, items: int) -> dict:
        mb = 1024 * 1024
        return {
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(items / max(self.seconds, 1e-9), 2),
            "peak_rss_mb": round(self.peak_rss / mb, 1),
            "rss_increase_mb": round((self.peak_rss - self.start_rss) / mb, 1),
            "python_heap_peak_mb": round(self.py_peak / mb, 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=None, help="a UNITE checkpoint (default: fresh model)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: sample.cfg_scale")
    ap.add_argument("--classifier", default=str(ROOT / "models" / "classifier.pt"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-fid", action="store_true", help="skip the torch-fidelity phase")
    ap.add_argument("--generate", type=int, default=None,
                    help="generate only this many samples and repeat them to --samples (slow machines)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from unite_core.config import load_config
    from unite_core.data import load_image_data
    from unite_core.devices import autocast_dtype_for, resolve_device
    from unite_core.eval_images import dataset_images, generate_balanced
    from unite_core.metrics.images import FeatureClassifier, fidelity_metrics, load_classifier, register_own_extractor
    from unite_core.model import UNITE
    from unite_core.train import load_checkpoint, model_from_checkpoint

    cfg = load_config(args.params, args.overrides)
    device = resolve_device(cfg.train.device)
    data = load_image_data(cfg.data)  # in memory: the benchmark writes nothing into the project
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(state, use_ema=cfg.sample.use_ema, device=device)
        model_note = f"checkpoint {args.checkpoint} (step {state.get('step')})"
    else:
        torch.manual_seed(cfg.train.seed)
        model = UNITE(cfg, data.info).to(device).eval()
        model_note = "freshly initialised model (no checkpoint given): timing is representative, FID is not"
    if os.path.isfile(args.classifier):
        classifier, _ = load_classifier(args.classifier)
        classifier_note = f"classifier {args.classifier}"
    else:
        torch.manual_seed(0)
        info = data.info
        classifier = FeatureClassifier(int(info["channels"]), int(info["image_size"]), int(info["num_classes"])).eval()
        classifier_note = "untrained feature classifier (no models/classifier.pt): same cost"
    train_x, _ = dataset_images(data.train)
    scale = cfg.sample.cfg_scale if args.cfg_scale is None else args.cfg_scale
    n = int(args.samples)
    out: dict = {
        "benchmark": "eval_10k", "samples": n, "model": model_note, "feature_network": classifier_note,
        "reference_images": len(train_x), "threads": torch.get_num_threads(), "device": str(device),
        "cpu": platform.processor() or platform.machine(), "precision": cfg.train.precision,
        "sampler": {"solver": cfg.sample.solver, "steps": cfg.sample.steps, "cfg_scale": scale,
                    "cfg_interval": list(cfg.sample.cfg_interval), "batch_size": cfg.eval.batch_size},
        "load_average": os.getloadavg()[0],
    }

    # generation
    n_gen = min(n, int(args.generate)) if args.generate else n
    with PeakMemory() as mem:
        images, labels = generate_balanced(
            model, n_gen, sample_cfg=cfg.sample, cfg_scale=scale, batch_size=cfg.eval.batch_size, device=device,
            seed=cfg.sample.seed, autocast_dtype=autocast_dtype_for(cfg.train.precision),
        )
    out["generation"] = {"generated": n_gen, **mem.report(n_gen)}
    if n_gen < n:
        out["generation"]["extrapolated_seconds"] = round(mem.seconds * n / n_gen, 1)
        reps = -(-n // n_gen)
        images = images.repeat(reps, 1, 1, 1)[:n]
        labels = labels.repeat(reps)[:n]

    # feature extraction, through the registered torch-fidelity extractor (uint8 3xHxW batches)
    import torch_fidelity  # noqa: F401
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    name = register_own_extractor(classifier)
    extractor = FEATURE_EXTRACTORS_REGISTRY[name](name, ["penultimate", "logits"])
    bs = cfg.eval.batch_size
    with PeakMemory() as mem, torch.no_grad():
        for x in (images, train_x):
            for i in range(0, len(x), bs):
                u8 = (x[i : i + bs].clamp(0, 1) * 255).round().to(torch.uint8)
                if u8.shape[1] == 1:
                    u8 = u8.expand(-1, 3, -1, -1)
                extractor(u8)
    out["features"] = mem.report(n + len(train_x))

    if not args.no_fid:
        with PeakMemory() as mem:
            m = fidelity_metrics(images, train_x, classifier=classifier, kid_subset_size=cfg.eval.kid_subset_size,
                                 batch_size=min(bs, 512), device=device)
        out["fid"] = {**mem.report(n), "metrics": {k: (None if v is None else round(v, 4)) for k, v in m.items()}}
    gen_s = out["generation"].get("extrapolated_seconds", out["generation"]["seconds"])
    out["total_seconds"] = round(gen_s + sum(out[k]["seconds"] for k in ("features", "fid") if k in out), 2)
    out["total_seconds_is_extrapolated"] = n_gen < n
    out["peak_rss_mb"] = max(out[k]["peak_rss_mb"] for k in ("generation", "features", "fid") if k in out)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
