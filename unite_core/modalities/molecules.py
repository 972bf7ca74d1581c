"""Molecules as a UNITE modality: atoms are tokens, a set decoder predicts atoms back.

The model side of the modality "molecules" (``unite_core.modalities.MODALITIES``): embedding,
decoder, loss, the data hooks (``unpack``, ``augment``) and the reconstruction metrics. Sampling,
evaluation and the sample files are in ``unite_core.eval_molecules``; the token format is
``unite_core.atoms``.

Tokenization. ``AtomEmbed`` turns each atom into one GE token: an embedding of its type (H, C, N, O,
F) plus a linear map of its Cartesian coordinates (computed in fp32). Every atom gets rotary
position 0 (no rotation) and no absolute position, padding is masked out of attention, so the
Generative Encoder is permutation-invariant over atoms: the latents z0 do not depend on the order in
which the atoms are listed. The embedding is not rotation-equivariant; random rotations about the
centre of mass (which is the origin) are the training augmentation instead (``augment``, drawn from
the step's generator).

Decoding. ``AtomDecoder`` is a small ViT over the K latent tokens plus ``max_atoms`` learned slot
queries (as ``unite_core.decoder.PixelDecoder`` does with patch queries). Each slot predicts logits
over the 5 atom types plus an extra "absent" class, and 3-D coordinates. The decoder's output is one
tensor (B, max_atoms, 6 + 3): logits first, coordinates last.

Loss: a set loss. Because z0 is permutation-invariant, the decoder cannot know the order of the
atoms in the file (heavy atoms in canonical SMILES order, hydrogens after their parents; symmetric
atoms such as the three H of a methyl in arbitrary order). Slots are therefore matched to atoms per
molecule with the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on the cost
``-log p(type) + coord_weight_match * |x_slot - x_atom|^2``; matched slots get the cross-entropy of
the atom's type and the squared coordinate error, unmatched slots the cross-entropy of "absent".
``assignment="index"`` (slot i <-> atom i, the token-aligned alternative) is kept for comparison;
docs/MOLECULES.md has the measurement that decided for matching.

Reconstruction metrics align the predicted atoms to the input atoms the same way (Hungarian on type
mismatch + distance, in the input's frame; the encoder is not invariant to rotations, so the
reconstruction comes back in the input's frame), then use
``unite_core.metrics.molecule_metrics.reconstruction_metrics`` (match: same atoms and Kabsch RMSD below
0.5 A).

Generation: the number of atoms of a generated molecule is the number of slots whose most likely
class is not "absent" (``size_mode="decoder"``, the default). ``size_mode="histogram"`` instead
draws the size from the training set's size histogram and keeps the slots least likely to be
absent; ``unite_core.eval_molecules.evaluate_molecules`` reports the generated size distribution against the data's for
either.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..atoms import ATOM_MASSES, ATOM_TYPES, PAD_TYPE, random_rotation
from ..config import Config
from ..nn import ViTBlock, sincos_1d

NUM_TYPES = len(ATOM_TYPES)  # 5: H C N O F
ABSENT = NUM_TYPES  # the extra decoder class of an empty slot
NUM_CLASSES = NUM_TYPES + 1
OUT_DIM = NUM_CLASSES + 3  # logits, then x y z

# Loss weights (per-slot cross-entropy in nats; squared coordinate error in A^2 per atom).
COORD_WEIGHT = 1.0
# Matching cost weight of the squared distance against -log p(type).
COORD_WEIGHT_MATCH = 1.0
# Random Fourier features of the coordinates in the atom embedding (0 = linear map only).
FOURIER_FEATURES = 0
FOURIER_SCALE = 0.5  # cycles per Angstrom (std of the random frequencies)
# Orientation the model sees: "random" (random rotations as training augmentation) or
# "principal" (every molecule rotated into its principal axes, no augmentation).
FRAME = "principal"
# Cost of a type mismatch when aligning reconstructed atoms to the input (A^2 equivalent).
TYPE_MISMATCH_COST = 1.0e4


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class AtomEmbed(nn.Module):
    """Atoms -> GE tokens: (tokens (B, N, width), rope positions (N,) all 0, mask (B, N)).

    token = type embedding + linear(xyz) [+ linear(Fourier features of xyz)]. The optional random
    Fourier features (sin/cos of fixed random projections, ``fourier_scale`` cycles per Angstrom)
    let attention pick atoms by where they are, not only by how far they lie along one direction.
    """

    def __init__(self, width: int, num_types: int = NUM_TYPES, fourier_features: int = FOURIER_FEATURES,
                 fourier_scale: float = FOURIER_SCALE):
        super().__init__()
        self.type_embed = nn.Embedding(num_types, width)
        self.coord_proj = nn.Linear(3, width)
        self.fourier_features = fourier_features
        if fourier_features:
            self.register_buffer("fourier_freqs", torch.randn(3, fourier_features) * fourier_scale)
            self.fourier_proj = nn.Linear(2 * fourier_features, width)

    def forward(self, obs: dict[str, torch.Tensor]):
        types, coords, mask = obs["types"], obs["coords"], obs["mask"].bool()
        with torch.autocast(coords.device.type, enabled=False):  # keep coordinate precision
            x = coords.float()
            tokens = self.type_embed(types.clamp_min(0)) + self.coord_proj(x)
            if self.fourier_features:
                ang = 2 * math.pi * (x @ self.fourier_freqs)
                tokens = tokens + self.fourier_proj(torch.cat([ang.sin(), ang.cos()], dim=-1))
        tokens = tokens * mask[..., None].to(tokens.dtype)
        positions = torch.zeros(types.shape[1], dtype=torch.long, device=types.device)
        return tokens, positions, mask


class AtomDecoder(nn.Module):
    """Latents (B, K, d) -> per-slot (type logits incl. absent, xyz): (B, max_atoms, 9)."""

    def __init__(
        self,
        *,
        latent_dim: int,
        latent_tokens: int,
        max_atoms: int,
        depth: int,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.max_atoms = max_atoms
        self.latent_in = nn.Linear(latent_dim, width)
        self.latent_pos = nn.Parameter(sincos_1d(latent_tokens, width).clone())
        # one learned query per slot; distinct at init so that matching can tell them apart
        self.slot_query = nn.Parameter(torch.randn(max_atoms, width) * 0.02)
        self.blocks = nn.ModuleList([ViTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, OUT_DIM)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, K, _ = z.shape
        lat = self.latent_in(z) + self.latent_pos[None, :K].to(z.dtype)
        q = self.slot_query[None].expand(B, -1, -1).to(lat.dtype)
        x = torch.cat([q, lat], dim=1)
        for block in self.blocks:
            x = block(x)
        h = self.norm(x[:, : self.max_atoms])
        with torch.autocast(z.device.type, enabled=False):  # coordinates in fp32
            return self.head(h.float())


def principal_frame(types: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rotate each molecule (already centred at its centre of mass) into its principal axes.

    Axes are the eigenvectors of the mass-weighted second-moment matrix, largest spread first; the
    sign of the first two axes makes the mass-weighted third moment along them non-negative and the
    third axis completes a right-handed frame, so the result is a proper rotation of the input and
    the same for any rotated copy of it (up to ties in the spread or zero third moments, e.g. for
    highly symmetric molecules). Padding stays zero.
    """
    m = mask.bool()
    masses = torch.tensor(ATOM_MASSES, dtype=torch.float64, device=coords.device)[types.clamp_min(0)]
    w = masses * m
    x = coords.double() * m[..., None]
    cov = torch.einsum("bn,bni,bnj->bij", w, x, x)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    axes = vecs.flip(-1)  # columns: largest spread first
    proj = x @ axes
    third = (w[..., None] * proj.pow(3)).sum(1)  # (B, 3)
    sign = torch.where(third < 0, -1.0, 1.0).to(axes.dtype)
    sign[:, 2] = 1.0
    axes = axes * sign[:, None, :]
    det = torch.linalg.det(axes)
    axes[..., 2] = axes[..., 2] * torch.where(det < 0, -1.0, 1.0).to(axes.dtype)[:, None]
    out = (x @ axes) * m[..., None]
    return out.to(coords.dtype)


# ----------------------------------------------------------------------------------------------
# Matching and decoding helpers
# ----------------------------------------------------------------------------------------------
def split_output(decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, 9) decoder output -> (logits (B, S, 6), coords (B, S, 3)), both fp32."""
    decoded = decoded.float()
    return decoded[..., :NUM_CLASSES], decoded[..., NUM_CLASSES:]


@torch.no_grad()
def match_slots(
    logits: torch.Tensor, coords: torch.Tensor, types: torch.Tensor, target: torch.Tensor,
    mask: torch.Tensor, coord_weight: float = COORD_WEIGHT_MATCH,
) -> torch.Tensor:
    """Hungarian assignment of decoder slots to real atoms.

    logits (B, S, C), coords (B, S, 3): decoder slots; types (B, N), target (B, N, 3), mask (B, N):
    the molecule. Returns (B, N) long: the slot assigned to each real atom, -1 for padding.
    Cost of slot s for atom j: -log p_s(type_j) + coord_weight * |x_s - x_j|^2.
    """
    B, S, _ = logits.shape
    N = types.shape[1]
    logp = F.log_softmax(logits.float(), dim=-1)
    t = types.clamp_min(0)
    type_cost = -logp.gather(2, t[:, None, :].expand(B, S, N))
    dist = torch.cdist(coords.float(), target.float()).pow(2)
    cost = (type_cost + coord_weight * dist).cpu().numpy()
    mask_np = mask.bool().cpu().numpy()
    out = np.full((B, N), -1, dtype=np.int64)
    for b in range(B):
        atoms = np.flatnonzero(mask_np[b])
        if len(atoms) == 0:
            continue
        if len(atoms) > S:
            raise ValueError(f"molecule {b} has {len(atoms)} atoms but the decoder only {S} slots")
        rows, cols = linear_sum_assignment(cost[b][:, atoms])  # rows: slots, cols: atoms
        out[b, atoms[cols]] = rows
    return torch.from_numpy(out).to(types.device)


def slot_targets(assign: torch.Tensor, types: torch.Tensor, target: torch.Tensor, num_slots: int):
    """Per-slot target type (ABSENT where unmatched), coordinates and matched flag."""
    B, N = types.shape
    dev = types.device
    tgt_type = torch.full((B, num_slots), ABSENT, dtype=torch.long, device=dev)
    tgt_xyz = torch.zeros(B, num_slots, 3, dtype=torch.float32, device=dev)
    matched = torch.zeros(B, num_slots, dtype=torch.bool, device=dev)
    b_idx, a_idx = torch.nonzero(assign >= 0, as_tuple=True)
    s_idx = assign[b_idx, a_idx]
    tgt_type[b_idx, s_idx] = types[b_idx, a_idx]
    tgt_xyz[b_idx, s_idx] = target[b_idx, a_idx].float()
    matched[b_idx, s_idx] = True
    return tgt_type, tgt_xyz, matched


def slots_to_atoms(
    decoded: torch.Tensor, sizes: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder output -> (types (B, S) with PAD_TYPE, coords (B, S, 3), mask (B, S)), left-aligned.

    Without ``sizes``, a slot holds an atom when its most likely class is not "absent". With
    ``sizes`` (B,), the ``sizes[b]`` slots with the lowest probability of "absent" hold atoms,
    typed by their most likely real class.
    """
    logits, coords = split_output(decoded)
    B, S, _ = logits.shape
    if sizes is None:
        cls = logits.argmax(-1)
        present = cls != ABSENT
        types = cls
    else:
        p_absent = logits.softmax(-1)[..., ABSENT]
        order = p_absent.argsort(dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(S, device=order.device).expand(B, S))
        present = rank < sizes.to(order.device).clamp(0, S)[:, None]
        types = logits[..., :NUM_TYPES].argmax(-1)
    # left-align: real atoms first (in slot order), then padding
    key = (~present).long() * S + torch.arange(S, device=present.device)[None]
    perm = key.argsort(dim=1)
    present = present.gather(1, perm)
    types = torch.where(present, types.gather(1, perm), torch.full_like(types, PAD_TYPE))
    coords = coords.gather(1, perm[..., None].expand(B, S, 3)) * present[..., None]
    return types, coords, present


def align_to_reference(
    true_types: np.ndarray, true_coords: np.ndarray, true_mask: np.ndarray,
    pred_types: np.ndarray, pred_coords: np.ndarray, pred_mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder predicted atoms so that token i corresponds to input atom i (batched numpy arrays).

    Per molecule with the same number of atoms, a Hungarian assignment on
    TYPE_MISMATCH_COST * [types differ] + squared distance (the reconstruction lives in the input's
    frame). A molecule with a different number of atoms keeps its predicted (left-aligned) layout,
    so its mask differs from the input's and it cannot match.
    """
    at, ax, am = pred_types.copy(), pred_coords.copy(), pred_mask.copy()
    for b in range(true_types.shape[0]):
        ti = np.flatnonzero(true_mask[b])
        pi = np.flatnonzero(pred_mask[b])
        if len(ti) != len(pi) or len(ti) == 0:
            continue
        d = ((true_coords[b][ti][:, None, :] - pred_coords[b][pi][None, :, :]) ** 2).sum(-1)
        d = d + TYPE_MISMATCH_COST * (true_types[b][ti][:, None] != pred_types[b][pi][None, :])
        rows, cols = linear_sum_assignment(d)
        at[b] = PAD_TYPE
        ax[b] = 0.0
        am[b] = False
        at[b, ti[rows]] = pred_types[b, pi[cols]]
        ax[b, ti[rows]] = pred_coords[b, pi[cols]]
        am[b, ti[rows]] = True
    return at, ax, am


# ----------------------------------------------------------------------------------------------
# The modality
# ----------------------------------------------------------------------------------------------
class MoleculeModality:
    name = "molecules"

    def __init__(self, cfg: Config, info: dict, *, assignment: str = "hungarian",
                 coord_weight: float = COORD_WEIGHT, size_mode: str = "decoder", frame: Optional[str] = None,
                 fourier_features: Optional[int] = None):
        frame = FRAME if frame is None else frame
        fourier_features = FOURIER_FEATURES if fourier_features is None else fourier_features
        if cfg.loss.w_perc > 0:
            raise ValueError(
                f"loss.w_perc={cfg.loss.w_perc}: molecules have no perceptual loss; set loss.w_perc=0"
            )
        if assignment not in ("hungarian", "index"):
            raise ValueError(f"assignment={assignment!r}: use 'hungarian' or 'index'")
        if frame not in ("random", "principal"):
            raise ValueError(f"frame={frame!r}: use 'random' or 'principal'")
        if size_mode not in ("decoder", "histogram"):
            raise ValueError(f"size_mode={size_mode!r}: use 'decoder' or 'histogram'")
        self.cfg = cfg
        self.max_atoms = int(info.get("max_atoms", cfg.data.max_atoms))
        hist = info.get("size_histogram") or {}
        self.size_histogram = {int(k): int(v) for k, v in hist.items()}
        self.assignment = assignment
        self.coord_weight = coord_weight
        self.size_mode = size_mode
        self.frame = frame
        self.fourier_features = fourier_features
        self.perceptual = None

    # -- construction ----------------------------------------------------------------------------
    def make_embed(self, width: int) -> nn.Module:
        return AtomEmbed(width, fourier_features=self.fourier_features)

    def make_decoder(self) -> nn.Module:
        m = self.cfg.model
        depth, width, heads = m.decoder_dims()
        return AtomDecoder(
            latent_dim=m.latent_dim, latent_tokens=m.latent_tokens, max_atoms=self.max_atoms,
            depth=depth, width=width, heads=heads, mlp_ratio=m.decoder_mlp_ratio,
        )

    # -- data ------------------------------------------------------------------------------------
    def unpack(self, batch):
        obs = {"types": batch["types"], "coords": batch["coords"], "mask": batch["mask"].bool()}
        if self.frame == "principal":
            obs["coords"] = principal_frame(obs["types"], obs["coords"], obs["mask"])
        y = batch.get("y")
        if y is None:
            y = torch.zeros(obs["types"].shape[0], dtype=torch.long, device=obs["types"].device)
        return obs, y

    def augment(self, obs, generator: Optional[torch.Generator] = None):
        """Training augmentation: a uniformly random rotation per molecule about its centre of mass
        (frame "random"; in the principal frame, orientation is fixed and nothing is augmented)."""
        if self.frame == "principal":
            return obs
        out = dict(obs)
        out["coords"] = random_rotation(obs["coords"].float(), obs["mask"], generator)
        return out

    def batch_size(self, obs) -> int:
        return int(obs["types"].shape[0])

    # -- losses and metrics ----------------------------------------------------------------------
    def assign(self, decoded, obs) -> torch.Tensor:
        types, coords, mask = obs["types"], obs["coords"], obs["mask"].bool()
        if self.assignment == "index":
            idx = torch.arange(types.shape[1], device=types.device).expand_as(types)
            return torch.where(mask, idx, torch.full_like(idx, -1))
        logits, xyz = split_output(decoded)
        return match_slots(logits, xyz, types, coords, mask)

    def recon_loss(self, decoded, obs):
        logits, xyz = split_output(decoded)
        S = logits.shape[1]
        assign = self.assign(decoded, obs)
        tgt_type, tgt_xyz, matched = slot_targets(assign, obs["types"], obs["coords"], S)
        ce = F.cross_entropy(logits.reshape(-1, NUM_CLASSES), tgt_type.reshape(-1))
        sq = (xyz - tgt_xyz).pow(2).sum(-1)
        n_atoms = matched.sum().clamp_min(1)
        coord_sq = (sq * matched).sum() / n_atoms
        loss = ce + self.coord_weight * coord_sq
        with torch.no_grad():
            pred = logits.argmax(-1)
            metrics = {
                "type_ce": ce.detach(),
                "coord_mse": coord_sq.detach(),
                "slot_accuracy": (pred == tgt_type).float().mean(),
            }
        return loss, metrics

    def decoded_atoms(self, decoded, sizes: Optional[torch.Tensor] = None):
        return slots_to_atoms(decoded, sizes)

    def recon_metrics(self, decoded, obs) -> dict[str, float]:
        # lazy: the metrics module imports RDKit, which training and sampling never need
        from ..metrics.molecule_metrics import reconstruction_metrics  # heavy optional dependency

        types, coords, mask = slots_to_atoms(decoded.detach())
        tt = obs["types"].cpu().numpy()
        tx = obs["coords"].float().cpu().numpy().astype(np.float64)
        tm = obs["mask"].bool().cpu().numpy()
        pt, px, pm = align_to_reference(
            tt, tx, tm, types.cpu().numpy(), coords.cpu().numpy().astype(np.float64), mask.cpu().numpy()
        )
        r = reconstruction_metrics(tt, tx, tm, pt, px, pm)
        out = {
            "match_rate": r["match_rate"],
            "type_accuracy": r["type_accuracy"],
            "size_accuracy": 100.0 * float((tm.sum(1) == pm.sum(1)).mean()),
        }
        # RMSDs are undefined when no molecule qualifies; leave them out rather than report nan
        if math.isfinite(r["rmsd_mean"]):
            out["rmsd"] = r["rmsd_mean"]
        if math.isfinite(r["rmsd_mean_all"]):
            out["rmsd_all"] = r["rmsd_mean_all"]
        return out

    def postprocess(self, decoded, labels=None, sizes: Optional[torch.Tensor] = None, **_):
        """Per molecule (types int64 (S,), coords float32 (S, 3), mask bool (S,)); absent slots
        are masked (PAD_TYPE, zero coordinates) and real atoms come first."""
        types, coords, mask = slots_to_atoms(decoded.detach(), sizes)
        t, x, m = types.cpu().numpy(), coords.float().cpu().numpy(), mask.cpu().numpy()
        return [(t[i], x[i], m[i]) for i in range(t.shape[0])]

    # -- sizes -------------------------------------------------------------------------------------
    def sample_sizes(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Atom counts drawn from the training set's size histogram."""
        if not self.size_histogram:
            raise ValueError("info has no size_histogram: cannot sample molecule sizes from the data")
        sizes = torch.tensor(sorted(self.size_histogram), dtype=torch.long)
        counts = torch.tensor([self.size_histogram[int(s)] for s in sizes], dtype=torch.float64)
        gen = generator if generator is not None and generator.device.type == "cpu" else None
        idx = torch.multinomial(counts, n, replacement=True, generator=gen)
        return sizes[idx]


__all__ = [
    "ABSENT", "NUM_CLASSES", "AtomEmbed", "AtomDecoder", "MoleculeModality", "match_slots",
    "slot_targets", "slots_to_atoms", "align_to_reference", "principal_frame",
]
