"""moses3d: MOSES SMILES -> a deterministic subset of embedded 3-D molecules (unite_core.data.moses).

The fast tests read a small SMILES file written here (through data.root); one test reads the real
molsets wheel that scripts/setup.sh downloads.
"""

from __future__ import annotations

import gzip
import logging
import zipfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem

from unite_core.config import ConfigError, DataConfig, config_from_dict
from unite_core.data import moses
from unite_core.data.errors import DataError
from unite_core.io import file_sha256
from unite_core.atoms import ATOM_MASSES, ATOM_TYPES
from unite_core.chem import build_molecule
from unite_core.data.molecule_sets import (
    load_molecule_data,
    load_prepared_molecules,
    prepare_molecule_data,
)

ROOT = Path(__file__).resolve().parents[2]

# Small neutral C/N/O/F molecules (at most 12 heavy atoms, 29 atoms with H): all pass the filters.
PASS = [
    "CCO", "CC(=O)O", "CC#N", "c1ccccc1", "CC(C)O", "CCN", "COC", "CC(=O)C", "OCCO", "NCCN",
    "c1ccncc1", "c1ccoc1", "c1cc[nH]c1", "CC(=O)N", "FC(F)F", "CCCF", "OC(=O)C(=O)O", "C1CCCC1", "C1CCOC1",
    "C1CCNCC1", "CC=O", "C=CC=C", "CC(C)(C)O", "NC(=O)N", "COC(=O)C", "c1ccc(O)cc1", "c1ccc(N)cc1",
    "c1ccc(F)cc1", "Cc1ccccc1", "OC1CCCCC1", "CCOC(=O)C", "N#CC#N", "O=C1CCCC1", "CC(N)C(=O)O", "NCC(=O)O",
    "c1cnc[nH]1", "c1ncncn1", "O=Cc1ccco1", "CC1=CC(=O)C=CC1=O", "FC(F)(F)C(=O)O", "OCC(O)CO", "CCCCO",
    "C#CCO", "CN(C)C=O", "O=C(O)c1ccccc1",
]
# What the filters and the embedding must do with these (category, reason).
SPECIAL = {
    "CCS": ("filtered", "elements"),
    "ClCCCl": ("filtered", "elements"),
    "C[N+](C)(C)C": ("filtered", "charged"),
    "CCO.O": ("filtered", "fragments"),
    "CCCCCCCCCCCCCCC": ("filtered", "too_many_heavy_atoms"),  # 15 > 12
    "CCCCCCCCCC": ("filtered", "too_many_atoms"),  # 32 atoms with H > 29
    "C1CC": ("unparsable", None),  # ring never closed
    "OCC": ("duplicate", None),  # ethanol again, written differently
    "C1#CC1": ("failed", None),  # a triple bond in a three-membered ring: no conformer
    "C1#CCC1": ("failed", None),
}
SMILES = PASS + list(SPECIAL)


def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(dataset="moses3d", root=str(root), num_molecules=40, max_heavy_atoms=12, max_atoms=29,
                prepare_workers=1, val_fraction=0.2, split_seed=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def smiles_csv(tmp_path_factory) -> Path:
    """The SMILES above as a gzipped CSV with MOSES's header."""
    path = tmp_path_factory.mktemp("moses") / "train.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("SMILES\n" + "\n".join(SMILES) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(smiles_csv, tmp_path_factory):
    """40 molecules prepared once, in this process (prepare_workers=1)."""
    out = tmp_path_factory.mktemp("moses_prepared") / "moses3d"
    cfg = _cfg(smiles_csv)
    manifest = prepare_molecule_data(cfg, out)
    return cfg, out, manifest, load_prepared_molecules(out, cfg)


def _visited(manifest: dict, seed: int = 0) -> list[str]:
    """The SMILES read, by the documented contract: a permutation seeded by data.split_seed, in order."""
    order = np.random.default_rng(seed).permutation(len(SMILES))
    return [SMILES[i] for i in order[: manifest["num_scanned"]]]


def _all_smiles(data) -> list[str]:
    return list(data.train.smiles) + list(data.val.smiles)


# ---------------------------------------------------------------------------------------------
def test_prepare_and_load_give_the_requested_number_of_embedded_molecules(prepared):
    cfg, out, manifest, data = prepared
    assert manifest["dataset"] == "moses3d" and manifest["num_requested"] == 40
    assert len(data.train) + len(data.val) == 40 and len(data.val) == 8
    assert data.info["atom_types"] == ATOM_TYPES and data.train.max_atoms == 29
    assert manifest["source_file"] == str(cfg.root) and len(manifest["source_sha256"]) == 64
    assert manifest["relaxation"] == {"mmff": 40}
    # explicit hydrogens, as QM9 has them: each molecule has exactly the atoms of its SMILES with H
    for ds in (data.train, data.val):
        for i in range(len(ds)):
            n = int(ds.mask[i].sum())
            types = Counter(ATOM_TYPES[t] for t in ds.types[i, :n].tolist())
            ref = Chem.AddHs(Chem.MolFromSmiles(ds.smiles[i]))
            assert types == Counter(a.GetSymbol() for a in ref.GetAtoms()), ds.smiles[i]
            # centred at the centre of mass
            w = torch.tensor(ATOM_MASSES, dtype=torch.float64)[ds.types[i, :n]]
            com = (w[:, None] * ds.coords[i, :n].double()).sum(0) / w.sum()
            assert com.abs().max() < 1e-4
    # the geometry is a real conformer: bonds perceived from the coordinates give back the molecule
    same = 0
    for i in range(len(data.train)):
        mol = build_molecule(data.train.types[i], data.train.coords[i], data.train.mask[i])
        ref = Chem.MolToSmiles(Chem.MolFromSmiles(data.train.smiles[i]))
        same += mol is not None and Chem.MolToSmiles(Chem.RemoveHs(mol)) == ref
    assert same >= len(data.train) - 1


def test_filters_duplicates_and_embedding_failures_are_counted_and_reported(smiles_csv, tmp_path, caplog):
    # all 45 molecules that pass: reading stops at the last of them in the visiting order, which with
    # split_seed=0 comes after both embedding failures
    cfg = _cfg(smiles_csv, num_molecules=len(PASS))
    with caplog.at_level(logging.INFO, logger="unite_core.data.moses"):
        manifest = prepare_molecule_data(cfg, tmp_path / "all")
    visited = _visited(manifest)
    expected = Counter(SPECIAL[s][0] for s in visited if s in SPECIAL)
    reasons = Counter(SPECIAL[s][1] for s in visited if s in SPECIAL and SPECIAL[s][0] == "filtered")
    assert manifest["num_train"] + manifest["num_val"] == len(PASS)
    assert manifest["num_failed_embedding"] == expected["failed"] == 2
    assert sorted(manifest["failed_smiles"]) == sorted(Chem.MolToSmiles(Chem.MolFromSmiles(s))
                                                       for s in SPECIAL if SPECIAL[s][0] == "failed")
    assert manifest["num_filtered"] == dict(reasons)
    assert manifest["num_duplicates"] == expected["duplicate"]
    assert manifest["num_unparsable"] == expected["unparsable"]
    assert manifest["num_scanned"] == len(PASS) + sum(expected.values())
    assert any("2 molecule(s) failed to embed" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    # the stored SMILES are the passing molecules, each once
    stored = _all_smiles(load_prepared_molecules(tmp_path / "all", cfg))
    assert sorted(stored) == sorted(Chem.MolToSmiles(Chem.MolFromSmiles(s), isomericSmiles=False) for s in PASS)


def test_too_few_molecules_is_one_clear_error(smiles_csv):
    with pytest.raises(DataError) as err:
        load_molecule_data(_cfg(smiles_csv, num_molecules=len(PASS) + 1))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"only {len(PASS)} of the {len(SMILES)} molecules" in msg and "failed to embed: 2" in msg
    assert "data.num_molecules=46" in msg and "'elements': 2" in msg


def test_same_params_same_subset_and_coordinates_for_any_number_of_workers(smiles_csv, prepared, tmp_path):
    cfg, _, manifest, data = prepared
    again = prepare_molecule_data(_cfg(smiles_csv, prepare_workers=2), tmp_path / "two_workers")
    assert again["content_hash"] == manifest["content_hash"]  # over the arrays and SMILES
    data2 = load_prepared_molecules(tmp_path / "two_workers", cfg)  # prepare_workers is not a data setting
    assert torch.equal(data2.train.coords, data.train.coords) and data2.val.smiles == data.val.smiles
    # a smaller subset is a prefix of the visiting order: its molecules are among the larger one's
    small = load_molecule_data(_cfg(smiles_csv, num_molecules=20))
    assert set(_all_smiles(small)) < set(_all_smiles(data))
    # another seed visits the molecules in another order
    other = load_molecule_data(_cfg(smiles_csv, num_molecules=20, split_seed=1))
    assert set(_all_smiles(other)) != set(_all_smiles(small))
    # a changed data setting makes the cache stale
    with pytest.raises(DataError, match="data.num_molecules: prepared 40 vs now 41"):
        load_prepared_molecules(prepared[1], _cfg(smiles_csv, num_molecules=41))


def test_sources_wheel_csv_with_split_and_folder(tmp_path):
    csv = "SMILES\n" + "\n".join(PASS[:5]) + "\n"
    wheel = tmp_path / "wheels" / moses.MOSES_WHEEL
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(moses.MOSES_MEMBER, gzip.compress(csv.encode()))
        zf.writestr("moses/__init__.py", "raise ImportError('never imported')\n")
    assert moses.read_smiles(wheel) == PASS[:5]
    assert moses.find_source(_cfg(wheel.parent)) == wheel
    split = tmp_path / "dataset_v1.csv"
    split.write_text("SMILES,SPLIT\nCCO,train\nCCN,test\nCCC,train\n")
    assert moses.read_smiles(split) == ["CCO", "CCC"]
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(DataError, match="not a molsets wheel"):
        moses.read_smiles(bad)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("name,value\na,1\n")
    with pytest.raises(DataError, match="no SMILES column"):
        moses.read_smiles(nocol)
    with pytest.raises(DataError, match="no such file"):
        moses.find_source(_cfg(tmp_path / "missing.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without a molsets wheel"):
        moses.find_source(_cfg(tmp_path / "empty"))


def test_missing_or_broken_default_wheel_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(moses, "_installed_member", lambda: None)
    monkeypatch.setattr(moses, "default_wheel_path", lambda: tmp_path / moses.MOSES_WHEEL)
    cfg = DataConfig(dataset="moses3d", max_heavy_atoms=32, max_atoms=32, num_molecules=10)
    with pytest.raises(DataError, match=r"is missing; run `bash scripts/setup.sh`"):
        load_molecule_data(cfg)
    (tmp_path / moses.MOSES_WHEEL).write_bytes(b"half a download")
    with pytest.raises(DataError, match="pinned sha256.*delete it"):
        load_molecule_data(cfg)


def test_setup_script_pins_the_wheel_the_code_expects():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    assert f"molsets=={moses.MOSES_VERSION} --hash=sha256:{moses.MOSES_WHEEL_SHA256}" in text
    assert moses.MOSES_WHEEL in text and ".venv/share/unite" in text


def test_the_setup_wheel_is_there_and_holds_the_moses_training_set():
    """Needs `bash scripts/setup.sh` (which CI runs): the default source of data.dataset=moses3d."""
    cfg = DataConfig(dataset="moses3d", max_heavy_atoms=32, max_atoms=32)
    source = moses.find_source(cfg)
    if source.suffix == ".whl":
        assert file_sha256(source) == moses.MOSES_WHEEL_SHA256
    smiles = moses.read_smiles(source)
    assert len(smiles) == 1_584_663 and len(set(smiles[:1000])) == 1000
    assert Chem.MolFromSmiles(smiles[0]) is not None


def test_config_errors_are_one_line_and_name_the_fix():
    def err(**data) -> str:
        with pytest.raises(ConfigError) as e:
            config_from_dict({"modality": "molecules", "data": {"dataset": "moses3d", **data}})
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "set data.num_molecules=500 instead" in err(max_items=500, max_heavy_atoms=32, max_atoms=32)
    msg = err(max_heavy_atoms=9, max_atoms=32)
    assert "data.max_heavy_atoms=9 keeps no MOSES molecule" in msg and "presets/molecules_large.yaml" in msg
    assert "data.max_atoms=17 keeps no MOSES molecule" in err(max_heavy_atoms=32, max_atoms=17)
    assert config_from_dict({"modality": "molecules", "data": {"dataset": "moses3d", "max_heavy_atoms": 16,
                                                                "max_atoms": 18}}).data.max_atoms == 18
    assert "data.num_molecules" in err(num_molecules=1, max_heavy_atoms=32, max_atoms=32)
    assert "data.prepare_workers" in err(prepare_workers=0, max_heavy_atoms=32, max_atoms=32)
    # with a SMILES file of one's own, small molecules may exist: QM9's limits are allowed
    cfg = config_from_dict({"modality": "molecules", "data": {"dataset": "moses3d", "root": "my.csv"}})
    assert (cfg.data.max_heavy_atoms, cfg.data.max_atoms) == (9, 29)
    with pytest.raises(ConfigError, match="moses3d"):
        config_from_dict({"modality": "molecules", "data": {"dataset": "mnist5k"}})


class _RecordingReporter:
    def __init__(self):
        self.updates: list[tuple[str, float, dict]] = []

    @contextmanager
    def progress(self, description, total):
        rec = self

        class Task:
            def update(self, completed, **fields):
                rec.updates.append((description, completed, fields))

        yield Task()


def test_prepare_stage_shows_progress_and_records_failures(smiles_csv, tmp_path):
    from pipelines.stages import execute

    cfg = config_from_dict({"modality": "molecules", "tracking": {"enabled": False},
                            "data": _cfg(smiles_csv, num_molecules=len(PASS)).model_dump()})
    reporter = _RecordingReporter()
    metrics = execute("prepare", cfg, tmp_path, reporter=reporter)
    assert metrics["num_failed_embedding"] == 2 and metrics["num_train"] + metrics["num_val"] == len(PASS)
    assert (tmp_path / "data" / "moses3d" / "manifest.json").is_file()
    descriptions = {u[0] for u in reporter.updates}
    assert descriptions == {f"moses3d: embed {len(PASS)} molecules"}
    assert reporter.updates[-1][1] == len(PASS) and reporter.updates[-1][2]["failed"] == 2
    assert [u[1] for u in reporter.updates] == sorted(u[1] for u in reporter.updates)
