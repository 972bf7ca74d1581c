"""Shared by every kind of test (unit/, pipeline/, molecules/): the tiny image config, deep_merge, the
thread count of torch, and `wake` for gradient-flow tests. Each folder's conftest.py adds its own fixtures."""

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


TINY = {
    "data": {"dataset": "digits", "image_size": 8},
    "model": {
        "ge_size": "custom", "ge_depth": 2, "ge_width": 64, "ge_heads": 2,
        "decoder_size": "custom", "decoder_depth": 1, "decoder_width": 64, "decoder_heads": 2,
        "patch_size": 2, "latent_tokens": 4, "latent_dim": 4, "in_context_tokens": 4, "in_context_start": 1,
    },
    "train": {"steps": 20, "batch_size": 16, "warmup_steps": 2, "lr": 1e-3, "log_every": 5,
              "eval_every": 10, "checkpoint_every": 10, "precision": "fp32"},
    "sample": {"solver": "euler", "steps": 4},
}


def deep_merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


DIGITS_INFO = {"modality": "images", "channels": 1, "image_size": 8, "num_classes": 10}


# UNITE_TEST_THREADS=1 when several test runs share the machine: oversubscribed OpenMP threads
# turn every tensor op into a scheduler wait.
THREADS = int(os.environ.get("UNITE_TEST_THREADS", max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
    yield


def wake(model):
    """Give the zero-initialised adaLN gates small random values, as after some training.

    At initialisation adaLN-zero makes every block the identity and the zero-initialised output
    projection (the authors' init) makes every latent the same, so the GE output ignores the
    observations; gradient-flow tests need a model where every path is live.
    """
    from unite_core.encoder import GenerativeEncoder
    from unite_core.nn import AdaLNBlock

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, AdaLNBlock):
                mod.ada.weight.normal_(0, 0.05, generator=g)
                mod.ada.bias.normal_(0, 0.2, generator=g)
            if isinstance(mod, GenerativeEncoder) and not mod.out_proj.weight.any():
                mod.out_proj.weight.normal_(0, 0.1, generator=g)
    return model
