"""Input-pipeline throughput: images/s delivered to the training loop at 256x256, one JSON line per case.

Generates its own ImageNet-like JPEG folder in a temp dir (no download): ``--images`` files in 10
class folders, sizes drawn around ImageNet's average (~400x350), smooth random content plus noise,
JPEG quality 90 (~95 KB a file; ImageNet's train files average ~110 KB). Then:

* ``prepare``: ``unite_core.data.prepare_image_data`` for ``data.format=folder`` (decode every image,
  all CPUs) and ``shards`` (decode and write the 256x256 uint8 records), with its images/s.
* ``deliver``: the training loop's own delivery object (``unite_core.data.loader.StepBatches``, the
  one ``Trainer`` uses) over the prepared train split at batch ``--batch`` with flips, for each worker
  count in ``--workers`` (0 = decoded in the calling thread): images/s after the first batch
  (``startup_s`` is the wait for the first batch, worker start included), and images/s per core
  (cores = workers, or 1 for 0 workers, at most the CPUs). The batches are what the Trainer
  receives: uint8 pixels with flips applied (the conversion to float runs on the training device
  after the copy). Nothing consumes them: this is the rate the pipeline can feed, not a training step.
* ``in_memory``: the embedded MNIST-5k (32x32, batch 64) fetched in the thread and through 1-2
  workers: why the in-memory sets stay in the training thread.
* ``need``: what one H200 training step at batch 64 asks of the pipeline, against the measured
  per-core rate, with the cores per GPU a GPU node has (an extrapolation: linear in cores, labelled so).

The folder is freshly written, so its files are in the page cache: a cold disk or network
filesystem adds read time that this does not measure.

    python benchmarks/input_pipeline.py [--images 3000] [--workers 0,1,2,4] [--steps 12] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# measured in this project (docs/RESULTS.md): GE-B + decoder-B 256x256 bf16 on one H200, batch 2
H200_S_PER_SAMPLE_B2 = 0.097
TARGET_IMAGES_PER_S = 150.0  # issue target per H200 (the authors' reference: ~100)


def emit(**rec) -> None:
    print(json.dumps({"bench": "input_pipeline", **rec}), flush=True)


def _one_jpeg(args) -> int:
    path, seed = args
    rng = np.random.default_rng(seed)
    w = int(np.clip(rng.normal(400, 60), 256, 640))
    h = int(np.clip(rng.normal(350, 60), 256, 640))
    base = rng.integers(0, 256, (int(rng.integers(6, 24)), int(rng.integers(6, 24)), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 40, img.shape)  # fine detail: ~95 KB a file, near ImageNet's ~110 KB
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def make_folder(root: Path, n: int, classes: int = 10) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for i in range(n):
        d = root / f"class_{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i:06d}.jpg"), i))
    t = time.perf_counter()
    with ProcessPoolExecutor() as pool:
        sizes = list(pool.map(_one_jpeg, jobs, chunksize=32))
    return {"images": n, "classes": classes, "mean_kb": round(sum(sizes) / n / 1024, 1),
            "seconds": round(time.perf_counter() - t, 1)}


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (the DataLoader workers, once
    joined): a cost that, unlike wall time, does not grow when other jobs share the cores."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def deliver(ds, workers: int, steps: int, batch: int) -> dict:
    from unite_core.data.loader import StepBatches

    c0 = _cpu_s()
    t0 = time.perf_counter()
    sb = StepBatches(ds, batch_size=batch, seed=0, start=0, end=steps, num_workers=workers)
    first = list(sb.take(0))
    t1 = time.perf_counter()
    for s in range(1, steps):
        for b in sb.take(s):  # uint8 RawImages (folders, shards) or float tuples (in-memory sets)
            assert (b.pixels if hasattr(b, "pixels") else b[0]).shape[0] == batch
    t2 = time.perf_counter()
    sb.close()
    del first
    cpu_ms = 1000 * (_cpu_s() - c0) / (steps * batch)  # every batch, worker start-up included
    return {"startup_s": round(t1 - t0, 3), "images_per_s": round((steps - 1) * batch / (t2 - t1), 1),
            "cpu_ms_per_image": round(cpu_ms, 3), "images_per_cpu_s": round(1000 / cpu_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument("--steps", type=int, default=12, help="batches per folder case (the first is not timed)")
    ap.add_argument("--shard-steps", type=int, default=40, help="batches per shards case")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all delivery cases")
    ap.add_argument("--keep", type=Path, default=None, help="generate/keep the JPEG folder here")
    args = ap.parse_args()

    import torch

    from unite_core.config import DataConfig
    from unite_core.data import load_image_data, load_prepared, prepare_image_data
    from unite_core.data.decoding import available_cpus

    torch.set_num_threads(1)
    # workers > CPUs is one of the measured cases, not a mistake
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    cpus = available_cpus()
    emit(case="machine", cpus=cpus, cpu=platform.processor() or platform.machine(), torch=torch.__version__,
         python=platform.python_version())
    tmp = Path(tempfile.mkdtemp(prefix="unite-input-bench-"))
    root = args.keep or tmp / "jpegs"
    try:
        if not root.is_dir() or not any(root.iterdir()):
            emit(case="generate", **make_folder(root, args.images))
        common = dict(dataset="imagefolder", root=str(root), image_size=args.size, val_fraction=0.02, flip=True)
        data = {}
        for fmt in ("folder", "shards"):
            cfg = DataConfig(format=fmt, **common)
            t = time.perf_counter()
            manifest = prepare_image_data(cfg, tmp / f"prepared-{fmt}")
            sec = time.perf_counter() - t
            n = manifest["info"]["num_train"] + manifest["info"]["num_val"]
            emit(case="prepare", format=fmt, processes=cpus, images=n, seconds=round(sec, 2),
                 images_per_s=round(n / sec, 1), per_core=round(n / sec / cpus, 1))
            data[fmt] = load_prepared(tmp / f"prepared-{fmt}", cfg).train

        rates: dict[tuple[str, int], list[float]] = {}
        cpu_rates: dict[tuple[str, int], list[float]] = {}
        for rep in range(args.repeat):  # alternate the cases, so drift on a shared machine hits all alike
            for fmt in ("folder", "shards"):
                steps = args.steps if fmt == "folder" else args.shard_steps
                for w in (int(v) for v in args.workers.split(",")):
                    r = deliver(data[fmt], w, steps, args.batch)
                    cores = min(max(w, 1), cpus)
                    r["per_core"] = round(r["images_per_s"] / cores, 1)
                    rates.setdefault((fmt, w), []).append(r["images_per_s"])
                    cpu_rates.setdefault((fmt, w), []).append(r["images_per_cpu_s"])
                    emit(case="deliver", format=fmt, workers=w, batch=args.batch, size=args.size, cores=cores,
                         repeat=rep, **r)
        # a GPU node feeds through workers: images per CPU-second of the worker cases (median over
        # repeats and worker counts; CPU time, so that other jobs on the machine do not lower it)
        per_core = {fmt: round(statistics.median(v for (f, w), vals in cpu_rates.items() if f == fmt and w >= 1
                                                 for v in vals), 1)
                    for fmt in ("folder", "shards")}

        mnist = load_image_data(DataConfig(dataset="mnist5k", image_size=32)).train
        for w in (0, 1, 2):
            r = deliver(mnist, w, 60, 64)
            emit(case="in_memory", dataset="mnist5k", workers=w, batch=64,
                 ms_per_batch=round(1000 * 64 / r["images_per_s"], 3), **r)

        need_b2 = 1.0 / H200_S_PER_SAMPLE_B2
        for fmt, rate in per_core.items():
            for cores_per_gpu in (8, 16):
                feeding = cores_per_gpu - 2  # one core for the training process, one for the system
                est = rate * feeding
                emit(case="need", format=fmt, images_per_cpu_s_via_workers=rate, cores_per_gpu=cores_per_gpu,
                     loader_workers=feeding, extrapolated_images_per_s=round(est, 1),
                     cores_needed_for_target=round(TARGET_IMAGES_PER_S / rate, 2),
                     extrapolated="linear in cores from this CPU's CPU-time per image; not measured on a GPU node",
                     target_images_per_s=TARGET_IMAGES_PER_S, meets_target=bool(est >= TARGET_IMAGES_PER_S),
                     h200_measured_need_images_per_s=round(need_b2, 1),
                     step_s_at_batch_64_for_target=round(64 / TARGET_IMAGES_PER_S, 3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a --keep folder lies outside it and stays


if __name__ == "__main__":
    main()
