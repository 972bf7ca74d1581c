"""Molecules through UNITE: atom tokens, set decoder, augmentation, training, sample files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rdkit import Chem

from tests.conftest import wake
from unite_core.config import DataConfig, config_from_dict
from unite_core.atoms import ATOM_MASSES, PAD_TYPE, random_rotation
from unite_core.data.molecule_sets import MoleculeDataset, load_molecule_data
from unite_core.eval_molecules import evaluate_molecules, reconstruct_dataset, write_samples
from unite_core.modalities import build_modality
from unite_core.modalities.molecules import (
    ABSENT,
    NUM_CLASSES,
    MoleculeModality,
    align_to_reference,
    match_slots,
    slots_to_atoms,
)
from unite_core.model import UNITE
from unite_core.train import Trainer

TINY_MOL = {
    "modality": "molecules",
    "data": {"dataset": "molecules_embedded"},
    "model": {
        "ge_size": "custom", "ge_depth": 2, "ge_width": 64, "ge_heads": 2,
        "decoder_size": "custom", "decoder_depth": 2, "decoder_width": 64, "decoder_heads": 2,
        "latent_tokens": 8, "latent_dim": 16, "in_context_tokens": 0,
    },
    "train": {"steps": 20, "batch_size": 8, "warmup_steps": 2, "lr": 1e-3, "precision": "fp32",
              "log_every": 10, "eval_every": 10, "checkpoint_every": 10},
    "sample": {"solver": "euler", "steps": 4, "num_samples": 8},
    "eval": {"batch_size": 8},
}


def _cfg(**sections):
    from tests.conftest import deep_merge

    return config_from_dict(deep_merge(TINY_MOL, sections))


@pytest.fixture(scope="module")
def mols():
    """A few dozen real embedded molecules (in memory, about 5 s)."""
    return load_molecule_data(DataConfig(dataset="molecules_embedded", max_items=40))


def _batch(ds: MoleculeDataset, n: int) -> dict:
    return ds.get_batch(torch.arange(n))


def _com(types, coords, mask):
    m = torch.tensor(ATOM_MASSES, dtype=torch.float64)[types.clamp_min(0)] * mask
    return (m[..., None] * coords.double()).sum(1) / m.sum(1, keepdim=True)


def _pairwise(coords, mask):
    d = torch.cdist(coords.double(), coords.double())
    m = mask[:, :, None] & mask[:, None, :]
    return d * m


# ---------------------------------------------------------------------------------------------
def test_registered_and_shapes(mols):
    cfg = _cfg()
    assert isinstance(build_modality(cfg, mols.info), MoleculeModality)
    model = wake(UNITE(cfg, mols.info))
    batch = _batch(mols.train, 6)
    obs, y = model.modality.unpack(batch)
    assert y.shape == (6,) and model.modality.batch_size(obs) == 6
    tokens, pos, mask = model.encoder.embed(obs)
    assert tokens.shape == (6, 29, 64)
    assert torch.equal(pos, torch.zeros(29, dtype=torch.long))  # no rotary position: a set of atoms
    assert torch.equal(mask, batch["mask"])
    assert (tokens[~mask] == 0).all()
    z0 = model.tokenize(obs, torch.Generator().manual_seed(0))
    assert z0.shape == (6, 8, 16)
    decoded = model.decode(z0)
    assert decoded.shape == (6, 29, NUM_CLASSES + 3)
    out = model.modality.postprocess(decoded)
    assert len(out) == 6
    for t, x, m in out:
        assert t.shape == (29,) and x.shape == (29, 3) and m.shape == (29,)
        assert (t[~m] == PAD_TYPE).all() and (x[~m] == 0).all()
        n = int(m.sum())
        assert m[:n].all()  # atoms first, then padding


def test_loss_finite_and_backward_reaches_every_part(mols):
    cfg = _cfg()
    model = wake(UNITE(cfg, mols.info)).train()
    loss, metrics = model.compute_loss(_batch(mols.train, 8), torch.Generator().manual_seed(0))
    assert math.isfinite(float(loss.detach()))
    for key in ("type_ce", "coord_mse", "slot_accuracy", "recon", "flow"):
        assert math.isfinite(float(metrics[key])), key
    loss.backward()
    emb = model.encoder.embed
    for p in (emb.type_embed.weight, emb.coord_proj.weight, model.decoder.slot_query,
              model.decoder.head.weight, model.encoder.blocks[0].attn.qkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_perceptual_loss_is_refused(mols):
    with pytest.raises(ValueError, match="w_perc"):
        MoleculeModality(_cfg(loss={"w_perc": 1.0, "perceptual_weights": "x.pt"}), mols.info)


# ---------------------------------------------------------------------------------------------
def test_rotation_augmentation_keeps_centre_and_distances(mols):
    modality = MoleculeModality(_cfg(), mols.info, frame="random")
    obs, _ = modality.unpack(_batch(mols.train, 16))
    out = modality.augment(obs, torch.Generator().manual_seed(3))
    assert torch.equal(out["types"], obs["types"]) and torch.equal(out["mask"], obs["mask"])
    assert _com(out["types"], out["coords"], out["mask"]).abs().max() < 1e-4
    assert torch.allclose(_pairwise(out["coords"], obs["mask"]), _pairwise(obs["coords"], obs["mask"]), atol=1e-4)
    assert (out["coords"][~obs["mask"]] == 0).all()
    assert (out["coords"] - obs["coords"]).abs().max() > 0.5  # it did rotate
    again = modality.augment(obs, torch.Generator().manual_seed(3))
    assert torch.equal(again["coords"], out["coords"])  # seeded by the step generator


def test_principal_frame_is_a_canonical_proper_rotation(mols):
    modality = MoleculeModality(_cfg(), mols.info, frame="principal")
    obs, _ = modality.unpack(_batch(mols.train, 24))
    raw = _batch(mols.train, 24)
    rotated = dict(raw, coords=random_rotation(raw["coords"], raw["mask"], torch.Generator().manual_seed(7)))
    obs_rot, _ = modality.unpack(rotated)
    m = raw["mask"]
    # distances kept, centre of mass kept at the origin, padding zero
    assert torch.allclose(_pairwise(obs["coords"], m), _pairwise(raw["coords"], m), atol=1e-4)
    assert _com(raw["types"], obs["coords"], m).abs().max() < 1e-4
    assert (obs["coords"][~m] == 0).all()
    # proper rotation: the signed volume of the first three atoms is unchanged (chirality kept)
    def volume(x):
        return torch.linalg.det(torch.stack([x[:, 1] - x[:, 0], x[:, 2] - x[:, 0], x[:, 3] - x[:, 0]], 1).double())
    big = m.sum(1) >= 4
    assert torch.allclose(volume(obs["coords"])[big], volume(raw["coords"])[big], atol=1e-3)
    # the same frame whatever the input orientation (all but the rare near-symmetric molecules)
    same = ((obs["coords"] - obs_rot["coords"]).abs().amax((1, 2)) < 1e-3).float().mean()
    assert same >= 0.8
    assert modality.augment(obs, torch.Generator()) is obs  # no augmentation in this frame


def test_augmentation_only_in_training(mols):
    cfg = _cfg()
    model = wake(UNITE(cfg, mols.info))
    calls = []
    real = model.modality.augment
    model.modality.augment = lambda obs, gen: calls.append(gen) or real(obs, gen)
    batch = _batch(mols.train, 4)
    gen = torch.Generator().manual_seed(0)
    model.train()
    model.compute_loss(batch, gen)
    assert calls == [gen]
    model.eval()
    model.compute_loss(batch, gen)
    assert len(calls) == 1


def test_atom_permutation_leaves_tokenization_unchanged(mols):
    cfg = _cfg()
    model = wake(UNITE(cfg, mols.info)).eval()
    obs, _ = model.modality.unpack(_batch(mols.train, 6))
    g = torch.Generator().manual_seed(5)
    perm = torch.stack([torch.randperm(29, generator=g) for _ in range(6)])  # padding moves too
    permuted = {k: v.gather(1, perm if v.ndim == 2 else perm[..., None].expand(-1, -1, 3)) for k, v in obs.items()}
    assert not torch.equal(permuted["types"], obs["types"])
    with torch.no_grad():
        z_a = model.tokenize(obs, torch.Generator().manual_seed(0))
        z_b = model.tokenize(permuted, torch.Generator().manual_seed(0))
        assert (z_a - z_b).abs().max() < 1e-4
        # the set loss does not care about the order of the targets either
        decoded = model.decode(z_a)
        la, _ = model.modality.recon_loss(decoded, obs)
        lb, _ = model.modality.recon_loss(decoded, permuted)
    assert abs(float(la) - float(lb)) < 1e-4


def _perfect_output(types, coords, mask, slot_perm):
    """Decoder output that predicts the molecule exactly, with atoms scattered over slots."""
    B, S = types.shape
    logits = torch.full((B, S, NUM_CLASSES), -20.0)
    cls = torch.where(mask, types, torch.full_like(types, ABSENT))
    logits.scatter_(2, cls[..., None], 20.0)
    out = torch.cat([logits, coords * mask[..., None]], dim=-1)
    return out.gather(1, slot_perm[..., None].expand(-1, -1, out.shape[-1]))


def test_matching_recovers_scattered_atoms(mols):
    modality = MoleculeModality(_cfg(), mols.info)
    obs, _ = modality.unpack(_batch(mols.train, 8))
    g = torch.Generator().manual_seed(1)
    slot_perm = torch.stack([torch.randperm(29, generator=g) for _ in range(8)])
    decoded = _perfect_output(obs["types"], obs["coords"], obs["mask"], slot_perm)
    assign = match_slots(decoded[..., :NUM_CLASSES], decoded[..., NUM_CLASSES:], obs["types"], obs["coords"], obs["mask"])
    # slot s holds atom slot_perm[s]: the atom j sits in slot argsort(slot_perm)[j]
    inverse = slot_perm.argsort(dim=1)
    assert torch.equal(assign[obs["mask"]], inverse[obs["mask"]])
    assert (assign[~obs["mask"]] == -1).all()
    loss, metrics = modality.recon_loss(decoded, obs)
    assert float(loss) < 1e-6 and float(metrics["slot_accuracy"]) == 1.0
    m = modality.recon_metrics(decoded, obs)
    assert m["match_rate"] == 100.0 and m["rmsd"] < 1e-5 and m["type_accuracy"] == 100.0
    # the token-aligned loss would call the same perfect prediction wrong
    modality.assignment = "index"
    loss_index, _ = modality.recon_loss(decoded, obs)
    assert float(loss_index) > 1.0


def test_alignment_and_size_mismatch():
    tt = np.array([[1, 0, 0, -1]])
    tx = np.array([[[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 0]]], dtype=float)
    tm = np.array([[True, True, True, False]])
    pt = np.array([[0, 1, 0, -1]])
    px = np.array([[[-1.1, 0, 0], [0, 0, 0], [1.1, 0, 0], [0, 0, 0]]], dtype=float)
    at, ax, am = align_to_reference(tt, tx, tm, pt, px, tm.copy())
    assert at.tolist() == [[1, 0, 0, -1]] and np.allclose(ax[0, :3, 0], [0, 1.1, -1.1])
    # one atom too few: the layout is kept and the masks differ
    pm = np.array([[True, True, False, False]])
    _, _, am2 = align_to_reference(tt, tx, tm, pt, px, pm)
    assert not np.array_equal(am2, tm)


def test_slots_to_atoms_with_sampled_sizes():
    logits = torch.full((2, 5, NUM_CLASSES), 0.0)
    logits[..., ABSENT] = torch.tensor([[5.0, -5.0, 0.0, -3.0, 9.0], [-9.0, -9.0, -9.0, -9.0, -9.0]])
    logits[..., 1] = 1.0  # carbon is the most likely real type everywhere
    decoded = torch.cat([logits, torch.randn(2, 5, 3)], -1)
    t, x, m = slots_to_atoms(decoded)
    assert m.sum(1).tolist() == [3, 5]  # slots 1, 2 and 3 beat "absent" in molecule 0
    t, x, m = slots_to_atoms(decoded, sizes=torch.tensor([3, 1]))
    assert m.sum(1).tolist() == [3, 1]
    assert (t[m] == 1).all()
    # the three least-absent slots of molecule 0 are 1, 3, 2 (kept in slot order, left-aligned)
    assert torch.allclose(x[0, :3], decoded[0, [1, 2, 3], NUM_CLASSES:])


# ---------------------------------------------------------------------------------------------
# The recipe of the measurement in docs/MOLECULES.md: a reconstruction-only warm start (100 steps,
# loss.flow_warmup_steps), then the full UNITE objective (reconstruction + flow, w_gen 1) up to step 500. Measured with
# 1 thread (about 30 s on a quiet machine): 100 % match and mean RMSD 0.031 / 0.083 A (seeds 0 / 1),
# 100 % / 0.050 A without the warm start. At 300 steps the outcome was still on the cliff of the
# 0.5 A match threshold (6 % to 100 % depending on threads, warm start and summation order), so the
# test trains past it; the bounds leave a margin below every run seen.
MIN_MATCH = 75.0
MAX_RMSD = 0.25


@pytest.mark.slow
def test_short_training_learns_a_handful_of_molecules(mols):
    train = {"steps": 500, "batch_size": 16, "warmup_steps": 20, "lr": 3e-3, "lr_min": 1e-5,
             "optimizer": "muon_adamw", "ema_decay": 0.99, "log_every": 50, "eval_every": 500}
    cfg = _cfg(train=train, loss={"flow_warmup_steps": 100})  # reconstruction alone up to step 100
    ds = MoleculeDataset(mols.train.types[:16], mols.train.coords[:16], mols.train.mask[:16])
    trainer = Trainer(cfg, mols.info, ds, val_set=ds)
    trainer.model.modality.augment = lambda obs, generator=None: obs  # memorisation check: fixed orientation
    first = trainer.train_step()
    assert "flow" not in first
    result = trainer.run()
    last = result.history[-1]
    assert result.step == 500
    assert last["recon"] < 0.05 * first["recon"]
    assert math.isfinite(last["flow"]) and last["flow"] > 0.01  # the latents did not collapse
    r = reconstruct_dataset(trainer.model, ds, cfg)
    assert r["recon_match_rate"] >= MIN_MATCH, r
    assert r["recon_rmsd"] < MAX_RMSD, r


def test_evaluate_and_write_samples(mols, tmp_path):
    cfg = _cfg()
    model = wake(UNITE(cfg, mols.info)).eval()
    res = evaluate_molecules(model, mols, cfg, n_samples=6)
    for key in ("recon_match_rate", "validity", "uniqueness", "novelty", "atom_stability",
                "molecule_stability", "size_tv_distance", "gen_size_mean", "sample_seconds"):
        assert key in res and isinstance(res[key], float)
    assert res["num_samples"] == 6
    assert 0 <= res["size_tv_distance"] <= 1
    hist = evaluate_molecules(model, mols, cfg, n_samples=6, size_mode="histogram")
    assert hist["size_histogram_mode"] == 1.0 and hist["gen_empty"] == 0.0

    paths = write_samples(model, 5, tmp_path / "s", cfg)
    supplier = Chem.SDMolSupplier(paths["sdf"], removeHs=False, sanitize=False)
    read = [m for m in supplier]
    assert len(read) == 5 and all(m is not None for m in read)
    assert [m.GetProp("_Name") for m in read] == [f"sample_{i}" for i in range(5)]
    from PIL import Image

    with Image.open(paths["png"]) as img:
        assert img.size[0] > 100 and img.size[1] > 100
