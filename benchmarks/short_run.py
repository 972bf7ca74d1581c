"""Quality after a short training run: one JSON line per run.

Trains the embedded default (params.yaml, plus any `--set a.b=c` overrides) in process for
`--minutes` or `--steps`, then reports the step reached, validation PSNR of the EMA weights, and the
conditional accuracy of class-balanced samples at each guidance scale, judged by the dataset's own
classifier (`--classifier`, e.g. models/classifier.pt from `dvc repro`; trained here, ~1.5 min, when
absent). `--fid` adds gFID at each scale with the classifier's features against the training images
(the `evaluate` stage's measure) and uses the params' sampler instead of 16 Euler steps.

    python benchmarks/short_run.py --minutes 5 --set loss.recon=mse
    python benchmarks/short_run.py --steps 1800 --fid --samples 1000 --scales 1,2,3,4 --set loss.recon=l1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from unite_core.config import load_config
from unite_core.data import load_image_data
from unite_core.devices import autocast_dtype_for
from unite_core.eval_images import dataset_images, evaluate_generation, generate_balanced
from unite_core.metrics.images import conditional_accuracy, load_classifier, save_classifier, train_feature_classifier
from unite_core.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=None, help="train this many steps (no time limit)")
    ap.add_argument("--fid", action="store_true", help="gFID per scale with the params' sampler")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=c (repeatable)")
    ap.add_argument("--classifier", default=str(ROOT / "models" / "classifier.pt"))
    ap.add_argument("--samples", type=int, default=200, help="per guidance scale")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(ROOT / "params.yaml", args.overrides)
    data = load_image_data(cfg.data)
    if Path(args.classifier).is_file():
        classifier, _ = load_classifier(args.classifier)
    else:
        (tx, ty), (vx, vy) = dataset_images(data.train), dataset_images(data.val)
        classifier, meta = train_feature_classifier(tx, ty, vx, vy, steps=cfg.eval.classifier_steps)
        save_classifier(classifier, args.classifier, meta)  # reused by the next run

    trainer = Trainer(cfg, data.info, data.train, val_set=data.val)
    start = time.perf_counter()
    until = args.steps or cfg.train.steps
    limit = math.inf if args.steps else args.minutes * 60
    while trainer.step < until and time.perf_counter() - start < limit:
        trainer.train_step()
    seconds = time.perf_counter() - start
    record = {"bench": "short_run", "overrides": args.overrides, "minutes": None if args.steps else args.minutes,
              "steps": trainer.step, "s_per_step": round(seconds / max(trainer.step, 1), 4), "threads": args.threads,
              "val_psnr_ema": round(trainer.evaluate(use_ema=True)["val_psnr"], 3)}
    amp = autocast_dtype_for(cfg.train.precision)
    scales = [float(s) for s in args.scales.split(",")]
    if args.fid:
        reference = dataset_images(data.train)[0]
        result = evaluate_generation(trainer.ema.module, reference, classifier, cfg_scales=scales, n=args.samples,
                                     sample_cfg=cfg.sample, autocast_dtype=amp)
        for row in result["curve"]:
            record[f"gfid@{row['cfg_scale']:g}"] = round(row["fid"], 3)
            record[f"conditional_accuracy@{row['cfg_scale']:g}"] = round(row["conditional_accuracy"], 3)
        record["best_gfid"] = round(result["best"]["fid"], 3)
    else:
        sample_cfg = cfg.sample.model_copy(update={"solver": "euler", "steps": 16})
        for scale in scales:
            images, labels = generate_balanced(trainer.ema.module, args.samples, sample_cfg=sample_cfg,
                                               cfg_scale=scale, autocast_dtype=amp)
            record[f"conditional_accuracy@{scale:g}"] = round(conditional_accuracy(classifier, images, labels), 3)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
