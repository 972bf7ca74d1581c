"""Molecule evaluation and sample files: sampling, reconstruction and generation metrics, SDF/PNG.

The counterpart of ``unite_core.eval_images`` for the modality "molecules": the model side
(decoder slots -> atoms, alignment to the input) is ``unite_core.modalities.molecules``, the
metrics ``unite_core.metrics.molecule_metrics``, the RDKit helpers ``unite_core.chem``.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rdkit import Chem
from rdkit.Chem import Draw
from rdkit.rdBase import BlockLogs
from torch import nn

from .chem import build_molecule, canonical_smiles, depiction, is_valid, to_rdkit
from .config import Config
from .devices import autocast, autocast_dtype_for
from .io import atomic_write, atomic_write_text
from .metrics.molecule_metrics import generation_metrics, reconstruction_metrics
from .modalities.molecules import align_to_reference, slots_to_atoms

log = logging.getLogger(__name__)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_molecules(
    model, n: int, cfg: Config, *, size_mode: Optional[str] = None, batch_size: Optional[int] = None,
    seed: Optional[int] = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], dict[str, float]]:
    """Sample n molecules: flow ODE from noise (cfg.sample solver/steps), decode, read atoms.

    Returns (per-molecule (types, coords, mask), {"nfe": evaluations per batch, "seconds": ...}).
    """
    modality = model.modality
    mode = size_mode or getattr(modality, "size_mode", "decoder")
    dev = _device_of(model)
    dtype = autocast_dtype_for(cfg.train.precision)
    s = cfg.sample
    bs = batch_size or cfg.eval.batch_size
    gen = torch.Generator(device=dev).manual_seed(s.seed if seed is None else seed)
    size_gen = torch.Generator().manual_seed((s.seed if seed is None else seed) + 1)
    was_training = model.training
    model.eval()
    out: list = []
    nfe = 0
    start = time.perf_counter()
    try:
        for first in range(0, n, bs):
            b = min(bs, n - first)
            labels = torch.zeros(b, dtype=torch.long, device=dev)
            z, nfe = model.sample_latents(labels, s, generator=gen, autocast_dtype=dtype)
            with autocast(dev, dtype):
                decoded = model.decode(z)
            sizes = modality.sample_sizes(b, size_gen) if mode == "histogram" else None
            out.extend(modality.postprocess(decoded.float(), sizes=sizes))
    finally:
        model.train(was_training)
    return out, {"nfe": float(nfe), "seconds": time.perf_counter() - start}


def size_distribution(sizes: np.ndarray, max_atoms: int) -> np.ndarray:
    """Normalised histogram over 0..max_atoms atoms."""
    h = np.bincount(np.asarray(sizes, dtype=np.int64), minlength=max_atoms + 1)[: max_atoms + 1]
    return h / max(1, h.sum())


def size_report(gen_sizes: np.ndarray, data_sizes: np.ndarray, max_atoms: int) -> dict[str, float]:
    """Generated vs data atom counts: means, stds, total variation distance, empty molecules."""
    pg = size_distribution(gen_sizes, max_atoms)
    pd = size_distribution(data_sizes, max_atoms)
    return {
        "gen_size_mean": float(np.mean(gen_sizes)) if len(gen_sizes) else 0.0,
        "gen_size_std": float(np.std(gen_sizes)) if len(gen_sizes) else 0.0,
        "data_size_mean": float(np.mean(data_sizes)),
        "data_size_std": float(np.std(data_sizes)),
        "size_tv_distance": float(0.5 * np.abs(pg - pd).sum()),
        "gen_empty": 100.0 * float(np.mean(np.asarray(gen_sizes) == 0)) if len(gen_sizes) else 0.0,
    }


@torch.no_grad()
def reconstruct_dataset(model, dataset, cfg: Config, batch_size: Optional[int] = None) -> dict[str, float]:
    """Reconstruction metrics (match rate %, RMSD A, type/size accuracy %) over a MoleculeDataset."""
    modality = model.modality
    dev = _device_of(model)
    dtype = autocast_dtype_for(cfg.train.precision)
    bs = batch_size or cfg.eval.batch_size
    gen = torch.Generator(device=dev).manual_seed(12345)
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("tt", "tx", "tm", "pt", "px", "pm")}
    try:
        for first in range(0, len(dataset), bs):
            idx = torch.arange(first, min(len(dataset), first + bs))
            batch = {k: v.to(dev) for k, v in dataset.get_batch(idx).items()}
            obs, _ = modality.unpack(batch)
            with autocast(dev, dtype):
                decoded = model.reconstruct(obs, gen)
            types, coords, mask = slots_to_atoms(decoded.float())
            tt, tx, tm = (obs["types"].cpu().numpy(), obs["coords"].cpu().numpy().astype(np.float64),
                          obs["mask"].cpu().numpy())
            pt, px, pm = align_to_reference(tt, tx, tm, types.cpu().numpy(),
                                            coords.cpu().numpy().astype(np.float64), mask.cpu().numpy())
            for k, v in zip(("tt", "tx", "tm", "pt", "px", "pm"), (tt, tx, tm, pt, px, pm)):
                parts[k].append(v)
    finally:
        model.train(was_training)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    r = reconstruction_metrics(cat["tt"], cat["tx"], cat["tm"], cat["pt"], cat["px"], cat["pm"])
    return {
        "recon_match_rate": r["match_rate"],
        "recon_rmsd": r["rmsd_mean"],
        "recon_rmsd_all": r["rmsd_mean_all"],
        "recon_type_accuracy": r["type_accuracy"],
        "recon_size_accuracy": 100.0 * float((cat["tm"].sum(1) == cat["pm"].sum(1)).mean()),
        "recon_num_molecules": float(r["num_molecules"]),
    }


def evaluate_molecules(model, data, cfg: Config, n_samples: Optional[int] = None, *,
                       size_mode: Optional[str] = None) -> dict[str, float]:
    """Reconstruction on the validation split and generation metrics of n samples (flat floats).

    ``data`` is a ``MoleculeData`` (train_smiles for novelty, train sizes for the size report, val
    for reconstruction). n defaults to ``cfg.sample.num_samples``. Rates are in percent, RMSD in A.
    Keys: recon_match_rate, recon_rmsd (mean over matched molecules), recon_rmsd_all (over
    molecules with the right atoms), recon_type_accuracy, recon_size_accuracy, validity,
    uniqueness, novelty, atom_stability, molecule_stability, num_samples, num_valid, num_unique,
    gen_size_mean/std, data_size_mean/std, size_tv_distance, gen_empty, nfe, and timings
    (recon_seconds, sample_seconds, metrics_seconds, samples_per_s). ``size_histogram_mode`` is 1
    when sizes were drawn from the data's histogram, 0 when the decoder decided them.
    """
    n = int(n_samples or cfg.sample.num_samples)
    mode = size_mode or getattr(model.modality, "size_mode", "decoder")
    t0 = time.perf_counter()
    out: dict[str, float] = reconstruct_dataset(model, data.val, cfg)
    out["recon_seconds"] = time.perf_counter() - t0
    samples, info = generate_molecules(model, n, cfg, size_mode=mode)
    out["sample_seconds"] = info["seconds"]
    out["samples_per_s"] = n / max(info["seconds"], 1e-9)
    out["nfe"] = info["nfe"]
    t1 = time.perf_counter()
    g = generation_metrics(samples, data.train_smiles)
    out["metrics_seconds"] = time.perf_counter() - t1
    out.update({k: float(v) for k, v in g.items()})
    gen_sizes = np.array([int(m.sum()) for _, _, m in samples])
    data_sizes = data.train.mask.sum(1).numpy()
    out.update(size_report(gen_sizes, data_sizes, model.modality.max_atoms))
    out["size_histogram_mode"] = 1.0 if mode == "histogram" else 0.0
    log.info("molecule evaluation: %s", {k: round(v, 4) for k, v in out.items()})
    return out


def write_samples(model, n: int, out_dir, cfg: Config, *, grid_max: int = 64,
                  size_mode: Optional[str] = None) -> dict[str, str]:
    """Generate n molecules and write ``samples.sdf`` and ``samples.png`` under out_dir.

    The SDF holds every sample: bonds and bond orders where ``build_molecule`` succeeds, atoms only
    otherwise; properties ``valid`` (0/1), ``smiles`` (valid ones) and ``num_atoms``. The PNG is a
    grid of 2-D depictions of the first ``grid_max`` samples (RDKit MolsToGridImage), each labelled
    with its SMILES or "invalid". Returns {"sdf": path, "png": path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, _ = generate_molecules(model, n, cfg, size_mode=size_mode)
    sdf_path = out_dir / "samples.sdf"
    png_path = out_dir / "samples.png"
    pictures, legends = [], []
    sdf_text = io.StringIO()
    writer = Chem.SDWriter(sdf_text)
    writer.SetKekulize(False)
    n_valid = 0
    with BlockLogs():
        for i, (types, coords, mask) in enumerate(samples):
            mol = build_molecule(types, coords, mask)
            valid = is_valid(mol)
            if mol is None:
                mol = to_rdkit(types, coords, mask)
            smiles = canonical_smiles(mol) if valid else ""
            n_valid += int(valid)
            mol.SetProp("_Name", f"sample_{i}")
            mol.SetIntProp("valid", int(valid))
            mol.SetProp("smiles", smiles)
            mol.SetIntProp("num_atoms", int(mask.sum()))
            writer.write(mol)
            if i < grid_max:
                pictures.append(depiction(mol, valid))
                legends.append(f"{i}: {smiles}" if valid else f"{i}: invalid ({int(mask.sum())} atoms)")
    writer.close()
    atomic_write_text(sdf_path, sdf_text.getvalue())
    img = Draw.MolsToGridImage(pictures, molsPerRow=8, subImgSize=(200, 200), legends=legends)
    atomic_write(png_path, lambda f: img.save(f, format="PNG"))
    log.info("wrote %d molecules (%d valid) to %s and %s", len(samples), n_valid, sdf_path, png_path)
    return {"sdf": str(sdf_path), "png": str(png_path)}


__all__ = [
    "evaluate_molecules", "generate_molecules", "reconstruct_dataset", "size_distribution", "size_report",
    "write_samples",
]
