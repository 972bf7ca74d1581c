"""Training-step throughput: samples/s, achieved GFLOP/s and MFU, one JSON line per case.

Cases: the embedded default (params.yaml: MNIST 32x32, T model, batch 64) and the paper's
GE-B + decoder-B at 256x256 (patch 16, K=256, d=32, M=3, batch 2), each in fp32 and bf16.
A step is the whole optimizer step: forward (tokenization + M flow mini-batches + decoder),
backward, Muon/AdamW update and EMA. FLOPs are counted by torch.utils.flop_counter (matrix
products, attention; Muon's Newton-Schulz products included); MFU divides the achieved rate by
the bf16 / fp32 matrix-product peaks measured in this same process.

    python benchmarks/train_step.py [--cases default,b256] [--precisions bf16,fp32] [--steps 3]
    python benchmarks/train_step.py --device cuda --cases b256 --batch 64 --compile --steps 10   # on a GPU

The b256 case is the authors' configuration (their decoder, M=3 in chunks of 3); `--batch` sets its
batch, `--compile` compiles the transformer blocks (train.compile), `--muon torch` uses torch's
one-matrix-at-a-time Muon instead of the batched one, `--set a.b=c` overrides anything else.
On CUDA it also reports images/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from unite_core.config import config_from_dict, load_config
from unite_core.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str = "cpu", reps: int = 8) -> float:
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9  # GFLOP/s


class SyntheticImages:
    """Random images of the right shape: the benchmark measures compute, not data loading."""

    def __init__(self, n, channels, size, classes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, channels, size, size, generator=g) * 2 - 1
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def get_batch(self, idx):
        return self.x[idx], self.y[idx]


def case_config(case: str, precision: str, device: str = "cpu", batch: int | None = None, extra=()):
    extra = list(extra)
    if case == "default":
        cfg = load_config(ROOT / "params.yaml", [f"train.precision={precision}", "train.warmup_steps=1",
                                                 f"train.device={device}"]
                          + ([f"train.batch_size={batch}"] if batch else []) + extra)
        info = {"modality": "images", "channels": 1, "image_size": cfg.data.image_size, "num_classes": 10}
        return cfg, info
    cfg = config_from_dict({
        "data": {"dataset": "imagefolder", "root": "/unused", "image_size": 256},
        "model": {"ge_size": "B", "decoder_size": "B", "patch_size": 16, "latent_tokens": 256,
                  "latent_dim": 32, "in_context_tokens": 32, "in_context_start": 4,
                  "decoder_kind": "patch_tokens", "decoder_latent_width": 768},
        "flow": {"minibatches": 3, "chunk_size": 3},
        "train": {"batch_size": batch or 2, "precision": precision, "steps": 1000, "warmup_steps": 1,
                  "device": device},
    }, extra)
    return cfg, {"modality": "images", "channels": 3, "image_size": 256, "num_classes": 1000}


def run_case(case: str, precision: str, steps: int, peaks: dict, device: str = "cpu", batch: int | None = None,
             extra=()) -> dict:
    cfg, info = case_config(case, precision, device, batch, extra)
    data = SyntheticImages(max(cfg.train.batch_size * 4, 8), info["channels"], info["image_size"], info["num_classes"])
    tr = Trainer(cfg, info, data, torch.device(device))
    t_compile = time.perf_counter()
    tr.train_step()  # warm-up (allocations, kernel selection, compilation)
    tr.train_step()
    t_compile = time.perf_counter() - t_compile
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with FlopCounterMode(display=False) as fc:
        tr.train_step()
    flops = fc.get_total_flops()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        tr.train_step()  # returns python floats of the metrics: it ends with a device sync already
        _sync(device)
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]  # median
    achieved = flops / step_s / 1e9
    return {
        "bench": "train_step",
        "case": case,
        "precision": precision,
        "compile": cfg.train.compile,
        "muon": "batched" if cfg.train.muon_batched else "torch",
        "overrides": list(extra),
        "warmup_s": round(t_compile, 1),
        "images_per_s": round(cfg.train.batch_size / step_s, 2),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "batch": cfg.train.batch_size,
        "flow_minibatches": cfg.flow.minibatches,
        "params_m": round(sum(p.numel() for p in tr.model.parameters()) / 1e6, 2),
        "step_s_median": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "samples_per_s": round(cfg.train.batch_size / step_s, 3),
        "s_per_sample": round(step_s / cfg.train.batch_size, 4),
        "gflop_per_step": round(flops / 1e9, 1),
        "achieved_gflops": round(achieved, 1),
        "peak_bf16_gflops": round(peaks["bf16"], 1),
        "peak_fp32_gflops": round(peaks["fp32"], 1),
        "mfu_vs_bf16_peak": round(achieved / peaks["bf16"], 4),
        "mfu_vs_fp32_peak": round(achieved / peaks["fp32"], 4),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="default,b256")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=None, help="batch of the step (default: 2 for b256, params for default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    ap.add_argument("--muon", default="batched", choices=("batched", "torch"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=c (repeatable)")
    args = ap.parse_args()
    extra = list(args.overrides) + [f"train.compile={str(args.compile).lower()}",
                                    f"train.muon_batched={str(args.muon == 'batched').lower()}"]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)
    peaks = {"bf16": matmul_peak(torch.bfloat16, args.device), "fp32": matmul_peak(torch.float32, args.device)}
    print(json.dumps({"bench": "matmul_peak", "bf16_gflops": round(peaks["bf16"], 1),
                      "fp32_gflops": round(peaks["fp32"], 1), "threads": args.threads, "device": args.device}),
          flush=True)
    for case in args.cases.split(","):
        for precision in args.precisions.split(","):
            print(json.dumps(run_case(case, precision, args.steps, peaks, args.device, args.batch, extra)),
                  flush=True)


if __name__ == "__main__":
    main()
