"""MOSES molecules with one RDKit conformer each (``data.dataset: moses3d``).

Source. The MOSES benchmark's training set (``moses/dataset/data/train.csv.gz``, 1,584,663
drug-like SMILES; heavy atoms C, N, O, F, S, Cl, Br; neutral) as shipped inside the PyPI wheel
``molsets==0.3.1``. The wheel is read as a zip file, never installed or imported: its own
dependencies are old and not needed. ``scripts/setup.sh`` downloads it, pinned by version and
sha256, to ``<sys.prefix>/share/unite/`` (``.venv/share/unite/`` in the project's set-up).
``data.root`` may name another source instead: a molsets wheel, a CSV (optionally gzipped) with a
``SMILES`` column (a ``SPLIT`` column, as in MOSES's ``dataset_v1.csv``, keeps the ``train`` rows),
or a folder holding either. With ``data.root: null`` an installed ``molsets`` distribution is used
when present, else the downloaded wheel.

Subset. The SMILES are visited in a fixed pseudo-random order (a permutation seeded by
``data.split_seed``); each one is parsed, filtered like the embedded set (single fragment, neutral,
heavy atoms C/N/O/F only, at most ``data.max_heavy_atoms`` heavy atoms and ``data.max_atoms`` atoms
with explicit hydrogens), deduplicated, and embedded with ``unite_core.chem.embed_molecule`` (ETKDGv3 seeded by
``data.conformer_seed``, MMFF94 / UFF relaxation). The first ``data.num_molecules`` molecules of that
order that embed make the dataset: a molecule that fails to embed is counted, listed and replaced
by the next candidate. Each molecule's result depends only on its SMILES and the seeds, and results
are taken in the visiting order, so the subset and every coordinate are the same for any number of
worker processes (``data.prepare_workers``), and a smaller ``num_molecules`` gives a prefix of a
larger one's molecules (before the train/val split).

Why the element filter is not optional: the molecule modality's vocabulary is QM9's (H, C, N, O,
F; ``unite_core.atoms.ATOM_TYPES``), and so are the bond tables of the validity and stability metrics. The 42.5 % of
MOSES molecules with S, Cl or Br are therefore skipped (counted as ``elements``).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import gzip
import io
import logging
import multiprocessing
import os
import sys
import time
import zipfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from rdkit import Chem
from rdkit.rdBase import BlockLogs

from unite_core.chem import canonical_smiles, embed_molecule, filter_reason
from unite_core.config import DataConfig
from unite_core.data.errors import DataError
from unite_core.io import file_sha256

logger = logging.getLogger(__name__)

MOSES_DISTRIBUTION = "molsets"
MOSES_VERSION = "0.3.1"
MOSES_WHEEL = f"molsets-{MOSES_VERSION}-py3-none-any.whl"
# sha256 of the wheel on PyPI (also pinned in scripts/setup.sh; a test checks that both agree).
MOSES_WHEEL_SHA256 = "7f4450e3ebecebe79c3a2a55950c93daddee071120daf64a163d03481e811d34"
MOSES_MEMBER = "moses/dataset/data/train.csv.gz"
# SMILES per unit of parallel work: results are consumed block by block, in order, so at most one
# block is computed beyond the requested number of molecules.
BLOCK_SIZE = 1024
CHUNK_SIZE = 32
MAX_LISTED_FAILURES = 50

# A progress factory: ``progress(description, total)`` is a context manager yielding a task with
# ``update(completed, **fields)`` (the pipeline's Reporter.progress has this shape).
ProgressFactory = Callable[[str, Optional[float]], Any]


def default_wheel_path() -> Path:
    """Where ``scripts/setup.sh`` puts the molsets wheel: ``<sys.prefix>/share/unite/``."""
    return Path(sys.prefix) / "share" / "unite" / MOSES_WHEEL


def _fix_hint() -> str:
    return (f"run `bash scripts/setup.sh` (downloads {MOSES_WHEEL} from PyPI into {default_wheel_path().parent}) "
            f"or set data.root=<a molsets wheel, a MOSES train.csv(.gz) or a folder holding one>")


def _installed_member() -> Optional[Path]:
    """train.csv.gz of an installed molsets distribution (found without importing it), or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution(MOSES_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(MOSES_MEMBER)))
    return path if path.is_file() else None


def find_source(cfg: DataConfig) -> Path:
    """The file the MOSES SMILES are read from (a wheel or a CSV); ``DataError`` if there is none."""
    if cfg.root:
        path = Path(cfg.root).expanduser()
        if path.is_dir():
            found = sorted(path.glob("molsets-*.whl")) + [
                path / n for n in ("train.csv.gz", "train.csv") if (path / n).is_file()]
            if not found:
                raise DataError(
                    f"data.root={cfg.root!r} is a folder without a molsets wheel or train.csv(.gz); "
                    f"set data.root to a molsets wheel or a SMILES CSV, or null to use {MOSES_WHEEL} from set-up"
                )
            path = found[0]
        if not path.is_file():
            raise DataError(
                f"data.root={cfg.root!r}: no such file; set data.root to a molsets wheel, a SMILES CSV "
                f"(.csv or .csv.gz) or a folder holding one, or null to use {MOSES_WHEEL} from set-up"
            )
        return path
    installed = _installed_member()
    if installed is not None:
        return installed
    wheel = default_wheel_path()
    if wheel.is_file():
        return wheel
    raise DataError(f"MOSES data not found (data.dataset=moses3d, data.root=null): {wheel} is missing; {_fix_hint()}")




def read_smiles(path: Path) -> list[str]:
    """All SMILES of a MOSES source (wheel, CSV or gzipped CSV), in file order."""
    import pandas as pd

    path = Path(path)
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as zf:
                try:
                    raw = zf.read(MOSES_MEMBER)
                except KeyError:
                    raise DataError(f"{path} holds no {MOSES_MEMBER}: not a molsets wheel; {_fix_hint()}") from None
            frame = pd.read_csv(io.BytesIO(gzip.decompress(raw)))
        else:
            frame = pd.read_csv(path, compression="infer")
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is unreadable ({type(exc).__name__}: {exc}); {_fix_hint()}") from None
    columns = {str(c).lower(): c for c in frame.columns}
    if "smiles" not in columns:
        raise DataError(f"{path} has no SMILES column (columns: {list(frame.columns)[:10]}); "
                        "give a CSV with a header line naming a SMILES column")
    if "split" in columns:  # MOSES's dataset_v1.csv: keep the training split
        frame = frame[frame[columns["split"]].astype(str).str.lower() == "train"]
    return frame[columns["smiles"]].dropna().astype(str).str.strip().tolist()


# ---------------------------------------------------------------------------------------------
# Per-molecule work (runs in the worker processes)
# ---------------------------------------------------------------------------------------------
def screen_and_embed(smiles: str, cfg: DataConfig) -> tuple:
    """Filter one SMILES and embed it. Returns one of

    ``("unparsable",)``, ``("filtered", reason)``, ``("failed", key)`` (no conformer) or
    ``("ok", key, types, coords, relaxation, smiles_no_stereo)``, where ``key`` is the canonical
    isomeric SMILES used for deduplication.
    """
    with BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            return ("unparsable",)
        reason = filter_reason(mol, cfg)
        if reason is not None:
            return ("filtered", reason)
        key = Chem.MolToSmiles(mol)
        out = embed_molecule(key, cfg.conformer_seed)
        if out is None:
            return ("failed", key)
        types, coords, relaxation = out
        return ("ok", key, types, coords, relaxation, canonical_smiles(mol))


@contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    """``map(fn, items)`` in order: in this process for one worker, else in spawned processes.

    Spawned, not forked: the caller may hold threads (tracking, progress) and an OpenMP pool, which a
    fork would copy in an undefined state.
    """
    if workers <= 1:
        yield map
        return
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield functools.partial(pool.map, chunksize=CHUNK_SIZE)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _tqdm_progress(description: str, total: Optional[float]) -> Iterator[Any]:
    """Fallback progress bar (tqdm, on a terminal only) when the caller gives no progress factory."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="mol", disable=None, dynamic_ncols=True)

    class _Task:
        def update(self, completed: float, **fields: Any) -> None:
            bar.n = completed
            bar.set_postfix(fields, refresh=False)
            bar.refresh()

    try:
        yield _Task()
    finally:
        bar.close()


def resolve_workers(cfg: DataConfig) -> int:
    if cfg.prepare_workers is not None:
        return int(cfg.prepare_workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def build_moses(cfg: DataConfig, progress: Optional[ProgressFactory] = None):
    """(molecules [(types, coords)], SMILES without stereo, stats) for ``data.dataset=moses3d``."""
    source = find_source(cfg)
    digest = file_sha256(source)
    if cfg.root is None and source == default_wheel_path() and digest != MOSES_WHEEL_SHA256:
        raise DataError(f"{source} does not have the pinned sha256 {MOSES_WHEEL_SHA256[:12]}... (a broken "
                        f"download?); delete it and {_fix_hint()}")
    all_smiles = read_smiles(source)
    want = int(cfg.num_molecules)
    order = np.random.default_rng(cfg.split_seed).permutation(len(all_smiles))
    workers = resolve_workers(cfg)
    logger.info("moses3d: %d SMILES in %s; embedding %d with %d process(es)", len(all_smiles), source, want, workers)

    molecules: list[tuple[np.ndarray, np.ndarray]] = []
    smiles_out: list[str] = []
    seen: set[str] = set()
    failed: list[str] = []
    filtered: Counter = Counter()
    relax: Counter = Counter()
    unparsable = duplicates = scanned = 0
    work = functools.partial(screen_and_embed, cfg=cfg)
    t0 = time.perf_counter()
    with (progress or _tqdm_progress)(f"moses3d: embed {want} molecules", want) as task, _mapper(workers) as pmap:
        for start in range(0, len(order), BLOCK_SIZE):
            if len(molecules) >= want:
                break
            block = [all_smiles[i] for i in order[start:start + BLOCK_SIZE]]
            for result in pmap(work, block):
                if len(molecules) >= want:
                    break  # the rest of this block was computed but is not needed
                scanned += 1
                kind = result[0]
                if kind == "unparsable":
                    unparsable += 1
                elif kind == "filtered":
                    filtered[result[1]] += 1
                elif result[1] in seen:
                    duplicates += 1
                elif kind == "failed":
                    seen.add(result[1])
                    failed.append(result[1])
                else:
                    _, key, types, coords, how, smi = result
                    seen.add(key)
                    relax[how] += 1
                    molecules.append((types, coords))
                    smiles_out.append(smi)
            rate = len(molecules) / max(time.perf_counter() - t0, 1e-9)
            task.update(len(molecules), scanned=scanned, failed=len(failed), filtered=sum(filtered.values()),
                        mol_per_s=round(rate, 1))
    if failed:
        logger.warning("moses3d: %d molecule(s) failed to embed and were replaced by the next candidates (e.g. %s)",
                       len(failed), ", ".join(failed[:5]))
    logger.info("moses3d: %d embedded, %d failed to embed, %d filtered out, %d duplicate(s), %d unparsable; "
                "%d of %d SMILES read in %.0f s", len(molecules), len(failed), sum(filtered.values()), duplicates,
                unparsable, scanned, len(all_smiles), time.perf_counter() - t0)
    if len(molecules) < want:
        raise DataError(
            f"only {len(molecules)} of the {len(all_smiles)} molecules in {source} pass the filters and embed "
            f"(filtered out: {dict(sorted(filtered.items()))}; failed to embed: {len(failed)}), fewer than "
            f"data.num_molecules={want}: lower data.num_molecules or raise data.max_atoms / data.max_heavy_atoms"
        )
    stats = {
        "source_file": str(source),
        "source_sha256": digest,
        "num_read": len(all_smiles),
        "num_scanned": scanned,
        "num_requested": want,
        "num_unparsable": unparsable,
        "num_filtered": dict(sorted(filtered.items())),
        "num_duplicates": duplicates,
        "num_failed_embedding": len(failed),
        "failed_smiles": failed[:MAX_LISTED_FAILURES],
        "relaxation": dict(sorted(relax.items())),
    }
    return molecules, smiles_out, stats


__all__ = ["MOSES_MEMBER", "MOSES_VERSION", "MOSES_WHEEL", "MOSES_WHEEL_SHA256", "build_moses", "default_wheel_path",
           "find_source", "read_smiles", "screen_and_embed"]
