"""Recording the Generative Encoder's activations for the paper's analyses.

Two passes of the same GE are compared on the same examples:

* **tokenization pass** — observations + K noise registers, timestep near the noise end, null
  class (exactly :meth:`GenerativeEncoder.tokenize`): per-block latent-token activations and the
  clean latent ``z0``;
* **denoising pass** at each analysis timestep ``t`` — ``z_t = t * z0 + (1 - t) * eps``
  (``t = 1`` is clean, :func:`unite_core.flow.interpolate`), run alone through the denoiser GE:
  per-block latent-token activations and the prediction ``x_hat`` (after the final latent norm).

Conditioning of the denoising pass (``class_mode``): ``"null"`` (default) uses the dropped label,
the same conditioning the tokenization pass gets, so the two passes differ only in their input
(image patches vs a noisy latent); ``"label"`` uses each example's true class, as in generation.
One noise draw ``eps`` is shared by every ``t`` (common random numbers: curves over ``t`` are
smooth and differences between timesteps are not noise).

Everything here is inference only (``torch.no_grad``, model in eval mode, float32 unless an
autocast dtype is passed); outputs are float32 CPU tensors shaped for
:func:`~unite_core.analysis.alignment.layerwise_alignment`,
:func:`~unite_core.analysis.alignment.cosine_similarity_curve` and
:func:`~unite_core.analysis.probe.layerwise_probe`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..devices import autocast
from ..flow import interpolate
from ..train import fetch, move
from .alignment import cosine_similarity_curve, layerwise_alignment
from .probe import layerwise_probe, linear_probe

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_MODES",
    "DenoisePass",
    "PassRecord",
    "select_indices",
    "tokenization_features",
    "extract_activations",
    "alignment_rows",
    "cosine_rows",
    "probe_rows",
]

CLASS_MODES = ("null", "label")


@dataclass
class DenoisePass:
    """The denoising pass at one timestep: inputs, per-block activations, prediction."""

    t: float
    z_t: torch.Tensor  # (n, K, d)
    x_hat: torch.Tensor  # (n, K, d), after the final latent norm
    hidden: list[torch.Tensor] | None = None  # per block (n, K, width); None if not recorded


@dataclass
class PassRecord:
    """Activations of both passes on the same ``n`` examples."""

    labels: torch.Tensor  # (n,)
    z0: torch.Tensor  # (n, K, d): the tokenization pass output
    tokenize_hidden: list[torch.Tensor]  # per block (n, K, width)
    denoise: dict[float, DenoisePass] = field(default_factory=dict)
    class_mode: str = "null"

    @property
    def num_layers(self) -> int:
        return len(self.tokenize_hidden)

    @property
    def num_examples(self) -> int:
        return int(self.z0.shape[0])


def select_indices(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    """``min(n, n_total)`` distinct indices drawn with a seeded permutation, returned sorted."""
    if n_total < 1:
        raise ValueError("the dataset is empty")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[: min(n, n_total)].sort().values


def _chunks(indices: torch.Tensor, batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def _cpu32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float32)


@torch.no_grad()
def tokenization_features(
    model,
    dataset,
    indices: torch.Tensor,
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Tokenization pass over ``dataset[indices]``: ``(hidden per block, z0, labels)``.

    ``hidden[l]`` is block ``l``'s latent-token activations ``(n, K, width)``; ``z0`` is
    ``(n, K, d)``; ``labels`` ``(n,)``. The register noise and tokenization timesteps come from a
    generator seeded with ``seed`` (one draw for the whole run, batch by batch), so the same
    call gives the same numbers.
    """
    device = torch.device(device)
    model.eval()
    ge = model.encoder
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden: list[list[torch.Tensor]] | None = None
    z0s, labels = [], []
    for chunk in _chunks(torch.as_tensor(indices, dtype=torch.long), batch_size):
        obs, y = model.modality.unpack(move(fetch(dataset, chunk), device))
        with autocast(device, autocast_dtype):
            z0, hid = ge.tokenize(obs, gen, return_hidden=True)
        if hidden is None:
            hidden = [[] for _ in hid]
        for store, h in zip(hidden, hid):
            store.append(_cpu32(h))
        z0s.append(_cpu32(z0))
        labels.append(torch.as_tensor(y).detach().cpu().reshape(-1))
    if hidden is None:
        raise ValueError("no examples selected")
    return [torch.cat(h) for h in hidden], torch.cat(z0s), torch.cat(labels)


@torch.no_grad()
def extract_activations(
    model,
    dataset,
    indices: torch.Tensor,
    timesteps: Sequence[float],
    *,
    cosine_timesteps: Sequence[float] = (),
    class_mode: str = "null",
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> PassRecord:
    """Record both passes on ``dataset[indices]``.

    Hidden activations of the denoising pass are kept for every ``t`` in ``timesteps``; for the
    extra ``cosine_timesteps`` only the prediction is kept (enough for the cosine curve). Every
    ``t`` must lie in ``[0, 1]``.
    """
    if class_mode not in CLASS_MODES:
        raise ValueError(f"class_mode={class_mode!r}; expected one of {CLASS_MODES}")
    all_t = sorted({float(t) for t in [*timesteps, *cosine_timesteps]})
    bad = [t for t in all_t if not 0.0 <= t <= 1.0 or not math.isfinite(t)]
    if bad:
        raise ValueError(f"timesteps must lie in [0, 1] (1 = clean latent), got {bad}")
    keep_hidden = {float(t) for t in timesteps}
    device = torch.device(device)
    hidden, z0, labels = tokenization_features(
        model, dataset, indices, seed=seed, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype
    )
    record = PassRecord(labels=labels, z0=z0, tokenize_hidden=hidden, class_mode=class_mode)
    denoiser = model.denoiser
    gen = torch.Generator().manual_seed(seed + 1)
    eps = torch.randn(z0.shape, generator=gen)  # shared across t (common random numbers)
    null = int(denoiser.null_class)
    for t in all_t:
        zts, preds, hids = [], [], ([] if t in keep_hidden else None)
        for start in range(0, z0.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            zc, ec = z0[sl].to(device), eps[sl].to(device)
            tt = torch.full((zc.shape[0],), t, device=device)
            z_t = interpolate(zc, ec, tt)
            if class_mode == "null":
                y = torch.full((zc.shape[0],), null, dtype=torch.long, device=device)
            else:
                y = labels[sl].to(device=device, dtype=torch.long)
            with autocast(device, autocast_dtype):
                x_hat, hid = denoiser.denoise(z_t, tt, y, return_hidden=hids is not None)
            zts.append(_cpu32(z_t))
            preds.append(_cpu32(x_hat))
            if hids is not None:
                hids.append([_cpu32(h) for h in hid])
        layers = None
        if hids is not None:
            layers = [torch.cat([h[i] for h in hids]) for i in range(len(hids[0]))]
        record.denoise[t] = DenoisePass(t=t, z_t=torch.cat(zts), x_hat=torch.cat(preds), hidden=layers)
    logger.info(
        "recorded %d examples: %d blocks, z0 %s, %d timesteps (%d with activations), class_mode=%s",
        record.num_examples, record.num_layers, tuple(z0.shape), len(all_t), len(keep_hidden), class_mode,
    )
    return record


def alignment_rows(record: PassRecord, k: int = 10, pool: str = "mean") -> list[dict]:
    """Per-(t, layer) linear CKA and CKNNA between the tokenization and denoising passes.

    Returns ``[{"t", "layer", "cka", "cknna"}, ...]`` sorted by ``t`` then ``layer`` (layers are
    GE block indices from 0). Pooling averages the K latent tokens of each example.
    """
    rows = []
    for t in sorted(record.denoise):
        d = record.denoise[t]
        if d.hidden is None:
            continue
        for r in layerwise_alignment(record.tokenize_hidden, d.hidden, k=min(k, record.num_examples - 1), pool=pool):
            rows.append({"t": float(t), "layer": int(r["layer"]), "cka": r["cka"], "cknna": r["cknna"]})
    return rows


def cosine_rows(record: PassRecord) -> list[dict]:
    """Cosine similarity of ``z0`` with the prediction ``x_hat`` (and with the noisy input
    ``z_t``, for reference) per timestep: ``[{"t", "cosine_mean", "cosine_std", "input_cosine_mean"}]``."""
    preds = cosine_similarity_curve(record.z0, {t: d.x_hat for t, d in record.denoise.items()})
    inputs = {r["t"]: r for r in cosine_similarity_curve(record.z0, {t: d.z_t for t, d in record.denoise.items()})}
    return [
        {"t": r["t"], "cosine_mean": r["cosine_mean"], "cosine_std": r["cosine_std"],
         "input_cosine_mean": inputs[r["t"]]["cosine_mean"]}
        for r in preds
    ]


def probe_rows(
    train_hidden: Sequence[torch.Tensor],
    train_z0: torch.Tensor,
    train_y: torch.Tensor,
    val_hidden: Sequence[torch.Tensor],
    val_z0: torch.Tensor,
    val_y: torch.Tensor,
    *,
    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    max_iter: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """Linear probes on pooled per-block features (tokenization pass), on the flattened latent
    ``z0`` and on any ``extra`` named ``(train_features, val_features)`` pairs (e.g. pixels).

    Returns ``[{"feature", "layer", "train_accuracy", "val_accuracy", "chance", "uniform_chance",
    "num_features", "converged"}]``: ``feature`` is ``block_<l>``, ``z0`` or the extra name;
    ``layer`` is the block index, ``num_blocks`` for ``z0`` (the GE output) and -1 for extras.
    """
    keys = ("train_accuracy", "val_accuracy", "chance", "uniform_chance", "num_features", "converged")
    rows = []
    for r in layerwise_probe(train_hidden, train_y, val_hidden, val_y, pool="mean", max_iter=max_iter, seed=seed):
        rows.append({"feature": f"block_{r['layer']}", "layer": int(r["layer"]), **{k: r[k] for k in keys}})
    flat = lambda z: z.reshape(z.shape[0], -1)  # noqa: E731
    r = linear_probe(flat(train_z0), train_y, flat(val_z0), val_y, max_iter=max_iter, seed=seed)
    rows.append({"feature": "z0", "layer": len(train_hidden), **{k: r[k] for k in keys}})
    for name, (a, b) in (extra or {}).items():
        r = linear_probe(flat(a), train_y, flat(b), val_y, max_iter=max_iter, seed=seed)
        rows.append({"feature": name, "layer": -1, **{k: r[k] for k in keys}})
    return rows
