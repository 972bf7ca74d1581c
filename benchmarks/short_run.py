"""Quality after a short, wall-clock-bounded training run: one JSON line per run.

Trains the embedded default (params.yaml, plus any `--set a.b=c` overrides) in process for
`--minutes`, then reports the step reached, validation PSNR of the EMA weights, and the conditional
accuracy of class-balanced samples at each guidance scale, judged by the dataset's own classifier
(`--classifier`, e.g. models/classifier.pt from `dvc repro`; trained here, ~1.5 min, when absent).

    python benchmarks/short_run.py --minutes 5 --set loss.recon=mse
    python benchmarks/short_run.py --minutes 5 --set loss.recon=l1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from unite_core.config import load_config
from unite_core.data import load_image_data
from unite_core.evaluate import dataset_images, generate_balanced
from unite_core.metrics.images import conditional_accuracy, load_classifier, train_feature_classifier
from unite_core.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
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
        classifier, _ = train_feature_classifier(tx, ty, vx, vy, steps=cfg.eval.classifier_steps)

    trainer = Trainer(cfg, data.info, data.train, val_set=data.val)
    start = time.perf_counter()
    while trainer.step < cfg.train.steps and time.perf_counter() - start < args.minutes * 60:
        trainer.train_step()
    seconds = time.perf_counter() - start
    record = {"bench": "short_run", "overrides": args.overrides, "minutes": args.minutes, "steps": trainer.step,
              "s_per_step": round(seconds / max(trainer.step, 1), 4), "threads": args.threads,
              "val_psnr_ema": round(trainer.evaluate(use_ema=True)["val_psnr"], 3)}
    sample_cfg = cfg.sample.model_copy(update={"solver": "euler", "steps": 16})
    for scale in (float(s) for s in args.scales.split(",")):
        images, labels = generate_balanced(trainer.ema.module, args.samples, sample_cfg=sample_cfg, cfg_scale=scale,
                                           autocast_dtype=torch.bfloat16 if cfg.train.precision == "bf16" else None)
        record[f"conditional_accuracy@{scale:g}"] = round(conditional_accuracy(classifier, images, labels), 3)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
