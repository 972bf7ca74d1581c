"""Linear probing of frozen features (the paper reports ~30% ImageNet top-1 for GE features).

A probe is ``StandardScaler`` followed by multinomial ``LogisticRegression`` (lbfgs), fitted on
train features and scored on validation features. Features are taken as given (tensors or
arrays); :func:`layerwise_probe` pools per-layer token activations first.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .alignment import pool_activations

logger = logging.getLogger(__name__)

__all__ = ["linear_probe", "layerwise_probe"]


def _features(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (n, features), got shape {x.shape}")
    return x


def _labels(y) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    return np.asarray(y).reshape(-1)


def linear_probe(
    train_feats, train_y, val_feats, val_y, max_iter: int = 1000, seed: int = 0, C: float = 1.0
) -> dict:
    """Fit a linear probe on ``(train_feats, train_y)`` and evaluate on ``(val_feats, val_y)``.

    Returns ``{"train_accuracy", "val_accuracy", "chance", "uniform_chance", "num_classes",
    "num_features", "converged"}`` where ``chance`` is the validation accuracy of always
    predicting the most frequent training class and ``uniform_chance`` is ``1 / num_classes``
    (number of classes seen in training). Non-convergence within ``max_iter`` is logged, not raised.
    """
    xtr, xva = _features(train_feats), _features(val_feats)
    ytr, yva = _labels(train_y), _labels(val_y)
    if xtr.shape[0] != ytr.shape[0] or xva.shape[0] != yva.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if xtr.shape[1] != xva.shape[1]:
        raise ValueError(f"train/val feature widths differ: {xtr.shape[1]} vs {xva.shape[1]}")
    classes, counts = np.unique(ytr, return_counts=True)
    majority = classes[np.argmax(counts)]
    chance = float(np.mean(yva == majority)) if yva.size else float("nan")

    if classes.size < 2:
        logger.warning("linear_probe: only one class in training labels; returning majority predictor")
        return {
            "train_accuracy": 1.0, "val_accuracy": chance, "chance": chance,
            "uniform_chance": 1.0, "num_classes": 1, "num_features": int(xtr.shape[1]),
            "converged": True,
        }

    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(solver="lbfgs", max_iter=max_iter, C=C, random_state=seed),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(xtr, ytr)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        logger.warning("linear_probe: lbfgs did not converge in %d iterations", max_iter)
    out = {
        "train_accuracy": float(model.score(xtr, ytr)),
        "val_accuracy": float(model.score(xva, yva)) if yva.size else float("nan"),
        "chance": chance,
        "uniform_chance": 1.0 / classes.size,
        "num_classes": int(classes.size),
        "num_features": int(xtr.shape[1]),
        "converged": converged,
    }
    logger.debug("linear_probe: %s", out)
    return out


def layerwise_probe(
    train_acts: Sequence,
    train_y,
    val_acts: Sequence,
    val_y,
    pool: str = "mean",
    max_iter: int = 1000,
    seed: int = 0,
    C: float = 1.0,
) -> list[dict]:
    """Linear probe per layer.

    ``train_acts[l]`` / ``val_acts[l]`` are layer ``l``'s activations ``(n, tokens, width)`` (or
    ``(n, width)``), pooled with :func:`~unite_core.analysis.alignment.pool_activations`
    (``"mean"`` or ``"flatten"``). Returns ``[{"layer": l, **linear_probe(...)}, ...]``.
    """
    if len(train_acts) != len(val_acts):
        raise ValueError(f"layer counts differ: {len(train_acts)} vs {len(val_acts)}")
    out = []
    for layer, (a_tr, a_va) in enumerate(zip(train_acts, val_acts)):
        res = linear_probe(
            pool_activations(a_tr, pool), train_y, pool_activations(a_va, pool), val_y,
            max_iter=max_iter, seed=seed, C=C,
        )
        out.append({"layer": layer, **res})
    return out
