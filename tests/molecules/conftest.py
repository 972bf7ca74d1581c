"""Molecule tests: the molecule data (embedded set, QM9, MOSES), metrics and model; they need RDKit."""

import pytest

from unite_core.config import DataConfig
from unite_core.data.molecule_sets import load_prepared_molecules, prepare_molecule_data


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The full embedded molecule set, prepared once for the session (about 10 s): (cfg, folder, manifest,
    loaded data)."""
    out = tmp_path_factory.mktemp("molecules") / "embedded"
    cfg = DataConfig(dataset="molecules_embedded")
    manifest = prepare_molecule_data(cfg, out)
    return cfg, out, manifest, load_prepared_molecules(out, cfg)
