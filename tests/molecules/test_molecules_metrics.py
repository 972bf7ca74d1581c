"""Molecule metrics: Kabsch RMSD, reconstruction match rate, validity, stability, uniqueness, novelty."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from unite_core.atoms import ATOM_TYPES, PAD_TYPE
from unite_core.chem import build_molecule, embed_molecule, is_valid
from unite_core.metrics.molecule_metrics import (
    MATCH_RMSD_THRESHOLD,
    atom_stability,
    bond_order,
    generation_metrics,
    kabsch_rmsd,
    reconstruction_metrics,
    unbatch,
    validity,
)

MAX_ATOMS = 29


def mol3d(smiles: str, seed: int = 0):
    """(types, coords, mask) of an RDKit-embedded, MMFF-relaxed molecule, unpadded."""
    types, coords, _ = embed_molecule(smiles, seed)
    return types, coords, np.ones(len(types), dtype=bool)


def padded(molecules):
    """Stack molecules into (B, MAX_ATOMS) batches."""
    b = len(molecules)
    types = np.full((b, MAX_ATOMS), PAD_TYPE, dtype=np.int64)
    coords = np.zeros((b, MAX_ATOMS, 3))
    mask = np.zeros((b, MAX_ATOMS), dtype=bool)
    for i, (t, x, _) in enumerate(molecules):
        types[i, : len(t)], coords[i, : len(t)], mask[i, : len(t)] = t, x, True
    return types, coords, mask


def rotated(coords, seed=0, shift=(3.0, -2.0, 7.5)):
    r = Rotation.random(random_state=seed).as_matrix()
    return coords @ r.T + np.asarray(shift)


# ---------------------------------------------------------------------------------------------
# Kabsch RMSD and reconstruction
# ---------------------------------------------------------------------------------------------
def test_kabsch_rmsd_rotation_translation_and_perturbation():
    _, x, _ = mol3d("CC(O)C(=O)N")
    assert kabsch_rmsd(x, rotated(x)) < 1e-4
    assert kabsch_rmsd(torch.tensor(x), torch.tensor(rotated(x, seed=3))) < 1e-4
    rng = np.random.default_rng(0)
    noisy = x + rng.normal(scale=0.1, size=x.shape)
    r = kabsch_rmsd(x, noisy)
    assert 0.05 < r < 0.2  # close to the 0.17 A noise RMS, a bit less after fitting
    # moving one atom of n by d gives an RMSD of at most d / sqrt(n)
    moved = x.copy()
    moved[0] += [0.5, 0.0, 0.0]
    assert 0 < kabsch_rmsd(x, moved) <= 0.5 / math.sqrt(len(x)) + 1e-9


def test_kabsch_rmsd_proper_rotations_only_and_mask():
    # a chiral, non-planar molecule is not superimposable on its mirror image
    _, x, _ = mol3d("C[C@H](N)C(F)O")
    mirror = x * np.array([-1.0, 1.0, 1.0])
    assert kabsch_rmsd(x, mirror) > 0.1
    # padding rows are ignored through the mask
    p = np.vstack([x, np.zeros((3, 3))])
    q = np.vstack([rotated(x), np.full((3, 3), 50.0)])
    mask = np.r_[np.ones(len(x), bool), np.zeros(3, bool)]
    assert kabsch_rmsd(p, q, mask) < 1e-4
    assert kabsch_rmsd(p, q) > 1.0


def test_reconstruction_metrics_numbers():
    ethanol, acid, benzene, amide = (mol3d(s) for s in ("CCO", "CC(=O)O", "c1ccccc1", "CC(N)=O"))
    true = padded([ethanol, acid, benzene, amide])
    t, x, m = (a.copy() for a in true)
    # 0: perfect up to a rigid motion; 1: small noise; 2: one atom type wrong; 3: far-off coordinates
    x[0, : len(ethanol[0])] = rotated(ethanol[1])
    rng = np.random.default_rng(1)
    n1 = len(acid[0])
    x[1, :n1] += rng.normal(scale=0.02, size=(n1, 3))
    t[2, 0] = ATOM_TYPES.index("N")
    n3 = len(amide[0])
    x[3, :n3] += rng.normal(scale=1.0, size=(n3, 3))
    out = reconstruction_metrics(*true, t, torch.tensor(x), m)
    assert out["num_molecules"] == 4 and out["num_same_atoms"] == 3
    assert out["match_rate"] == pytest.approx(50.0)
    assert 0.0 <= out["rmsd_mean"] < 0.03
    assert out["rmsd_mean_all"] > MATCH_RMSD_THRESHOLD / 3
    n_atoms = int(true[2].sum())
    assert out["type_accuracy"] == pytest.approx(100.0 * (n_atoms - 1) / n_atoms)
    # an extra (hallucinated) atom or a missing one is not a match
    m2 = m.copy()
    m2[0, len(ethanol[0]) - 1] = False
    t2 = t.copy()
    t2[0, len(ethanol[0]) - 1] = PAD_TYPE
    out2 = reconstruction_metrics(*true, t2, x, m2)
    assert out2["match_rate"] == pytest.approx(25.0)
    # identical input and output: everything matches with zero RMSD
    same = reconstruction_metrics(*true, *true)
    assert same["match_rate"] == 100.0 and same["rmsd_mean"] < 1e-6 and same["type_accuracy"] == 100.0
    # nothing matches: rmsd_mean is nan, not a misleading number
    assert math.isnan(reconstruction_metrics(*true, t, x + 5 * rng.normal(size=x.shape), m)["rmsd_mean"])


# ---------------------------------------------------------------------------------------------
# Validity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1", "CC(=O)O", "CC#N", "C", "O", "FC(F)F", "NC=O"])
def test_known_molecules_are_valid(smiles):
    mol = build_molecule(*mol3d(smiles))
    assert mol is not None and is_valid(mol)
    from unite_core.chem import canonical_smiles
    from rdkit import Chem

    assert canonical_smiles(mol) == Chem.MolToSmiles(Chem.MolFromSmiles(smiles), isomericSmiles=False)


def _ch6():
    """Carbon with six hydrogens at C-H bond distance (octahedral)."""
    d = 1.09
    dirs = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    coords = np.vstack([np.zeros((1, 3)), d * dirs])
    types = np.array([1] + [0] * 6)
    return types, coords, np.ones(7, dtype=bool)


def test_broken_structures_are_invalid():
    t, x, m = mol3d("CCO")
    collapsed = (t, np.zeros_like(x), m)
    far = mol3d("CC")
    two = (np.r_[t, far[0]], np.vstack([x, far[1] + [12.0, 0.0, 0.0]]), np.ones(len(t) + len(far[0]), bool))
    no_h = (t[t > 0], x[t > 0], m[t > 0])  # C-C-O skeleton without its hydrogens: radicals
    for broken in (collapsed, two, _ch6(), no_h):
        assert not is_valid(build_molecule(*broken))
    # the padded form is understood too (padding ignored)
    types, coords, mask = padded([mol3d("CCO"), collapsed])
    mols = [build_molecule(types[i], coords[i], mask[i]) for i in range(2)]
    assert validity(mols) == pytest.approx(50.0)
    assert validity([]) == 0.0
    assert build_molecule(np.array([PAD_TYPE]), np.zeros((1, 3)), np.zeros(1, bool)) is None


# ---------------------------------------------------------------------------------------------
# Stability
# ---------------------------------------------------------------------------------------------
def test_bond_order_table():
    assert bond_order("C", "C", 1.54) == 1
    assert bond_order("C", "C", 1.34) == 2
    assert bond_order("C", "C", 1.20) == 3
    assert bond_order("C", "C", 2.50) == 0
    assert bond_order("C", "O", 1.21) == 2 and bond_order("O", "C", 1.43) == 1
    assert bond_order("C", "H", 1.09) == 1 and bond_order("H", "H", 1.78) == 0
    assert bond_order("C", "N", 1.16) == 3
    assert bond_order("F", "F", 1.60) == 0 and bond_order("O", "F", 1.42) == 1


@pytest.mark.parametrize("smiles", ["CCO", "C", "O", "CC#N", "CC(=O)O", "C=CC=O", "NC(=O)N", "CF"])
def test_relaxed_known_molecules_are_stable(smiles):
    stable, n, ok = atom_stability(*mol3d(smiles))
    assert stable == n and ok and n > 0


def test_broken_molecules_are_unstable():
    stable, n, ok = atom_stability(*_ch6())
    assert n == 7 and not ok and stable == 6  # the six H are fine, the carbon has valence 6
    t, x, m = mol3d("CCO")
    stretched = x * 1.4
    s2, n2, ok2 = atom_stability(t, stretched, m)
    assert not ok2 and s2 < n2
    assert atom_stability(np.array([PAD_TYPE]), np.zeros((1, 3)), np.zeros(1, bool)) == (0, 0, False)


# ---------------------------------------------------------------------------------------------
# All together on a tiny hand-made list
# ---------------------------------------------------------------------------------------------
def test_generation_metrics_on_a_tiny_list():
    ethanol = mol3d("CCO")
    ethanol_moved = (ethanol[0], rotated(ethanol[1], seed=5), ethanol[2])
    samples = [ethanol, ethanol_moved, mol3d("CC#N"), mol3d("C"), _ch6()]
    out = generation_metrics(samples, train_smiles=["CCO", "O"])
    assert out["num_samples"] == 5 and out["num_valid"] == 4 and out["num_unique"] == 3
    assert out["validity"] == pytest.approx(80.0)
    assert out["uniqueness"] == pytest.approx(75.0)  # CCO twice, CC#N, C
    assert out["novelty"] == pytest.approx(100.0 * 2 / 3)  # CC#N and C are not in the training set
    n_atoms = 9 + 9 + 6 + 5 + 7
    assert out["atom_stability"] == pytest.approx(100.0 * (n_atoms - 1) / n_atoms)
    assert out["molecule_stability"] == pytest.approx(80.0)
    # batched tensors go through unbatch
    types, coords, mask = padded(samples)
    again = generation_metrics(unbatch(torch.tensor(types), torch.tensor(coords), torch.tensor(mask)),
                               ["CCO", "O"])
    assert again == out
    empty = generation_metrics([], [])
    assert empty["validity"] == 0.0 and empty["num_samples"] == 0
