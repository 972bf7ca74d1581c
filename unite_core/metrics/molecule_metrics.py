"""Molecule metrics: reconstruction (match rate, RMSD) and generation (validity, uniqueness,
novelty, atom/molecule stability).

A molecule is given as ``(types, coords, mask)`` in the token format of ``unite_core.atoms``:
types index ``ATOM_TYPES`` (H, C, N, O, F), coords in Angstrom, mask marks real atoms. Arrays may be
numpy arrays or torch tensors. All rates are returned in percent (0..100), as in the paper's tables.

Definitions
- valid: ``unite_core.chem.build_molecule`` (bonds and bond orders inferred from the coordinates)
  succeeds and ``unite_core.chem.is_valid`` holds (sanitisable, one fragment, no radical electrons).
- uniqueness: distinct canonical SMILES (no H, no stereo) among valid molecules / valid.
- novelty: distinct valid SMILES not in the training set / distinct valid SMILES.
- atom / molecule stability (as in EDM): bond orders from interatomic distances with the length
  table below; an atom is stable when the sum of its bond orders is an allowed valence.
  Aromatic rings (C-C about 1.39-1.40 A) sit on the single/double boundary and often count as
  unstable; this is a known property of the criterion, shared with EDM.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from rdkit import Chem

from unite_core.atoms import ATOM_TYPES, as_numpy, real_atoms
from unite_core.chem import build_molecule, canonical_smiles, is_valid

# Reconstruction: a match needs identical atoms (same mask, same type at every token) and a Kabsch
# RMSD below this many Angstrom.
MATCH_RMSD_THRESHOLD = 0.5

# Allowed valences (sum of bond orders) per atom type.
ALLOWED_VALENCES: dict[str, tuple[int, ...]] = {"H": (1,), "C": (4,), "N": (3,), "O": (2,), "F": (1,)}

# Typical covalent bond lengths in Angstrom (textbook values for small organic molecules).
SINGLE_BOND_LENGTHS: dict[frozenset, float] = {
    frozenset(p): d for p, d in [
        (("H", "H"), 0.74), (("H", "C"), 1.09), (("H", "N"), 1.01), (("H", "O"), 0.96),
        (("H", "F"), 0.92), (("C", "C"), 1.54), (("C", "N"), 1.47), (("C", "O"), 1.43),
        (("C", "F"), 1.35), (("N", "N"), 1.45), (("N", "O"), 1.40), (("N", "F"), 1.36),
        (("O", "O"), 1.48), (("O", "F"), 1.42), (("F", "F"), 1.42),
    ]
}
DOUBLE_BOND_LENGTHS: dict[frozenset, float] = {
    frozenset(p): d for p, d in [
        (("C", "C"), 1.34), (("C", "N"), 1.29), (("C", "O"), 1.20), (("N", "N"), 1.25),
        (("N", "O"), 1.21), (("O", "O"), 1.21),
    ]
}
TRIPLE_BOND_LENGTHS: dict[frozenset, float] = {
    frozenset(p): d for p, d in [
        (("C", "C"), 1.20), (("C", "N"), 1.16), (("C", "O"), 1.13), (("N", "N"), 1.10),
    ]
}
# A distance up to (typical length + margin) counts as that bond; the tighter orders are tried first.
BOND_MARGINS = {1: 0.10, 2: 0.05, 3: 0.03}


def unbatch(types: Any, coords: Any, mask: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(B, N), (B, N, 3), (B, N) arrays -> list of per-molecule (types, coords, mask)."""
    t, x, m = as_numpy(types, np.int64), as_numpy(coords, np.float64), as_numpy(mask, bool)
    return [(t[i], x[i], m[i]) for i in range(t.shape[0])]


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------
def kabsch_rmsd(p: Any, q: Any, mask: Any = None) -> float:
    """RMSD between point sets p and q (n, 3) after the optimal proper rotation and translation.

    Points correspond one-to-one (same order). ``mask`` (n,) selects the points to use. Computed in
    float64 with the Kabsch algorithm (SVD of the covariance, reflection removed).
    """
    a = as_numpy(p, np.float64).reshape(-1, 3)
    b = as_numpy(q, np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"point sets differ in shape: {a.shape} vs {b.shape}")
    if mask is not None:
        m = as_numpy(mask, bool).reshape(-1)
        a, b = a[m], b[m]
    if len(a) == 0:
        raise ValueError("kabsch_rmsd needs at least one point")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    diff = a @ rot.T - b
    return float(np.sqrt((diff * diff).sum(axis=1).mean()))


def reconstruction_metrics(true_types: Any, true_coords: Any, true_mask: Any,
                           pred_types: Any, pred_coords: Any, pred_mask: Any,
                           rmsd_threshold: float = MATCH_RMSD_THRESHOLD) -> dict[str, float]:
    """Match rate, RMSD and per-atom type accuracy of reconstructed molecules (batched inputs).

    Tokens are aligned one-to-one (token i of the reconstruction is atom i of the input), so no
    atom permutation is searched: a molecule *matches* when its mask is identical, every real
    atom's type is identical and the Kabsch RMSD of the coordinates is below ``rmsd_threshold``
    (default 0.5 A). ADiT (whose protocol the paper follows) matches with pymatgen's
    ``MoleculeMatcher``, which first maps atoms between the two molecules and then compares an RMSD
    against a tolerance; with known alignment the mapping step is unnecessary, pymatgen is not a
    dependency here, and the threshold is a parameter so the criterion can be tightened.

    Returns (percent where noted):
      match_rate      % of molecules that match
      rmsd_mean       mean Kabsch RMSD (A) over matched molecules (nan when none match)
      rmsd_mean_all   mean Kabsch RMSD over molecules with identical atoms, matched or not (nan if none)
      type_accuracy   % of real input atoms whose token is real in the output with the same type
      num_molecules, num_same_atoms
    """
    tt, tx, tm = as_numpy(true_types, np.int64), as_numpy(true_coords, np.float64), as_numpy(true_mask, bool)
    pt, px, pm = as_numpy(pred_types, np.int64), as_numpy(pred_coords, np.float64), as_numpy(pred_mask, bool)
    if tt.shape != pt.shape or tx.shape != px.shape or tm.shape != pm.shape:
        raise ValueError(
            f"true and predicted batches differ in shape: types {tt.shape} vs {pt.shape}, "
            f"coords {tx.shape} vs {px.shape}, mask {tm.shape} vs {pm.shape}"
        )
    if tt.ndim == 1:
        tt, tx, tm, pt, px, pm = tt[None], tx[None], tm[None], pt[None], px[None], pm[None]
    b = tt.shape[0]
    matched_rmsd, same_rmsd = [], []
    correct_atoms = int((tm & pm & (tt == pt)).sum())
    total_atoms = int(tm.sum())
    for i in range(b):
        if not np.array_equal(tm[i], pm[i]) or not tm[i].any():
            continue
        if not np.array_equal(tt[i][tm[i]], pt[i][tm[i]]):
            continue
        r = kabsch_rmsd(tx[i], px[i], tm[i])
        same_rmsd.append(r)
        if r < rmsd_threshold:
            matched_rmsd.append(r)
    return {
        "match_rate": 100.0 * len(matched_rmsd) / b if b else 0.0,
        "rmsd_mean": float(np.mean(matched_rmsd)) if matched_rmsd else math.nan,
        "rmsd_mean_all": float(np.mean(same_rmsd)) if same_rmsd else math.nan,
        "type_accuracy": 100.0 * correct_atoms / total_atoms if total_atoms else 0.0,
        "num_molecules": b,
        "num_same_atoms": len(same_rmsd),
    }


# ---------------------------------------------------------------------------------------------
# Validity, uniqueness, novelty
# ---------------------------------------------------------------------------------------------
def validity(mols: Sequence[Optional[Chem.Mol]]) -> float:
    """Percent of ``mols`` (from ``build_molecule``; None counts as invalid) that are valid."""
    if len(mols) == 0:
        return 0.0
    return 100.0 * sum(is_valid(m) for m in mols) / len(mols)


# ---------------------------------------------------------------------------------------------
# Stability
# ---------------------------------------------------------------------------------------------
def bond_order(a: str, b: str, distance: float) -> int:
    """Bond order (0..3) between elements a and b at ``distance`` A from the length table."""
    key = frozenset((a, b))
    for order, table in ((3, TRIPLE_BOND_LENGTHS), (2, DOUBLE_BOND_LENGTHS), (1, SINGLE_BOND_LENGTHS)):
        length = table.get(key)
        if length is not None and distance < length + BOND_MARGINS[order]:
            return order
    return 0


def atom_stability(types: Any, coords: Any, mask: Any = None) -> tuple[int, int, bool]:
    """(stable atoms, atoms, molecule stable) by the distance-based valence criterion."""
    t, x = real_atoms(types, coords, mask)
    n = len(t)
    if n == 0:
        return 0, 0, False
    sym = [ATOM_TYPES[int(i)] if 0 <= int(i) < len(ATOM_TYPES) else "?" for i in t]
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    valence = np.zeros(n, dtype=np.int64)
    for i in range(n):
        for j in range(i + 1, n):
            if "?" in (sym[i], sym[j]):
                continue
            order = bond_order(sym[i], sym[j], float(dist[i, j]))
            valence[i] += order
            valence[j] += order
    stable = sum(
        1 for i in range(n) if sym[i] != "?" and int(valence[i]) in ALLOWED_VALENCES[sym[i]]
    )
    return stable, n, stable == n


# ---------------------------------------------------------------------------------------------
# Everything for a batch of generated molecules
# ---------------------------------------------------------------------------------------------
def generation_metrics(samples: Iterable[tuple[Any, Any, Any]],
                       train_smiles: Iterable[str]) -> dict[str, float]:
    """Validity, uniqueness, novelty and stability of generated molecules.

    ``samples``: per-molecule (types, coords, mask) (``unbatch`` turns batched tensors into this).
    ``train_smiles``: canonical SMILES of the training set (``MoleculeData.train_smiles``).
    Returns percentages validity, uniqueness, novelty, atom_stability, molecule_stability and the
    counts num_samples, num_valid, num_unique. With no valid molecule, uniqueness and novelty are 0.
    """
    train_set = set(train_smiles)
    n = 0
    valid_smiles: list[str] = []
    stable_atoms = total_atoms = stable_mols = 0
    for types, coords, mask in samples:
        n += 1
        s_atoms, n_atoms, mol_stable = atom_stability(types, coords, mask)
        stable_atoms += s_atoms
        total_atoms += n_atoms
        stable_mols += int(mol_stable)
        mol = build_molecule(types, coords, mask)
        if is_valid(mol):
            valid_smiles.append(canonical_smiles(mol))
    unique = set(valid_smiles)
    novel = unique - train_set
    num_valid = len(valid_smiles)
    return {
        "validity": 100.0 * num_valid / n if n else 0.0,
        "uniqueness": 100.0 * len(unique) / num_valid if num_valid else 0.0,
        "novelty": 100.0 * len(novel) / len(unique) if unique else 0.0,
        "atom_stability": 100.0 * stable_atoms / total_atoms if total_atoms else 0.0,
        "molecule_stability": 100.0 * stable_mols / n if n else 0.0,
        "num_samples": n,
        "num_valid": num_valid,
        "num_unique": len(unique),
    }


__all__ = [
    "MATCH_RMSD_THRESHOLD", "ALLOWED_VALENCES", "SINGLE_BOND_LENGTHS", "DOUBLE_BOND_LENGTHS",
    "TRIPLE_BOND_LENGTHS", "BOND_MARGINS", "kabsch_rmsd", "reconstruction_metrics",
    "validity", "bond_order", "atom_stability",
    "generation_metrics", "unbatch",
]
