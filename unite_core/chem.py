"""Every RDKit helper of the project, in one place: molecules from SMILES or from atom tokens,
canonical SMILES, the dataset filter, conformer embedding, bond inference, validity, 2-D depictions.

The molecule data (``unite_core.data.molecule_sets``, ``unite_core.data.moses``), the molecule
metrics (``unite_core.metrics.molecule_metrics``) and the sample files
(``unite_core.eval_molecules``) import these; the atom vocabulary they share is
``unite_core.atoms`` (no RDKit).

Validity: bonds and bond orders inferred from the coordinates with RDKit's ``rdDetermineBonds``
(``DetermineConnectivity``, then ``DetermineBondOrders`` for a neutral molecule with no formal
charges allowed), then ``SanitizeMol`` succeeds, the molecule is one fragment and no atom is left
with radical electrons (an atom whose valence cannot be filled is a failed structure, not a radical
species). Atoms with more neighbours than their maximum valence make the structure invalid before
bond orders are searched (this also keeps the search from blowing up).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem, rdDetermineBonds
from rdkit.rdBase import BlockLogs

from .atoms import ATOM_TYPES, ATOMIC_NUMBERS, as_numpy, center_at_com, real_atoms
from .config import DataConfig

logger = logging.getLogger(__name__)

Z_TO_TYPE = {z: i for i, z in enumerate(ATOMIC_NUMBERS)}
HEAVY_ALLOWED = {6, 7, 8, 9}
# The most neighbours an atom may have before bond orders are even searched for (neutral molecules).
MAX_NEIGHBOURS: dict[str, int] = {"H": 1, "C": 4, "N": 3, "O": 2, "F": 1}


def canonical_smiles(mol: Chem.Mol) -> str:
    """Canonical SMILES without hydrogens and without stereo (constitution only)."""
    m = Chem.RemoveHs(mol, sanitize=False)
    return Chem.MolToSmiles(m, isomericSmiles=False)


def to_rdkit(types: Any, coords: Any, mask: Any = None) -> Chem.Mol:
    """An RDKit molecule with the masked atoms and one 3-D conformer, no bonds (not sanitised)."""
    t = as_numpy(types, np.int64).reshape(-1)
    x = as_numpy(coords, np.float64).reshape(-1, 3)
    m = np.ones(len(t), dtype=bool) if mask is None else as_numpy(mask, bool).reshape(-1)
    if not (len(t) == len(x) == len(m)):
        raise ValueError(f"types ({len(t)}), coords ({len(x)}) and mask ({len(m)}) differ in length")
    t, x = t[m], x[m]
    if len(t) and (t.min() < 0 or t.max() >= len(ATOM_TYPES)):
        raise ValueError(f"atom type indices must lie in 0..{len(ATOM_TYPES) - 1}, got {sorted(set(t.tolist()))}")
    rw = Chem.RWMol()
    for ti in t:
        atom = Chem.Atom(ATOMIC_NUMBERS[int(ti)])
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    conf = Chem.Conformer(len(t))
    conf.Set3D(True)
    for i, pos in enumerate(x):
        conf.SetAtomPosition(i, [float(v) for v in pos])
    mol = rw.GetMol()
    mol.AddConformer(conf, assignId=True)
    mol.UpdatePropertyCache(strict=False)
    return mol


def filter_reason(mol: Chem.Mol, cfg: DataConfig) -> Optional[str]:
    if len(Chem.GetMolFrags(mol)) != 1:
        return "fragments"
    heavy = 0
    for atom in mol.GetAtoms():
        z = atom.GetAtomicNum()
        if z != 1 and z not in HEAVY_ALLOWED:
            return "elements"
        if atom.GetFormalCharge() != 0 or atom.GetNumRadicalElectrons() != 0:
            return "charged"
        heavy += z != 1
    if heavy == 0:
        return "no_heavy_atoms"
    if heavy > cfg.max_heavy_atoms:
        return "too_many_heavy_atoms"
    n_total = mol.GetNumAtoms() + sum(a.GetTotalNumHs() for a in mol.GetAtoms())
    if n_total > cfg.max_atoms:
        return "too_many_atoms"
    return None


def embed_molecule(smiles: str, seed: int) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
    """One relaxed 3-D conformer with explicit hydrogens: (types, coords (n, 3), relaxation).

    ETKDGv3 seeded with ``seed`` (single-threaded, hence deterministic), retried once from random
    coordinates; then MMFF94 relaxation, UFF where MMFF lacks parameters, none where both do.
    Returns None when no conformer can be embedded.
    """
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    params.numThreads = 1
    conf_id = AllChem.EmbedMolecule(mol, params)
    if conf_id < 0:
        params.useRandomCoords = True
        conf_id = AllChem.EmbedMolecule(mol, params)
    if conf_id < 0:
        return None
    relaxation = "none"
    try:
        if AllChem.MMFFHasAllMoleculeParams(mol):
            AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
            relaxation = "mmff"
        elif AllChem.UFFHasAllMoleculeParams(mol):
            AllChem.UFFOptimizeMolecule(mol, maxIters=2000)
            relaxation = "uff"
    except (RuntimeError, ValueError) as exc:  # keep the ETKDG geometry, but say so
        logger.warning("force-field relaxation failed for %s: %s", smiles, exc)
        relaxation = "none"
    types = np.array([Z_TO_TYPE[a.GetAtomicNum()] for a in mol.GetAtoms()], dtype=np.int64)
    coords = mol.GetConformer(conf_id).GetPositions()
    return types, center_at_com(types, coords), relaxation


def build_molecule(types: Any, coords: Any, mask: Any = None) -> Optional[Chem.Mol]:
    """RDKit molecule (explicit H) with bonds and bond orders inferred from the coordinates.

    ``DetermineConnectivity`` (connect-the-dots on covalent radii), a neighbour-count check, then
    ``DetermineBondOrders(charge=0, allowChargedFragments=False)`` and ``SanitizeMol``. Returns
    None when any step fails (no atoms, atoms without neighbours that need some, over-connected
    atoms, no bond-order assignment, sanitisation error).
    """
    t, x = real_atoms(types, coords, mask)
    if len(t) == 0 or not np.isfinite(x).all():
        return None
    try:
        mol = to_rdkit(t, x)
    except ValueError:
        return None
    with BlockLogs():
        try:
            rdDetermineBonds.DetermineConnectivity(mol)
            for atom in mol.GetAtoms():
                if atom.GetDegree() > MAX_NEIGHBOURS[atom.GetSymbol()]:
                    return None
            rdDetermineBonds.DetermineBondOrders(mol, charge=0, allowChargedFragments=False,
                                                 embedChiral=False)
            Chem.SanitizeMol(mol)
        except Exception:
            return None
    return mol


def is_valid(mol: Optional[Chem.Mol]) -> bool:
    """Sanitisable, a single fragment, and no radical electrons (see the module docstring)."""
    if mol is None or mol.GetNumAtoms() == 0:
        return False
    with BlockLogs():
        try:
            m = Chem.Mol(mol)
            Chem.SanitizeMol(m)
        except Exception:
            return False
    if len(Chem.GetMolFrags(m)) != 1:
        return False
    return all(a.GetNumRadicalElectrons() == 0 for a in m.GetAtoms())


def depiction(mol_3d, valid: bool):
    """A 2-D depiction of a generated molecule (hydrogens hidden where possible)."""
    with BlockLogs():
        m = Chem.Mol(mol_3d)
        if not valid and m.GetNumBonds() == 0 and m.GetNumAtoms() > 1:
            try:  # show connectivity (single bonds) even when bond orders failed
                rdDetermineBonds.DetermineConnectivity(m)
            except Exception:  # noqa: BLE001 - an atoms-only picture is still a picture
                pass
        try:
            m = Chem.RemoveHs(m, sanitize=valid)
        except Exception:  # noqa: BLE001
            pass
        m.RemoveAllConformers()
        try:
            m.UpdatePropertyCache(strict=False)
            AllChem.Compute2DCoords(m)
        except Exception:  # noqa: BLE001
            pass
    return m


__all__ = [
    "HEAVY_ALLOWED", "MAX_NEIGHBOURS", "Z_TO_TYPE", "build_molecule", "canonical_smiles", "depiction",
    "embed_molecule", "filter_reason", "is_valid", "to_rdkit",
]
