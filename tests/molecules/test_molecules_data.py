"""Molecule data: embedded dataset, QM9 reader, cache round trip, augmentation, conversion."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem

from unite_core.config import DataConfig
from unite_core.data.errors import DataError
from unite_core.atoms import ATOM_MASSES, ATOM_TYPES, PAD_TYPE, random_rotation
from unite_core.chem import embed_molecule, to_rdkit
from unite_core.data.molecule_sets import (
    MoleculeData,
    load_molecule_data,
    load_prepared_molecules,
    prepare_molecule_data,
)
from unite_core.metrics.molecule_metrics import kabsch_rmsd

MASSES = torch.tensor(ATOM_MASSES, dtype=torch.float64)


def _com(types: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Centre of mass per molecule, (B, 3)."""
    w = torch.where(mask, MASSES[types.clamp_min(0)], torch.zeros((), dtype=torch.float64))
    return (w[..., None] * coords.double()).sum(1) / w.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Embedded dataset
# ---------------------------------------------------------------------------------------------
def test_embedded_dataset_content(embedded):
    cfg, _, manifest, data = embedded
    info = data.info
    assert isinstance(data, MoleculeData)
    assert info["modality"] == "molecules" and info["num_classes"] == 0
    assert info["atom_types"] == ATOM_TYPES == ["H", "C", "N", "O", "F"]
    total = len(data.train) + len(data.val)
    assert total > 100
    assert info["num_train"] == len(data.train) and info["num_val"] == len(data.val)
    # failures are counted and listed, never hidden
    assert info["num_failed_embedding"] == len(info["failed_smiles"]) or len(info["failed_smiles"]) == 50
    assert info["num_candidates"] == total + info["num_failed_embedding"]
    # validation share follows val_fraction
    assert abs(len(data.val) / total - cfg.val_fraction) < 0.01
    for ds in (data.train, data.val):
        assert ds.types.shape == (len(ds), cfg.max_atoms) and ds.types.dtype == torch.int64
        assert ds.coords.shape == (len(ds), cfg.max_atoms, 3) and ds.coords.dtype == torch.float32
        real = ds.types[ds.mask]
        assert real.min() >= 0 and real.max() < len(ATOM_TYPES)
        assert (ds.types[~ds.mask] == PAD_TYPE).all()
        assert (ds.coords[~ds.mask] == 0).all()
        # masks are left-aligned: atoms first, then padding
        n = ds.mask.sum(1)
        assert torch.equal(ds.mask, torch.arange(cfg.max_atoms)[None] < n[:, None])
        assert n.max() <= cfg.max_atoms and n.min() >= 1
        heavy = (ds.mask & (ds.types > 0)).sum(1)
        assert heavy.max() <= cfg.max_heavy_atoms and heavy.min() >= 1
        # centred at the mass-weighted centre
        assert _com(ds.types, ds.coords, ds.mask).abs().max() < 1e-4
    hist = info["size_histogram"]
    assert sum(hist.values()) == len(data.train)
    assert hist == dict(Counter(int(v) for v in data.train.mask.sum(1)))
    assert len(data.train_smiles) == len(data.train)
    # several element kinds are present
    present = set(torch.unique(data.train.types[data.train.mask]).tolist())
    assert {0, 1, 2, 3} <= present


def test_ethanol_survives_prepare_and_load(embedded):
    _, _, _, data = embedded
    for ds in (data.train, data.val):
        if "CCO" in ds.smiles:
            i = ds.smiles.index("CCO")
            break
    else:  # pragma: no cover
        pytest.fail("ethanol (CCO) missing from the embedded dataset")
    item = ds[i]
    types = item["types"][item["mask"]].tolist()
    assert Counter(ATOM_TYPES[t] for t in types) == {"H": 6, "C": 2, "O": 1}
    coords = item["coords"][item["mask"]].double()
    # C-O bond of a relaxed conformer: about 1.42 A
    c_idx = [k for k, t in enumerate(types) if t == 1]
    o_idx = types.index(3)
    d_co = min(float((coords[c] - coords[o_idx]).norm()) for c in c_idx)
    assert 1.38 < d_co < 1.46
    assert item["y"].item() == 0 and item["y"].dtype == torch.int64


def test_manifest_and_cache_round_trip(embedded):
    cfg, out, manifest, data = embedded
    assert {"train.pt", "val.pt", "manifest.json"} <= {p.name for p in out.iterdir()}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["content_hash"] == data.info["content_hash"]
    assert manifest["config"]["dataset"] == "molecules_embedded"
    obj = torch.load(out / "train.pt", weights_only=True)
    assert torch.equal(obj["types"], data.train.types)
    # a DataLoader batches items into (B, max_atoms, ...)
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=8)))
    assert batch["types"].shape == (8, cfg.max_atoms) and batch["coords"].shape == (8, cfg.max_atoms, 3)
    assert batch["mask"].dtype == torch.bool and (batch["y"] == 0).all()


def test_prepared_cache_errors(embedded, tmp_path):
    cfg, out, _, _ = embedded
    with pytest.raises(DataError, match="manifest.json is missing"):
        load_prepared_molecules(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / "train.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="train.pt"):
        load_prepared_molecules(broken)
    bad_json = tmp_path / "bad_json"
    shutil.copytree(out, bad_json)
    (bad_json / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_prepared_molecules(bad_json)
    with pytest.raises(DataError, match="data.conformer_seed"):
        load_prepared_molecules(out, DataConfig(dataset="molecules_embedded", conformer_seed=7))


def test_embedding_and_split_are_deterministic():
    cfg = DataConfig(dataset="molecules_embedded", max_items=30)
    a = load_molecule_data(cfg)
    b = load_molecule_data(cfg)
    assert len(a.train) + len(a.val) == 30
    assert a.info["content_hash"] == b.info["content_hash"]
    assert torch.equal(a.train.coords, b.train.coords)
    assert a.val.smiles == b.val.smiles
    c = load_molecule_data(DataConfig(dataset="molecules_embedded", max_items=30, split_seed=0,
                                      val_fraction=0.5))
    assert len(c.val) == 15
    # a flexible molecule: another conformer seed gives another conformer, same seed the same one
    t1, x1, _ = embed_molecule("CCCCO", 0)
    t2, x2, _ = embed_molecule("CCCCO", 0)
    t3, x3, _ = embed_molecule("CCCCO", 5)
    assert np.array_equal(t1, t2) and np.array_equal(x1, x2)
    assert np.array_equal(t1, t3) and not np.allclose(x1, x3)


# ---------------------------------------------------------------------------------------------
# QM9 reader
# ---------------------------------------------------------------------------------------------
METHANE = """gdb_1
     RDKit          3D

  5  4  0  0  0  0  0  0  0  0999 V2000
   -0.0127    1.0858    0.0080 C   0  0  0  0  0  0  0  0  0  0  0  0
    0.0022   -0.0060    0.0020 H   0  0  0  0  0  0  0  0  0  0  0  0
    1.0117    1.4638    0.0003 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.5408    1.4475   -0.8766 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.5238    1.4379    0.9064 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
  1  4  1  0
  1  5  1  0
M  END
$$$$
"""
WATER = """gdb_3
     RDKit          3D

  3  2  0  0  0  0  0  0  0  0999 V2000
   -0.0344    0.9775    0.0076 O   0  0  0  0  0  0  0  0  0  0  0  0
    0.0647    0.0206    0.0015 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.8717    1.3006    0.0007 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
M  END
$$$$
"""
GARBAGE = """broken_record
     nonsense

  x  y  not a counts line
M  END
$$$$
"""
CHLOROMETHANE = """not_in_scope
     RDKit          3D

  2  1  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    1.7800    0.0000    0.0000 Cl  0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
M  END
$$$$
"""


def _write_sdf(path: Path, with_garbage: bool = True) -> None:
    text = METHANE + WATER + (GARBAGE if with_garbage else "") + CHLOROMETHANE
    for smiles in ("CCO", "CC#N", "CC(=O)O", "c1ccccc1"):
        t, x, _ = embed_molecule(smiles, 0)
        mol = to_rdkit(t, x)
        # bonds are not needed by the reader, but a QM9-like file has them
        ref = Chem.AddHs(Chem.MolFromSmiles(smiles))
        rw = Chem.RWMol(mol)
        for bond in ref.GetBonds():
            rw.AddBond(bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), bond.GetBondType())
        rw.SetProp("_Name", smiles)
        text += Chem.MolToMolBlock(rw, kekulize=False) + "$$$$\n"
    path.write_text(text)


def test_qm9_reader_on_small_sdf(tmp_path):
    sdf = tmp_path / "gdb9.sdf"
    _write_sdf(sdf)
    cfg = DataConfig(dataset="qm9", root=str(sdf), val_fraction=0.2, split_seed=3)
    data = load_molecule_data(cfg)
    info = data.info
    assert info["num_read"] == 8
    assert info["num_unreadable"] == 1 and info["unreadable_records"] == [2]
    assert info["num_filtered"] == {"elements": 1}
    assert len(data.train) + len(data.val) == 6
    assert len(data.val) == 1
    all_smiles = sorted(data.train.smiles + data.val.smiles)
    assert all_smiles == sorted(["C", "O", "CCO", "CC#N", "CC(=O)O", "c1ccccc1"])
    for ds in (data.train, data.val):
        assert _com(ds.types, ds.coords, ds.mask).abs().max() < 1e-4
    # methane keeps its geometry (C-H 1.09 A) and its atom order (C first)
    ds = data.train if "C" in data.train.smiles else data.val
    i = ds.smiles.index("C")
    assert ds.types[i][ds.mask[i]].tolist() == [1, 0, 0, 0, 0]
    x = ds.coords[i][ds.mask[i]].double()
    assert abs(float((x[1] - x[0]).norm()) - 1.0917) < 1e-3
    # a folder holding gdb9.sdf works too; prepare -> load keeps everything
    out = tmp_path / "prepared"
    manifest = prepare_molecule_data(DataConfig(dataset="qm9", root=str(tmp_path), val_fraction=0.2,
                                                split_seed=3), out)
    again = load_prepared_molecules(out)
    assert manifest["content_hash"] == info["content_hash"] == again.info["content_hash"]
    assert sorted(again.train_smiles + again.val.smiles) == all_smiles


def test_split_is_deterministic_and_depends_on_seed(tmp_path):
    sdf = tmp_path / "gdb9.sdf"
    _write_sdf(sdf, with_garbage=False)

    def val_set(seed: int) -> list[str]:
        cfg = DataConfig(dataset="qm9", root=str(sdf), val_fraction=0.5, split_seed=seed)
        return sorted(load_molecule_data(cfg).val.smiles)

    assert val_set(0) == val_set(0)
    assert len({tuple(val_set(s)) for s in range(6)}) > 1


def test_qm9_max_items(tmp_path):
    sdf = tmp_path / "gdb9.sdf"
    _write_sdf(sdf, with_garbage=False)
    data = load_molecule_data(DataConfig(dataset="qm9", root=str(sdf), max_items=3))
    assert len(data.train) + len(data.val) == 3


def test_qm9_missing_file_names_the_setting(tmp_path):
    with pytest.raises(DataError, match=r"data\.root.*gdb9\.sdf"):
        load_molecule_data(DataConfig(dataset="qm9", root=str(tmp_path / "missing.sdf")))
    with pytest.raises(DataError, match=r"data\.root"):
        load_molecule_data(DataConfig(dataset="qm9", root=None))


# ---------------------------------------------------------------------------------------------
# Augmentation and conversion
# ---------------------------------------------------------------------------------------------
def test_random_rotation_is_a_proper_rotation():
    t, x, _ = embed_molecule("CC(=O)N", 0)
    n = len(t)
    coords = torch.zeros(4, 12, 3)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    coords[:, :n] = torch.as_tensor(x, dtype=torch.float32)
    mask[:, :n] = True
    g = torch.Generator().manual_seed(0)
    rot = random_rotation(coords, mask, g)
    assert rot.shape == coords.shape
    assert (rot[~mask] == 0).all()
    # distances kept, chirality kept (no reflection): Kabsch with proper rotations gives ~0
    for b in range(4):
        assert kabsch_rmsd(rot[b, :n], coords[b, :n]) < 1e-4
        assert torch.allclose(torch.cdist(rot[b, :n], rot[b, :n]), torch.cdist(coords[b, :n], coords[b, :n]),
                              atol=1e-4)
    # each molecule gets its own rotation; the generator makes it repeatable
    assert not torch.allclose(rot[0], rot[1], atol=1e-3)
    again = random_rotation(coords, mask, torch.Generator().manual_seed(0))
    assert torch.equal(rot, again)
    # a single molecule (N, 3) works too
    assert random_rotation(coords[0], mask[0], g).shape == (12, 3)


def test_random_rotation_is_uniform():
    g = torch.Generator().manual_seed(1)
    e = torch.zeros(20000, 1, 3, dtype=torch.float64)
    e[..., 2] = 1.0
    v = random_rotation(e, None, g)[:, 0]
    # the image of a fixed unit vector is uniform on the sphere: mean 0, second moments I/3
    assert v.mean(0).abs().max() < 0.03
    second = (v.T @ v) / len(v)
    assert torch.allclose(second, torch.eye(3, dtype=torch.float64) / 3, atol=0.02)
    # determinants are +1
    basis = torch.eye(3, dtype=torch.float64).expand(50, 3, 3).clone()
    r = random_rotation(basis, None, g)
    assert torch.allclose(torch.linalg.det(r), torch.ones(50, dtype=torch.float64), atol=1e-9)


def test_to_rdkit_keeps_atoms_and_positions():
    types = torch.tensor([1, 3, 0, 0, 0, 0, PAD_TYPE, PAD_TYPE])
    coords = torch.randn(8, 3)
    mask = types >= 0
    mol = to_rdkit(types, coords, mask)
    assert [a.GetSymbol() for a in mol.GetAtoms()] == ["C", "O", "H", "H", "H", "H"]
    assert mol.GetNumBonds() == 0 and mol.GetNumConformers() == 1
    assert np.allclose(mol.GetConformer().GetPositions(), coords[:6].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="atom type"):
        to_rdkit(torch.tensor([7]), torch.zeros(1, 3))
