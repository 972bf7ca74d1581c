"""MDL-style compression measurements: weight description length and latent rate.

Weights: each tensor's values are histogrammed (uniform bins between its min and max) and the
Shannon entropy of that histogram, in bits per value, is taken as the cost of describing one
value; ``numel * entropy`` is the tensor's description length. This is a crude, quantisation-
dependent proxy (it ignores the bin-edge side information and any structure across values), but
it is comparable across checkpoints of the same architecture, which is how the paper uses it
(random init vs trained; shared GE vs separate encoder and denoiser), grouped into attention /
MLP / normalization / conditioning / embedding / output parameters.

Latents: :func:`latent_rate` reports the raw size of the latent and an empirical estimate of the
bits per image after uniform scalar quantisation.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Mapping

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "histogram_entropy_bits",
    "tensor_group",
    "description_length",
    "compare_description_lengths",
    "latent_rate",
]

GROUPS = ("attention", "mlp", "normalization", "conditioning", "embedding", "output", "other")


def _to_numpy_f64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        t = values.detach()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        return t.to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _entropy_from_counts(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    if total <= 0 or counts.size <= 1:
        return 0.0
    p = counts / total
    return float(max(0.0, -(p * np.log2(p)).sum()))


def histogram_entropy_bits(values, bins: int = 256) -> float:
    """Shannon entropy, in bits per value, of the histogram of ``values``.

    The histogram has ``bins`` equal-width bins spanning ``[min, max]`` of the (finite) values
    (last bin closed). A constant or empty tensor has entropy 0. Non-finite values are dropped
    with a warning. The result lies in ``[0, log2(bins)]``.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    v = _to_numpy_f64(values)
    finite = np.isfinite(v)
    if not finite.all():
        logger.warning("histogram_entropy_bits: dropping %d non-finite values", int((~finite).sum()))
        v = v[finite]
    if v.size == 0:
        return 0.0
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return 0.0
    counts, _ = np.histogram(v, bins=bins, range=(lo, hi))
    return _entropy_from_counts(counts)


# --- parameter-name classification -------------------------------------------------------------

_NORM_PART = re.compile(r"(.*norm.*|ln(_?\w+)?|bn\d*|gn\d*)", re.IGNORECASE)
_COND_PARTS = {
    "ada", "out_ada", "t_embed", "y_embed", "adaln", "adaln_modulation", "t_embedder",
    "y_embedder", "time_embed", "label_embed", "class_embed", "label_emb", "modulation",
}
_EMBED_PARTS = {
    "embed", "latent_in", "latent_pos", "in_context_pos", "pos_embed", "pos_emb", "patch_embed",
    "atom_embed", "bond_embed", "token_embed", "tok_embed", "patch", "atom", "mask_token",
    "cls_token", "x_embedder", "wpe", "wte",
}
_ATTN_PARTS = {"attn", "attention", "self_attn", "cross_attn", "mha"}
_ATTN_LEAVES = {"qkv", "to_qkv", "q_proj", "k_proj", "v_proj", "to_q", "to_k", "to_v", "in_proj", "kv", "q", "k", "v"}
_MLP_PARTS = {"mlp", "ffn", "feed_forward", "ff"}
_MLP_LEAVES = {"w12", "w1", "w2", "w3", "fc1", "fc2"}
_OUTPUT_PARTS = {"out_proj", "head", "final_layer", "to_pixels", "lm_head", "output_proj"}
_PARAM_SUFFIXES = {"weight", "bias", "scale", "gamma", "beta"}


def tensor_group(name: str) -> str:
    """Classify a parameter / buffer name into one of :data:`GROUPS`.

    Rules are applied in this order (first match wins) to the dotted name's components:

    * ``normalization``: any component containing ``norm`` (``norm1``, ``q_norm``, ``k_norm``,
      ``block_norm``, ``final_norm``, ``out_norm``, ``LayerNorm``) or named like ``ln``/``ln_f``/
      ``bn``/``gn``. This precedes attention, so ``attn.q_norm.weight`` is a norm.
    * ``conditioning``: adaLN / timestep / label modules (``ada``, ``out_ada``, ``t_embed``,
      ``y_embed`` and common aliases), including the ``t_embed.mlp`` layers.
    * ``embedding``: input adapters and positional parameters (``embed``, ``latent_in``,
      ``latent_pos``, ``in_context_pos``, ``pos_embed``, patch / atom embeddings, mask/cls tokens,
      any component ending in ``_embed`` or ``_pos``).
    * ``attention``: anything under ``attn``/``attention`` (so its ``proj`` or ``out_proj``), or a
      ``qkv``/``q_proj``/... module.
    * ``mlp``: anything under ``mlp``/``ffn`` or a ``w12``/``w3``/``fc1``/``fc2`` module.
    * ``output``: ``out_proj``, ``head`` (e.g. ``decoder.head``), ``final_layer`` and aliases.
    * ``other``: everything else.
    """
    parts = [p for p in name.split(".") if p]
    # drop trailing parameter suffixes and pure indices for the component tests
    comps = [p for p in parts if not p.isdigit()]
    modules = comps[:-1] if len(comps) > 1 and comps[-1].lower() in _PARAM_SUFFIXES else comps
    low = [c.lower() for c in modules]

    if any(_NORM_PART.fullmatch(c) for c in modules):
        return "normalization"
    if any(c in _COND_PARTS or c.startswith("adaln") for c in low):
        return "conditioning"
    if any(c in _EMBED_PARTS or c.endswith("_embed") or c.endswith("_pos") or c.endswith("embedding")
           for c in low):
        return "embedding"
    if any(c in _ATTN_PARTS for c in low) or (low and low[-1] in _ATTN_LEAVES):
        return "attention"
    if any(c in _MLP_PARTS for c in low) or (low and low[-1] in _MLP_LEAVES):
        return "mlp"
    if any(c in _OUTPUT_PARTS for c in low):
        return "output"
    return "other"


# --- description length ------------------------------------------------------------------------

def description_length(state_dict: Mapping[str, object], bins: int = 256) -> dict:
    """Histogram-entropy description length of every tensor in ``state_dict``.

    Returns::

        {
          "bins": bins,
          "tensors": {name: {"group", "numel", "entropy_bits", "total_bits"}},
          "groups": {group: {"numel", "total_bits", "bits_per_value"}},   # every group in GROUPS
          "total": {"numel", "total_bits", "bits_per_value"},
        }

    where ``total_bits = numel * entropy_bits`` per tensor and group / total entries are sums of
    the per-tensor values (``bits_per_value`` = total_bits / numel, 0 for empty groups). All
    tensors (parameters and buffers, any numeric dtype) are included.
    """
    tensors: dict[str, dict] = {}
    groups = {g: {"numel": 0, "total_bits": 0.0} for g in GROUPS}
    for name, value in state_dict.items():
        numel = int(value.numel()) if isinstance(value, torch.Tensor) else int(np.size(value))
        h = histogram_entropy_bits(value, bins=bins)
        g = tensor_group(name)
        row = {"group": g, "numel": numel, "entropy_bits": h, "total_bits": numel * h}
        tensors[name] = row
        groups[g]["numel"] += numel
        groups[g]["total_bits"] += row["total_bits"]
    for agg in groups.values():
        agg["bits_per_value"] = agg["total_bits"] / agg["numel"] if agg["numel"] else 0.0
    total_numel = sum(a["numel"] for a in groups.values())
    total_bits = sum(a["total_bits"] for a in groups.values())
    total = {
        "numel": total_numel,
        "total_bits": total_bits,
        "bits_per_value": total_bits / total_numel if total_numel else 0.0,
    }
    logger.debug("description_length: %d tensors, %.3e bits", len(tensors), total_bits)
    return {"bins": bins, "tensors": tensors, "groups": groups, "total": total}


def compare_description_lengths(a: dict, b: dict) -> dict:
    """Per-group and total differences ``b - a`` between two :func:`description_length` results.

    Returns ``{"groups": {group: {"numel_a", "numel_b", "bits_a", "bits_b", "delta_bits",
    "delta_numel", "ratio"}}, "total": {...same keys...}}``; ``ratio = bits_b / bits_a`` (``nan``
    when ``bits_a`` is 0 and ``bits_b`` is not, 1.0 when both are 0).
    """
    def row(ra: dict, rb: dict) -> dict:
        ba, bb = ra["total_bits"], rb["total_bits"]
        if ba:
            ratio = bb / ba
        else:
            ratio = 1.0 if bb == 0 else math.nan
        return {
            "numel_a": ra["numel"], "numel_b": rb["numel"],
            "bits_a": ba, "bits_b": bb,
            "delta_bits": bb - ba, "delta_numel": rb["numel"] - ra["numel"],
            "ratio": ratio,
        }

    empty = {"numel": 0, "total_bits": 0.0}
    names = list(dict.fromkeys([*a["groups"], *b["groups"]]))
    groups = {g: row(a["groups"].get(g, empty), b["groups"].get(g, empty)) for g in names}
    return {"groups": groups, "total": row(a["total"], b["total"])}


# --- latent rate -------------------------------------------------------------------------------

def _per_column_entropy_bits(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plug-in entropy (bits) and number of distinct values of each column of an integer (n, D) array."""
    n, d = q.shape
    s = np.sort(q, axis=0).T  # (D, n), each row sorted
    starts = np.ones_like(s, dtype=bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    flat = starts.reshape(-1)
    idx = np.flatnonzero(flat)
    lengths = np.diff(np.append(idx, flat.size)).astype(np.float64)
    col = idx // n
    distinct = np.bincount(col, minlength=d)
    sum_clogc = np.bincount(col, weights=lengths * np.log2(lengths), minlength=d)
    h = np.log2(n) - sum_clogc / n
    return np.maximum(h, 0.0), distinct


def latent_rate(latents, step: float = 0.1, miller_madow: bool = False) -> dict:
    """Raw size and an empirical bit-rate estimate of a batch of latents ``(n, K, d)``.

    Raw rate: ``K * d`` floats per image (``32 * K * d`` bits at float32).

    Empirical rate: every latent value is quantised with a uniform scalar quantiser of absolute
    step ``step`` (``q = floor(z / step)``). The default 0.1 is in *normalised units*: UNITE's
    latents are LayerNormed per token, so each value is O(1) and 0.1 resolves roughly a tenth of
    a standard deviation. For each of the ``K * d`` dimensions the entropy of the quantised value
    is estimated from its empirical distribution across the ``n`` images (plug-in estimator) and
    these marginal entropies are summed to give bits per image.

    This is an *estimate*: (i) summing marginal entropies ignores dependencies between
    dimensions, so for the true distribution it upper-bounds the joint entropy of the quantised
    latent; (ii) the plug-in estimator is biased downwards, by roughly ``(m - 1) / (2 n ln 2)``
    bits per dimension for ``m`` occupied bins, and each dimension is capped at ``log2(n)`` bits,
    so with small ``n`` (or a fine step) it saturates — compare ``bits_per_image`` with
    ``max_bits_per_image``. ``miller_madow=True`` adds the first-order bias correction to the
    reported value. The rate grows by about ``log2(2)`` = 1 bit per dimension when ``step`` is
    halved, as for any differential-entropy-dominated source.

    Returns ``{"n", "tokens", "dim", "step", "raw_floats_per_image", "raw_bits_per_image_fp32",
    "bits_per_image", "bits_per_dim_mean", "bits_per_dim_max", "max_bits_per_image",
    "saturated_fraction", "miller_madow"}`` where ``saturated_fraction`` is the fraction of
    dimensions in which all ``n`` quantised values are distinct.
    """
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    z = torch.as_tensor(latents).detach().to(device="cpu", dtype=torch.float64)
    if z.ndim == 2:
        z = z[:, None, :]
    if z.ndim != 3:
        raise ValueError(f"latents must be (n, K, d), got shape {tuple(z.shape)}")
    n, K, d = z.shape
    if n < 2:
        raise ValueError("need at least 2 latents to estimate a rate")
    zn = z.reshape(n, K * d).numpy()
    if not np.isfinite(zn).all():
        raise ValueError("latents contain non-finite values")
    q = np.floor(zn / step).astype(np.int64)
    h, distinct = _per_column_entropy_bits(q)
    if miller_madow:
        h = h + (distinct - 1) / (2.0 * n * math.log(2.0))
    bits = float(h.sum())
    out = {
        "n": n,
        "tokens": K,
        "dim": d,
        "step": float(step),
        "raw_floats_per_image": K * d,
        "raw_bits_per_image_fp32": 32 * K * d,
        "bits_per_image": bits,
        "bits_per_dim_mean": float(h.mean()),
        "bits_per_dim_max": float(h.max()),
        "max_bits_per_image": K * d * math.log2(n),
        "saturated_fraction": float((distinct == n).mean()),
        "miller_madow": bool(miller_madow),
    }
    if out["saturated_fraction"] > 0.5:
        logger.warning(
            "latent_rate: %.0f%% of dimensions have all %d values distinct; the estimate is capped "
            "by log2(n) — use more latents or a coarser step", 100 * out["saturated_fraction"], n
        )
    return out
