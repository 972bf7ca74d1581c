"""Pictures of image sets: a grid, originals above their reconstructions, one row per class.

Images are float (N, C, H, W) in [0, 1] with C in {1, 3}; the result is a PIL image. With
``min_tile`` a small picture is upscaled (nearest neighbour, an integer factor) so that a tile is at
least that many pixels wide: a 32x32 digit is unreadable at its native size in a browser.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.5, min_tile: int = 0):
    """A PIL image of ``images`` ([0, 1], (N, C, H, W), C in {1, 3}) laid out ``nrow`` per row.

    With ``min_tile`` the picture is upscaled by the smallest integer factor (nearest neighbour) that makes
    a tile at least that many pixels wide."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid expects (N, 1|3, H, W) images, got shape {tuple(images.shape)}")
    images = images.detach()
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("image_grid: no images")
    nrow = max(1, min(int(nrow), n))
    rows = math.ceil(n / nrow)
    H = rows * h + (rows + 1) * padding
    W = nrow * w + (nrow + 1) * padding
    canvas = torch.full((c, H, W), float(pad_value))
    for i in range(n):
        r, col = divmod(i, nrow)
        y0 = padding + r * (h + padding)
        x0 = padding + col * (w + padding)
        canvas[:, y0 : y0 + h, x0 : x0 + w] = images[i].float().clamp(0, 1)
    arr = (canvas * 255.0).round().to(torch.uint8)
    if c == 1:
        img = Image.fromarray(arr[0].numpy(), mode="L")
    else:
        img = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    scale = math.ceil(min_tile / w) if min_tile and w < min_tile else 1
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def pairs_grid(originals: torch.Tensor, reconstructions: torch.Tensor, ncol: int = 10, **kwargs):
    """Rows alternate: ``ncol`` originals, then their ``ncol`` reconstructions below them."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"pairs_grid: shapes differ {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    chunks = []
    for start in range(0, len(originals), ncol):
        a = originals[start : start + ncol]
        b = reconstructions[start : start + ncol]
        if len(a) < ncol:  # pad the last pair of rows so originals and reconstructions stay aligned
            fill = torch.zeros((ncol - len(a), *a.shape[1:]))
            a, b = torch.cat([a, fill]), torch.cat([b, fill])
        chunks += [a, b]
    return image_grid(torch.cat(chunks), nrow=ncol, **kwargs)


def class_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int = 10, **kwargs):
    """One row per class (sorted), up to ``per_class`` samples each: the samples picture."""
    rows = []
    classes = sorted(set(int(c) for c in labels.tolist()))
    for c in classes:
        sel = images[labels == c][:per_class]
        if len(sel) < per_class:
            sel = torch.cat([sel, torch.zeros((per_class - len(sel), *images.shape[1:]))])
        rows.append(sel)
    return image_grid(torch.cat(rows), nrow=per_class, **kwargs)


# --- Pictures of a model ---
#: tiles narrower than this are upscaled (nearest neighbour) in the project's PNGs: 32x32 digits are unreadable as is
MIN_TILE = 64
SAMPLES_PER_CLASS = 10
#: samples.png shows at most this many classes (evenly spaced over the label range: 1000 ImageNet classes)
GRID_CLASSES = 10


def evaluation_pictures(result: dict) -> dict:
    """samples.png (a row per class) and reconstructions.png (originals above their reconstructions) of an
    image evaluation's result (eval_images.evaluate_images with keep_indices and keep_reconstructions)."""
    rec = result["reconstruction"]
    return {"samples": class_grid(result["samples"], result["labels"], per_class=SAMPLES_PER_CLASS, min_tile=MIN_TILE),
            "reconstructions": pairs_grid(rec["originals"], rec["reconstructions"], ncol=10, min_tile=MIN_TILE)}


def grid_indices(n: int, num_classes: int, per_class: int = SAMPLES_PER_CLASS, max_classes: int = GRID_CLASSES):
    """Indices kept for samples.png: the first ``per_class`` samples of up to ``max_classes`` classes."""
    from .model import balanced_labels

    labels = balanced_labels(n, num_classes)
    classes = sorted(set(labels.tolist()))
    if len(classes) > max_classes:
        pick = torch.linspace(0, len(classes) - 1, max_classes).round().long().tolist()
        classes = [classes[i] for i in pick]
    out = []
    for c in classes:
        out += (labels == c).nonzero().flatten()[:per_class].tolist()
    return out


class SampleOptionError(ValueError):
    """A class list, count or guidance scale that cannot be sampled; the message names the option."""


def parse_classes(text: str | None) -> list[int] | None:
    """'0,1,2' or '0-4,7' -> [0, 1, 2] / [0, 1, 2, 3, 4, 7]; None or '' -> None (all classes)."""
    if text is None or not str(text).strip():
        return None
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        try:
            lo, sep, hi = part[1:].partition("-")  # part[0] may be a minus sign
            out.extend(range(int(part[0] + lo), int(hi) + 1) if sep else [int(part)])
        except (ValueError, IndexError):
            raise SampleOptionError(f"--classes '{text}' must be class ids like 0,1,2 or 0-4") from None
    return out


def class_labels(classes: list[int] | str | None, per_class: int | None, num_classes: int,
                 num_samples: int) -> tuple[list[int], int]:
    """(classes, per class) of a sample grid: every class by default, num_samples spread over them."""
    classes = parse_classes(classes) if isinstance(classes, str) else classes
    if classes is None:
        classes = list(range(num_classes)) if num_classes > 0 else [0]
    bad = [c for c in classes if not 0 <= c < max(num_classes, 1)]
    if bad:
        raise SampleOptionError(f"--classes {bad} out of range: this model has {num_classes} classes "
                                f"(0..{num_classes - 1})")
    per_class = per_class or max(1, num_samples // len(classes))
    if per_class < 1:
        raise SampleOptionError(f"--per-class {per_class} must be >= 1")
    return classes, int(per_class)


def sample_images(model, labels: torch.Tensor, sample_cfg, *, cfg_scale: float, seed: int, batch_size: int,
                  autocast_dtype=None, on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
    """Generate one image per label in batches from one seeded generator: (images in [0, 1] on the CPU, the
    most function evaluations a batch needed); ``on_batch(done)`` after each batch."""
    gen = torch.Generator(device=labels.device).manual_seed(seed)
    images, nfe, batch_size = [], 0, max(1, batch_size)
    for start in range(0, len(labels), batch_size):
        x, n = model.generate(labels[start : start + batch_size], sample_cfg, cfg_scale=cfg_scale, generator=gen,
                              autocast_dtype=autocast_dtype)
        images.append(x.float().cpu())
        nfe = max(nfe, int(n))
        if on_batch is not None:
            on_batch(min(len(labels), start + batch_size))
    return torch.cat(images), nfe


def reconstruction_grid(model, val_set, n: int = 10):
    """PIL grid: n validation images (one per class first) above the model's reconstructions."""
    from .data.loader import fetch

    labels = getattr(val_set, "labels", None)
    picks: list[int] = []
    if labels is not None:
        labels = torch.as_tensor(labels)
        for c in sorted(set(labels.tolist()))[:n]:
            picks.append(int((labels == c).nonzero()[0]))
    picks += [i for i in range(len(val_set)) if i not in picks][: max(0, n - len(picks))]
    x, _ = model.modality.unpack(fetch(val_set, torch.tensor(picks[:n])))
    with torch.no_grad():
        decoded = model.reconstruct(x, torch.Generator().manual_seed(0))
    recon, originals = model.modality.postprocess(decoded.float()), model.modality.postprocess(x)
    return image_grid(torch.cat([originals, recon]), nrow=len(picks[:n]), min_tile=MIN_TILE)
