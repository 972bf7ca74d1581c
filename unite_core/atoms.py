"""The molecule token format: the atom vocabulary, padding, centring and random rotation.

A molecule is a padded set of atom tokens (``unite_core.data.molecule_sets`` stores them so):

    types  int64   (max_atoms,)     0..4 indexing ATOM_TYPES, PAD_TYPE (-1) for padding
    coords float32 (max_atoms, 3)   Angstrom, zero for padding, centred at the centre of mass
    mask   bool    (max_atoms,)     True for real atoms

numpy and torch only (no RDKit), so that the model side (``unite_core.modalities.molecules``) uses
the format without importing RDKit; the RDKit helpers are in ``unite_core.chem``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

ATOM_TYPES: list[str] = ["H", "C", "N", "O", "F"]
ATOMIC_NUMBERS: list[int] = [1, 6, 7, 8, 9]
# Standard atomic weights (u) used for the centre of mass; isotopes are ignored on purpose so that
# a molecule's centring depends only on its atom types and coordinates.
ATOM_MASSES: list[float] = [1.008, 12.011, 14.007, 15.999, 18.998]
PAD_TYPE = -1


def as_numpy(x: Any, dtype=None) -> np.ndarray:
    """A numpy array of ``x`` (numpy array, torch tensor or sequence), optionally cast."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype) if dtype is not None else arr


def real_atoms(types: Any, coords: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The real atoms of one molecule: (types (n,) int64, coords (n, 3) float64)."""
    t = as_numpy(types, np.int64).reshape(-1)
    x = as_numpy(coords, np.float64).reshape(-1, 3)
    m = np.ones(len(t), dtype=bool) if mask is None else as_numpy(mask, bool).reshape(-1)
    return t[m], x[m]


def center_at_com(types: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Shift coordinates (n, 3) of real atoms so that their mass-weighted centre is the origin."""
    masses = np.asarray(ATOM_MASSES, dtype=np.float64)[np.asarray(types, dtype=np.int64)]
    coords = np.asarray(coords, dtype=np.float64)
    com = (masses[:, None] * coords).sum(axis=0) / masses.sum()
    return coords - com


def random_rotation(coords: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Rotate each molecule by its own uniformly random proper rotation (Haar measure on SO(3)).

    ``coords`` is (B, N, 3) or (N, 3); rotation is about the origin (molecules are centred at
    their centre of mass, which therefore stays at zero). Padding (``mask`` False) stays zero.
    Random unit quaternions (normalised 4-D Gaussians) are uniform on SO(3).
    """
    squeeze = coords.ndim == 2
    x = coords.unsqueeze(0) if squeeze else coords
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"coords must have shape (B, N, 3) or (N, 3), got {tuple(coords.shape)}")
    b = x.shape[0]
    gen_device = generator.device if generator is not None else x.device
    q = torch.randn(b, 4, generator=generator, device=gen_device, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w, i, j, k = q.unbind(dim=1)
    rot = torch.stack([
        1 - 2 * (j * j + k * k), 2 * (i * j - k * w), 2 * (i * k + j * w),
        2 * (i * j + k * w), 1 - 2 * (i * i + k * k), 2 * (j * k - i * w),
        2 * (i * k - j * w), 2 * (j * k + i * w), 1 - 2 * (i * i + j * j),
    ], dim=1).reshape(b, 3, 3).to(device=x.device, dtype=x.dtype)
    out = x @ rot.transpose(1, 2)
    if mask is not None:
        m = mask.unsqueeze(0) if squeeze else mask
        out = out * m.unsqueeze(-1).to(out.dtype)
    return out.squeeze(0) if squeeze else out


__all__ = ["ATOM_TYPES", "ATOMIC_NUMBERS", "ATOM_MASSES", "PAD_TYPE", "as_numpy", "center_at_com", "real_atoms", "random_rotation"]
