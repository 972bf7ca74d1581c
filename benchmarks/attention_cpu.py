"""CPU attention kernels: forward + backward time of SDPA's flash vs math kernel, one JSON line each.

unite_core.nn.Attention routes bf16 on CPU to the math kernel; this shows why (shapes of the
embedded default: tokenization, flow mini-batches, decoder).

    python benchmarks/attention_cpu.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(64, 4, 88, 32), (192, 4, 24, 32), (64, 4, 80, 32)]  # (batch, heads, tokens, head dim)


def fwd_bwd_ms(q, k, v, backend, reps: int = 5) -> float:
    with sdpa_kernel(backend):
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        start = time.perf_counter()
        for _ in range(reps):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    return (time.perf_counter() - start) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
            row = {"bench": "attention_cpu", "shape_bhnd": list(shape), "dtype": str(dtype).removeprefix("torch."),
                   "threads": args.threads}
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
                row[f"{name}_ms"] = round(fwd_bwd_ms(q, k, v, backend), 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
