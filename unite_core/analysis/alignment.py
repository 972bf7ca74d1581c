"""Representation alignment between two passes of the Generative Encoder.

The paper compares, layer by layer, the activations recorded during the tokenization pass
(image -> latent) with those recorded during the denoising pass (noisy latent -> latent), using
linear CKA and CKNNA, and tracks the cosine similarity between the clean latent and the latent
predicted from a corrupted copy as a function of the timestep. This module holds only the
numerics: inputs are tensors / arrays already in memory, outputs are plain Python numbers.

All similarity computations are done in float64 with torch (numpy inputs are converted; torch
inputs stay on their device).

Conventions
-----------
* A *representation* is a matrix with one row per example: ``(n, p)``.
* Features are centred (column means removed) before any kernel is formed. With centred features
  the linear kernel ``Kc = Xc Xc^T`` equals the doubly-centred kernel ``H K H`` (``H = I - 11^T/n``),
  which is what HSIC uses.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "linear_cka",
    "cknna",
    "pool_activations",
    "layerwise_alignment",
    "cosine_similarity_curve",
]


def _as_float64_2d(x, name: str) -> torch.Tensor:
    """Return ``x`` as a float64 torch tensor of shape (n, p); a 1-D input is read as (n, 1)."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    elif isinstance(x, torch.Tensor):
        t = x.detach().to(torch.float64)
    else:
        t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, features), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values")
    return t


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _check_pair(X, Y) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_float64_2d(X, "X")
    y = _as_float64_2d(Y, "Y").to(x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 examples")
    return x, y


def linear_cka(X, Y) -> float:
    """Linear centred kernel alignment between two representations of the same ``n`` examples.

    With column-centred ``Xc`` (n, p) and ``Yc`` (n, q)::

        CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)

    which equals ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` for the linear kernels
    ``K = X X^T``, ``L = Y Y^T`` (biased HSIC; the 1/(n-1)^2 factors cancel). The feature-space
    form costs O(n p q); when a feature dimension exceeds ``n`` the equivalent kernel-space form
    ``<Kc, Lc>_F / (||Kc||_F ||Lc||_F)`` (O(n^2 (p + q))) is used instead.

    Properties: CKA(X, X) = 1; invariant to orthogonal transforms and isotropic scaling of either
    side and to translations; *not* invariant to general invertible linear maps. Returns ``nan``
    (with a warning) when either centred representation is identically zero.
    """
    x, y = _check_pair(X, Y)
    xc, yc = _centre(x), _centre(y)
    n, p = xc.shape
    q = yc.shape[1]
    if max(p, q) <= n:
        num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
        den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    else:
        kc, lc = xc @ xc.T, yc @ yc.T
        num = (kc * lc).sum()
        den = torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(lc)
    den_f = float(den)
    if den_f == 0.0:
        logger.warning("linear_cka: a representation is constant across examples; CKA undefined (nan)")
        return float("nan")
    return float(num) / den_f


def _topk_mask(kc: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (n, n) mask: row i is True at the k columns j != i with the largest kc[i, j]."""
    n = kc.shape[0]
    masked = kc.clone()
    masked.fill_diagonal_(float("-inf"))
    idx = torch.topk(masked, k, dim=1).indices
    mask = torch.zeros((n, n), dtype=torch.bool, device=kc.device)
    mask.scatter_(1, idx, True)
    return mask


def cknna(X, Y, k: int = 10) -> float:
    """Centred kernel nearest-neighbour alignment (CKNNA) between two representations.

    CKNNA is CKA in which only pairs of examples that are close neighbours in *both*
    representations contribute. Definition used here (linear kernels, biased estimator):

    1. Centre the features: ``Xc = X - mean(X)``, ``Yc = Y - mean(Y)``; form the centred linear
       kernels ``Kc = Xc Xc^T`` and ``Lc = Yc Yc^T`` (n x n).
    2. Neighbour sets by kernel value: ``N_K(i)`` = the ``k`` indices ``j != i`` with the largest
       ``Kc[i, j]``; likewise ``N_L(i)`` from ``Lc``. Note this is a *directed* relation (``j`` in
       ``N_K(i)`` does not imply ``i`` in ``N_K(j)``) and ranks by inner product after centring,
       not by Euclidean distance. Ties are broken arbitrarily by ``torch.topk``.
    3. Masks: ``a_K(i, j) = 1[j in N_K(i)]``, ``a_L`` likewise, and the mutual mask
       ``a(i, j) = a_K(i, j) * a_L(i, j)`` (neighbour in both representations).
    4. Restricted alignment ``A(U, V; m) = sum_{i, j} m(i, j) U[i, j] V[i, j]`` and::

           CKNNA = A(Kc, Lc; a) / sqrt(A(Kc, Kc; a_K) * A(Lc, Lc; a_L))

    Each representation is normalised by its own alignment with itself (where the mutual mask
    reduces to its own kNN mask), so CKNNA(X, X) = 1 exactly. By Cauchy-Schwarz the value lies in
    [-1, 1]. Because the neighbour sets and all kernel values are preserved by orthogonal
    transforms and translations, and isotropic scaling by ``c > 0`` multiplies ``Kc`` by ``c^2`` on
    both numerator and denominator, CKNNA is invariant to those. When ``k >= n - 1`` every
    off-diagonal pair is kept and the value is CKA with the diagonal of the kernels excluded.

    Memory and time are O(n^2); intended for n up to a few thousand. Returns ``nan`` (with a
    warning) when a denominator is zero.
    """
    x, y = _check_pair(X, Y)
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n - 1:
        logger.warning("cknna: k=%d >= n-1=%d; clipping k to n-1 (all off-diagonal pairs)", k, n - 1)
        k = n - 1
    xc, yc = _centre(x), _centre(y)
    kc, lc = xc @ xc.T, yc @ yc.T
    mk, ml = _topk_mask(kc, k), _topk_mask(lc, k)
    mutual = mk & ml
    num = (kc * lc)[mutual].sum()
    den = torch.sqrt((kc * kc)[mk].sum() * (lc * lc)[ml].sum())
    den_f = float(den)
    if den_f == 0.0:
        logger.warning("cknna: zero self-alignment (constant representation?); CKNNA undefined (nan)")
        return float("nan")
    logger.debug("cknna: n=%d k=%d mutual-neighbour fraction=%.4f", n, k, float(mutual.sum()) / (n * k))
    return float(num) / den_f


def pool_activations(acts, pool: str = "mean") -> torch.Tensor:
    """Reduce activations to one feature row per example.

    ``acts`` is ``(n, tokens, width)`` (or already ``(n, width)``, returned as is). ``pool="mean"``
    averages over tokens -> ``(n, width)``; ``pool="flatten"`` concatenates tokens ->
    ``(n, tokens * width)``. numpy inputs are converted to torch; dtype is preserved.
    """
    t = torch.as_tensor(acts) if not isinstance(acts, torch.Tensor) else acts.detach()
    if t.ndim == 2:
        return t
    if t.ndim < 2:
        raise ValueError(f"activations must be (n, tokens, width) or (n, width), got {tuple(t.shape)}")
    if pool == "mean":
        return t.reshape(t.shape[0], -1, t.shape[-1]).mean(dim=1)
    if pool == "flatten":
        return t.reshape(t.shape[0], -1)
    raise ValueError(f"unknown pool {pool!r}; expected 'mean' or 'flatten'")


def layerwise_alignment(
    acts_a: Sequence, acts_b: Sequence, k: int = 10, pool: str = "mean"
) -> list[dict]:
    """CKA and CKNNA between corresponding layers of two recordings.

    ``acts_a[l]`` and ``acts_b[l]`` are the activations of layer ``l`` for the same ``n`` examples
    (e.g. tokenization pass vs denoising pass), each ``(n, tokens, width)``; they are pooled with
    :func:`pool_activations` (token counts may differ between the two when ``pool="mean"``).
    Returns ``[{"layer": l, "cka": ..., "cknna": ...}, ...]``.
    """
    if len(acts_a) != len(acts_b):
        raise ValueError(f"layer counts differ: {len(acts_a)} vs {len(acts_b)}")
    out = []
    for layer, (a, b) in enumerate(zip(acts_a, acts_b)):
        fa, fb = pool_activations(a, pool), pool_activations(b, pool)
        row = {"layer": layer, "cka": linear_cka(fa, fb), "cknna": cknna(fa, fb, k=k)}
        logger.debug("layerwise_alignment: %s", row)
        out.append(row)
    return out


def cosine_similarity_curve(z_clean, z_pred_by_t: Mapping[float, object], eps: float = 1e-12) -> list[dict]:
    """Per-sample cosine similarity between clean latents and predictions, per timestep.

    ``z_clean`` is ``(n, ...)``; each ``z_pred_by_t[t]`` has the same shape. Every sample is
    flattened and ``cos = <z, z_hat> / (max(||z||, eps) * max(||z_hat||, eps))`` is computed in
    float64. Returns, sorted by ``t``, ``[{"t": t, "cosine_mean": ..., "cosine_std": ...}]`` where
    the std is the population std (ddof=0) over the ``n`` samples.
    """
    zc = torch.as_tensor(z_clean).detach().to(torch.float64)
    zc = zc.reshape(zc.shape[0], -1)
    zc_norm = zc.norm(dim=1).clamp_min(eps)
    out = []
    for t in sorted(z_pred_by_t):
        zp = torch.as_tensor(z_pred_by_t[t]).detach().to(torch.float64).to(zc.device)
        if zp.shape[0] != zc.shape[0] or zp[0].numel() != zc.shape[1]:
            raise ValueError(f"prediction at t={t} has shape {tuple(zp.shape)}, clean latents {tuple(zc.shape)}")
        zp = zp.reshape(zp.shape[0], -1)
        cos = (zc * zp).sum(dim=1) / (zc_norm * zp.norm(dim=1).clamp_min(eps))
        out.append(
            {
                "t": float(t),
                "cosine_mean": float(cos.mean()),
                "cosine_std": float(cos.std(unbiased=False)) if cos.numel() > 0 else math.nan,
            }
        )
    return out
