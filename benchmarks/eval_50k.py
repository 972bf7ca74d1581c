"""FID-50K at 256x256 within bounded memory: peak RSS and seconds per phase of the streamed evaluation.

A tiny random UNITE (GE and decoder of width 64, patch 16, 1000 classes) generates --samples class-balanced
256x256 images with a few Euler steps, batch by batch, exactly as the `evaluate` stage does
(unite_core.eval_images.evaluate_generation: per-sample noise, features computed per batch and summarised into
FeatureStats; only the images kept for a picture are held). The model is random on purpose: the cost per
image and the memory do not depend on what the weights learned, and the point is that memory stays flat
in the number of images.

Feature network (--features):
- own (default): the project's FeatureClassifier (3 channels, 32x32 input, 1000 classes, 128-d features),
  untrained: same cost as a trained one. Images are downscaled to 32x32 inside, as for any own classifier.
- inception: torch-fidelity's inception-v3-compat architecture with random weights, saved as a plain state
  dict and loaded through eval.inception_weights' pickle-free path (no real weights file exists here; the
  cost and the 2048-d statistics are those of the real network). About 5.7 GFLOP per image: a GPU job at
  50k images.

The reference is an ADM/JiT-format .npz (mu, sigma of the feature dimension, written here from random
reference images, --reference images) read as eval.reference_stats, with those images' features kept for
KID and precision/recall (eval.feature_subset).

Phases (one JSON line each, then a summary line): setup (model, feature network, reference),
generate_and_features (generation, features and streaming statistics of --samples images at one guidance
scale, with the seconds spent in the feature network apart), metrics (FID, KID, precision/recall, IS from
the statistics). Each line: seconds, images/s, peak RSS of the process during the phase (sampled every
10 ms), ru_maxrss so far; on CUDA also the peak allocated GPU memory.

    python benchmarks/eval_50k.py [--samples 50000] [--batch 250] [--steps 2] [--features own|inception]
                                  [--device cpu|cuda] [--threads N] [--subset 10000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_10k import PeakMemory  # noqa: E402  (the same sampler of peak RSS)

MB = 1024 * 1024


def tiny_params(image_size: int, steps: int) -> dict:
    return {
        "data": {"dataset": "mnist5k", "image_size": image_size},  # only the size matters: no data is read
        "model": {"ge_size": "custom", "ge_depth": 2, "ge_width": 64, "ge_heads": 2,
                  "decoder_size": "custom", "decoder_depth": 1, "decoder_width": 64, "decoder_heads": 2,
                  "patch_size": 16, "latent_tokens": 16, "latent_dim": 16, "in_context_tokens": 4,
                  "in_context_start": 1},
        "sample": {"solver": "euler", "steps": steps, "cfg_scale": 2.0},
        "train": {"precision": "fp32"},
    }


def line(phase: str, mem: PeakMemory, items: int, device: torch.device, **extra) -> dict:
    out = {"benchmark": "eval_50k", "phase": phase, **mem.report(items), **extra}
    out.pop("python_heap_peak_mb", None)
    if device.type == "cuda":
        out["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / MB, 1)
    print(json.dumps(out), flush=True)
    return out


class _TimedNet:
    """A FeatureNet that adds up the seconds spent in it (synchronised on CUDA)."""

    def __init__(self, net):
        self.net, self.seconds = net, 0.0
        self.name, self.device = net.name, net.device

    def __call__(self, x):
        t0 = time.perf_counter()
        out = self.net(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--steps", type=int, default=2, help="Euler steps")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--features", choices=("own", "inception"), default="own")
    ap.add_argument("--reference", type=int, default=2000, help="reference images (their mu/sigma go to the .npz)")
    ap.add_argument("--subset", type=int, default=10_000, help="eval.feature_subset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from unite_core.config import config_from_dict
    from unite_core.eval_images import FeatureSpec, GenerationJob, LocalRunner, TensorSource, reference_with_stats_file
    from unite_core.metrics.images import FeatureClassifier, to_feature_input
    from unite_core.model import UNITE

    size, n = int(args.image_size), int(args.samples)
    cfg = config_from_dict(tiny_params(size, args.steps))
    info = {"modality": "images", "channels": 3, "image_size": size, "num_classes": 1000}
    tmp = tempfile.TemporaryDirectory(prefix="eval50k-")
    common = {"samples": n, "image_size": size, "batch": args.batch, "euler_steps": args.steps,
              "features": args.features, "device": str(device), "threads": torch.get_num_threads()}
    print(json.dumps({"benchmark": "eval_50k", "phase": "start", **common,
                      "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()[0],
                      "rss_mb": round(PeakMemory().proc.memory_info().rss / MB, 1),
                      # what holding the generated images would cost (the pre-streaming evaluate held them all
                      # as float32, then a uint8 copy for torch-fidelity)
                      "all_images_float32_mb": round(n * 3 * size * size * 4 / MB, 1),
                      "all_images_uint8_mb": round(n * 3 * size * size / MB, 1)}), flush=True)

    with PeakMemory(trace_python=False) as mem:
        torch.manual_seed(0)
        model = UNITE(cfg, info).to(device).eval()
        if args.features == "own":
            clf = FeatureClassifier(3, 32, 1000).eval()
            spec = FeatureSpec(classifier=clf, device=device, batch_size=args.batch, subset_size=args.subset)
            note = "own FeatureClassifier (untrained, 32x32 input, 128-d)"
        else:
            sys.path.insert(0, str(ROOT))
            from tests.test_metrics_images import random_inception_weights

            path = random_inception_weights(Path(tmp.name) / "inception-random.pth")
            spec = FeatureSpec(extractor="inception", inception_weights=str(path), device=device,
                               batch_size=args.batch, subset_size=args.subset)
            clf = None
            note = "torch-fidelity inception-v3-compat architecture, random weights (2048-d)"
        net = spec.net()
        g = torch.Generator().manual_seed(1)
        ref_images = torch.rand(args.reference, 3, size, size, generator=g)
        feats = torch.cat([net(to_feature_input(ref_images[i:i + args.batch]))[0].double().cpu()
                           for i in range(0, len(ref_images), args.batch)]).numpy()
        npz = Path(tmp.name) / "reference.npz"
        np.savez(npz, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
        reference = reference_with_stats_file(npz, spec, TensorSource(ref_images))
        del ref_images
    line("setup", mem, args.reference, device, feature_network=note)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = _TimedNet(net)
    job = GenerationJob(n=n, cfg_scale=2.0, sample_cfg=cfg.sample, plan=spec.plan(n, isc=True), batch_size=args.batch,
                        seed=0, keep=tuple(range(0, n, max(1, n // 100))))
    with PeakMemory(trace_python=False) as mem:
        shard = LocalRunner(model, timed, classifier=clf, device=device)(job)
    gen = line("generate_and_features", mem, n, device, kept_images=len(shard.kept),
               feature_seconds=round(timed.seconds, 2), generation_seconds=round(mem.seconds - timed.seconds, 2))
    with PeakMemory(trace_python=False) as mem:
        m = spec.compare(shard.stats, reference)
    met = line("metrics", mem, n, device, metrics={k: (None if v is None else round(v, 4)) for k, v in m.items()})
    summary = {"benchmark": "eval_50k", "phase": "summary", **common, "feature_network": note,
               "peak_rss_mb": max(gen["peak_rss_mb"], met["peak_rss_mb"]), "ru_maxrss_mb": met["ru_maxrss_mb"],
               "seconds": round(gen["seconds"] + met["seconds"], 2), "images_per_s": gen["samples_per_s"],
               "feature_subset": args.subset}
    if device.type == "cuda":
        summary["gpu_peak_allocated_mb"] = met["gpu_peak_allocated_mb"]
    print(json.dumps(summary), flush=True)
    tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
