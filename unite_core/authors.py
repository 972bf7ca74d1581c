"""Import the authors' released UNITE checkpoints (UNITE-B, UNITE-L) into this project's format.

The authors publish .pt files holding `model` and `ema` state_dicts of their UNITE module, the AdamW
and Muon optimiser states (`optimizer`, `optimizer_muon`), their schedulers, `step` and `epoch`.
This module maps every tensor onto this project's modules (the architecture follows theirs detail for
detail: unite_core/nn.py, encoder.py, decoder.py), reads the model's sizes from the shapes, and writes
an ordinary project checkpoint plus the params that describe it, so that `unite sample`, `evaluate`,
`analyze` and a resumed `unite train` use it as one of their own.

What does not carry over, and why:
- `encoder.pos_embed` and `encoder.t_embedder.special_time_emb`: present in their state_dict, never
  used by their forward pass;
- the label table's last row (index num_classes + 1): never indexed by their forward pass;
- the rotary tables `encoder.feat_rope*.freqs_*`: recomputed; the import checks they are the standard
  ones and refuses a checkpoint whose tables differ;
- `lpips_loss.*` (their perceptual loss, frozen): written to a separate weights file for
  `loss.perceptual_weights` when it has the usual LPIPS layout (VGG16 + five linear heads).
- Their schedulers' states: the written params carry their two-phase schedule, and the step count
  places a resumed run on it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, config_from_dict
from .nn import rope_tables
from .io import atomic_write_text
from .model import UNITE
from .train import CHECKPOINT_FORMAT, CheckpointError, build_optimizers, save_checkpoint

log = logging.getLogger(__name__)

# Their size tables: heads are not visible in the weights, so they come from the width.
ENCODER_HEADS = {768: 12, 1024: 16, 1152: 16}
DECODER_HEADS = {384: 6, 768: 12, 1024: 16}
NAMED_GE = {(12, 768): "B", (12, 1024): "M", (24, 1024): "L", (28, 1152): "XL"}
NAMED_DECODER = {(12, 384): "S", (12, 768): "B", (24, 1024): "L"}
# Released checkpoints were trained with 14 flow noisings per reconstruction step, 4 per forward pass.
RELEASED_FLOW_NOISINGS = 14
RELEASED_FLOW_CHUNK = 4
IMAGENET_TRAIN_IMAGES = 1_281_167

# Parameters of their model that the optimisers never see (requires_grad=False) and buffers.
_FROZEN = {"encoder.pos_embed", "encoder.t_embedder.W", "patch_embed.position_embeddings", "decoder.decoder_pos_embed"}
_UNUSED = {"encoder.pos_embed", "encoder.t_embedder.special_time_emb"}


class AuthorsCheckpointError(CheckpointError):
    """A file that is not an authors' UNITE checkpoint this importer understands."""


@dataclass
class ImportResult:
    checkpoint: Path
    params: Path
    perceptual: Path | None
    config: Config
    step: int
    dropped: list[str] = field(default_factory=list)
    optimizer_state: bool = False

    def describe(self, source: Path) -> str:
        """What was imported and the commands that use it (`unite import-checkpoint` prints it)."""
        m = self.config.model
        (depth, width, _), (ddepth, dwidth, _) = m.ge_dims(), m.decoder_dims()
        optimizer = "imported" if self.optimizer_state else "not present: a resumed run starts its optimisers fresh"
        perceptual = f"; perceptual-loss weights: {self.perceptual}" if self.perceptual else ""
        return "\n".join([
            f"imported {source} (step {self.step}) -> {self.checkpoint}",
            f"  model: GE {depth} x {width}, decoder {ddepth} x {dwidth}, K={m.latent_tokens} x d={m.latent_dim}, "
            f"{self.config.data.image_size}px, patch {m.patch_size}; optimiser state {optimizer}",
            f"  params: {self.params}{perceptual}",
            f"  next:   unite sample -c {self.checkpoint} -p {self.params}",
            f"          unite evaluate -c {self.checkpoint} -p {self.params}   (after setting data.root)",
            f"          unite train -p {self.params}   (continues training from the imported state)",
        ])


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def clean_keys(sd: dict) -> dict:
    """Strip DDP's `module.` prefix and torch.compile's `_orig_mod.` segments."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.").replace("._orig_mod.", ".").removeprefix("_orig_mod.")
        out[k] = v
    return out


def read_authors_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AuthorsCheckpointError(f"'{path}' does not exist: pass the path of a released UNITE .pt file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file gets the same one-line message
        kind = type(exc).__name__
        raise AuthorsCheckpointError(
            f"'{path}' cannot be read as a checkpoint ({kind}): it is truncated, corrupt, or holds objects "
            "other than tensors (loaded with weights_only=True); download it again"
        ) from None
    if isinstance(raw, dict) and str(raw.get("format", "")).startswith("unite-checkpoint"):
        raise AuthorsCheckpointError(
            f"'{path}' is already a unite checkpoint: use it directly (unite sample/evaluate -c {path})"
        )
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise AuthorsCheckpointError(f"'{path}' is not an authors' UNITE checkpoint (no 'model' state_dict)")
    model = clean_keys(raw["model"])
    required = ("latent_tokens", "encoder.up_sample.weight", "encoder.final_layer.linear.weight",
                "decoder.decoder_embed.weight", "up_sample_decoder.weight", "patch_embed.patch_embeddings.projection.weight")
    missing = [k for k in required if k not in model]
    if missing:
        raise AuthorsCheckpointError(
            f"'{path}' is not an authors' UNITE checkpoint: its model lacks {missing[0]}"
            + (f" (and {len(missing) - 1} more keys)" if len(missing) > 1 else "")
        )
    raw["model"] = model
    if isinstance(raw.get("ema"), dict):
        raw["ema"] = clean_keys(raw["ema"])
    return raw


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


# ----------------------------------------------------------------------------------------------
# The configuration the weights imply
# ----------------------------------------------------------------------------------------------
def authors_params(sd: dict, *, in_context_start: int = 4, data_root: str | None = None,
                   perceptual_weights: str | None = None, step: int = 0, epochs: int | None = None) -> dict:
    """Params (a params.yaml mapping) for the model whose authors' state_dict is `sd`: sizes from the
    shapes, the rest from the authors' ImageNet recipe as the released models were trained (M=14)."""
    _, K, width = sd["latent_tokens"].shape
    latent_dim = sd["encoder.up_sample.weight"].shape[1]
    depth = _count(sd, r"^encoder\.blocks\.(\d+)\.")
    proj = sd["patch_embed.patch_embeddings.projection.weight"]
    channels, patch = proj.shape[1], proj.shape[2]
    n_patches = sd["patch_embed.position_embeddings"].shape[1] - 1 if "patch_embed.position_embeddings" in sd else K
    image_size = math.isqrt(n_patches) * patch
    num_classes = sd["encoder.y_embedder.embedding_table.weight"].shape[0] - 2
    ctx = sd["encoder.in_context_posemb"].shape[1] if "encoder.in_context_posemb" in sd else 0
    qk_norm = "encoder.blocks.0.attn.q_norm.weight" in sd
    dec_width, dec_latent = sd["decoder.decoder_embed.weight"].shape
    dec_depth = _count(sd, r"^decoder\.decoder_layers\.(\d+)\.")
    dec_mlp = sd["decoder.decoder_layers.0.ffn_up.weight"].shape[0] / dec_width if dec_depth else 4.0
    if width not in ENCODER_HEADS or dec_width not in DECODER_HEADS:
        raise AuthorsCheckpointError(
            f"widths {width} (GE) / {dec_width} (decoder) are none of the authors' sizes "
            f"({sorted(ENCODER_HEADS)} / {sorted(DECODER_HEADS)}): not a released UNITE checkpoint"
        )
    pos = sd.get("patch_embed.position_embeddings")
    patch_table = bool(pos is not None and pos.abs().max() > 0)
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // 1024
    total = (epochs or 240) * steps_per_epoch
    ge_name = NAMED_GE.get((depth, width), "custom")
    dec_name = NAMED_DECODER.get((dec_depth, dec_width), "custom")
    return {
        "modality": "images",
        "data": {"dataset": "imagefolder", "root": data_root or "/path/to/imagenet/train", "image_size": image_size,
                 "val_fraction": 0.01, "split_seed": 0, "flip": True, "on_corrupt": "stop"},
        "model": {
            "ge_size": ge_name, "ge_depth": depth, "ge_width": width, "ge_heads": ENCODER_HEADS[width],
            "decoder_size": dec_name, "decoder_depth": dec_depth, "decoder_width": dec_width,
            "decoder_heads": DECODER_HEADS[dec_width], "decoder_mlp_ratio": dec_mlp,
            "patch_size": patch, "latent_tokens": K, "latent_dim": latent_dim,
            "in_context_tokens": ctx, "in_context_start": in_context_start if ctx else depth,
            "final_norm": "layernorm_affine", "block_norm": True, "qk_norm": qk_norm, "rope": True,
            "weight_sharing": "shared", "label_dropout": 0.1, "fourier_scale": 1.0,
            "decoder_kind": "patch_tokens", "decoder_latent_width": dec_latent, "pixel_range": "unit",
            "register_pos_scale": 1.0, "latent_out_init": "zero", "patch_pos_table": patch_table,
        },
        "flow": {"minibatches": RELEASED_FLOW_NOISINGS, "t_mu": 0.0, "t_sigma": 1.0, "shift": 0.5,
                 "tokenize_t_max": 0.01, "velocity_clamp": 0.05, "stop_grad": True, "loss_space": "velocity",
                 "reduction": "sum", "chunk_size": RELEASED_FLOW_CHUNK},
        "loss": {"recon": "l1", "w_gen": 1.0, "w_perc": 1.0 if perceptual_weights else 0.0,
                 "perceptual_weights": perceptual_weights, "decoder_noise": True, "decoder_noise_start": 0.7,
                 "decoder_noise_prob": 0.5, "recon_only": False, "flow_warmup_steps": 0},
        "train": {"steps": max(total, step + 1), "batch_size": 1024, "grad_accum": 1, "optimizer": "muon_adamw",
                  "lr": 1.0e-4, "lr_batch_base": 384, "lr_min": 1.0e-5, "warmup_steps": 20 * steps_per_epoch,
                  "schedule": "two_phase",
                  "two_phase": {"hold_until": 30 * steps_per_epoch, "decay_until": 50 * steps_per_epoch,
                                "lr2": 5.0e-5, "hold2_until": max(total, step + 1), "decay2_until": max(total, step + 1)},
                  "betas": [0.9, 0.999], "eps": 1.0e-6, "muon_momentum": 0.95, "weight_decay": 0.0,
                  "grad_clip": 3.0, "ema_decay": 0.9978, "ema_warmup": False, "checkpoint_denoiser": True,
                  "precision": "bf16", "seed": 0, "device": "auto", "checkpoint_every": 2500, "log_every": 100,
                  "eval_every": 2500},
        "sample": {"solver": "dopri5", "steps": 50, "rtol": 1.0e-3, "atol": 1.0e-6, "cfg_scale": 2.0,
                   "cfg_interval": [0.1, 1.0], "cfg_interval_open": True, "norm_first": True,
                   "norm_unguided": False, "shifted_grid": True, "final_norm": False, "class_balanced": True,
                   "num_samples": 100, "use_ema": True, "seed": 0},
        "eval": {"num_samples": 50000, "batch_size": 250, "feature_extractor": "own",
                 "cfg_scales": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]},
        "distributed": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8.0, "max_failures": 3},
        "tracking": {"experiment": "unite-imagenet", "enabled": True},
    }


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
_DECODER_LAYER = {"layernorm_before": "norm1", "qkv": "attn.qkv", "attn_proj": "attn.proj",
                  "layernorm_after": "norm2", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "norm3": "block_norm", "attn.qkv": "attn.qkv",
          "attn.q_norm": "attn.q_norm", "attn.k_norm": "attn.k_norm", "attn.proj": "attn.proj",
          "mlp.w12": "mlp.w12", "mlp.w3": "mlp.w3", "adaLN_modulation.1": "ada"}
_FIXED = {
    "latent_tokens": "encoder.latent_pos",
    "patch_embed.patch_embeddings.projection.weight": "encoder.embed.proj.weight",
    "patch_embed.patch_embeddings.projection.bias": "encoder.embed.proj.bias",
    "patch_embed.position_embeddings": "encoder.embed.pos",
    "encoder.in_context_posemb": "encoder.in_context_pos",
    "encoder.up_sample.weight": "encoder.latent_in.weight",
    "encoder.up_sample.bias": "encoder.latent_in.bias",
    "encoder.t_embedder.W": "encoder.t_embed.freqs",
    "encoder.y_embedder.embedding_table.weight": "encoder.y_embed.weight",
    "encoder.final_layer.norm_final.weight": "encoder.out_norm.weight",
    "encoder.final_layer.linear.weight": "encoder.out_proj.weight",
    "encoder.final_layer.linear.bias": "encoder.out_proj.bias",
    "encoder.final_layer.adaLN_modulation.1.weight": "encoder.out_ada.weight",
    "encoder.final_layer.adaLN_modulation.1.bias": "encoder.out_ada.bias",
    "encoder_layer_norm.weight": "encoder.final_norm.weight",
    "encoder_layer_norm.bias": "encoder.final_norm.bias",
    "up_sample_decoder.weight": "decoder.latent_up.weight",
    "up_sample_decoder.bias": "decoder.latent_up.bias",
    "decoder.decoder_embed.weight": "decoder.latent_in.weight",
    "decoder.decoder_embed.bias": "decoder.latent_in.bias",
    "decoder.decoder_pos_embed": "decoder.pos",
    "decoder.trainable_cls_token": "decoder.cls",
    "decoder.decoder_norm.weight": "decoder.norm.weight",
    "decoder.decoder_norm.bias": "decoder.norm.bias",
    "decoder.decoder_pred.weight": "decoder.head.weight",
    "decoder.decoder_pred.bias": "decoder.head.bias",
}


def project_name(key: str) -> str | None:
    """This project's name for an authors' tensor; None for tensors that do not carry over."""
    if key in _FIXED:
        return _FIXED[key]
    m = re.match(r"^encoder\.t_embedder\.mlp\.([02])\.(weight|bias)$", key)
    if m:
        return f"encoder.t_embed.mlp.{m.group(1)}.{m.group(2)}"
    m = re.match(r"^encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m and m.group(2) in _BLOCK:
        return f"encoder.blocks.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    m = re.match(r"^decoder\.decoder_layers\.(\d+)\.(\w+)\.(weight|bias)$", key)
    if m and m.group(2) in _DECODER_LAYER:
        return f"decoder.blocks.{m.group(1)}.{_DECODER_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def convert_tensor(key: str, value: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Their layout -> ours (the same transform applies to optimiser moments of that tensor)."""
    if key == "patch_embed.patch_embeddings.projection.weight":  # conv (W, C, p, p) -> linear over (p, p, C)
        return value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
    if key in ("latent_tokens", "encoder.in_context_posemb", "patch_embed.position_embeddings",
               "decoder.decoder_pos_embed"):
        v = value[0]
        return v[1:] if key == "patch_embed.position_embeddings" else v  # their row 0 is an unused cls slot
    if key == "encoder.y_embedder.embedding_table.weight":
        return value[: num_classes + 1]  # the last row is never indexed
    return value


def _check_rope(sd: dict, head_dim: int, K: int, ctx: int) -> None:
    """Their rotary tables must be the standard ones (positions = sequence index, interleaved pairs)."""
    for key in ("encoder.feat_rope.freqs_cos", "encoder.feat_rope_incontext.freqs_cos"):
        if key not in sd:
            continue
        table = sd[key].float()
        n = table.shape[0]
        pad = ctx if "incontext" in key else 0
        positions = torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(n - pad)])
        cos, sin = rope_tables(positions, head_dim)
        if not (torch.allclose(table, cos.repeat_interleave(2, -1), atol=1e-4)
                and torch.allclose(sd[key.replace("cos", "sin")].float(), sin.repeat_interleave(2, -1), atol=1e-4)):
            raise AuthorsCheckpointError(
                f"the checkpoint's rotary table {key} is not the standard one: this importer cannot map it"
            )


def convert_state_dict(sd: dict, cfg: Config) -> tuple[dict, list[str], dict | None]:
    """(our state_dict, their keys that were dropped, LPIPS weights in loss.perceptual_weights' layout or None)."""
    num_classes = sd["encoder.y_embedder.embedding_table.weight"].shape[0] - 2
    depth, width, heads = cfg.model.ge_dims()
    _check_rope(sd, width // heads, cfg.model.latent_tokens, cfg.model.in_context_tokens)
    ours, dropped, lpips = {}, [], {}
    for key, value in sd.items():
        if key.startswith("lpips_loss."):
            lpips[key.removeprefix("lpips_loss.")] = value
            continue
        name = project_name(key)
        if name is None:
            if key in _UNUSED or key.startswith("encoder.feat_rope"):
                dropped.append(key)
                continue
            raise AuthorsCheckpointError(f"unexpected tensor '{key}' {tuple(value.shape)} in the checkpoint: "
                                         "not a UNITE model this importer knows")
        if name == "encoder.embed.pos" and not cfg.model.patch_pos_table:
            dropped.append(key)  # an all-zero table (their init never fills it): adding it changes nothing
            continue
        ours[name] = convert_tensor(key, value, num_classes).float().contiguous()
    return ours, dropped, _lpips_weights(lpips)


def _lpips_weights(lp: dict) -> dict | None:
    """Their LPIPS module's VGG16 slices and heads -> {features.N.*, lin{i}.weight}; None if absent or unknown."""
    if not lp:
        return None
    out = {}
    for k, v in lp.items():
        m = re.match(r"^net\.slice\d\.(\d+)\.(weight|bias)$", k)
        if m:
            out[f"features.{m.group(1)}.{m.group(2)}"] = v.float()
            continue
        m = re.match(r"^lin(\d)\.model\.1\.weight$", k)
        if m:
            out[f"lin{m.group(1)}.weight"] = v.float()
    convs = sum(1 for k in out if k.startswith("features.") and k.endswith(".weight"))
    heads = sum(1 for k in out if k.startswith("lin"))
    if convs != 13 or heads != 5:
        log.warning("the checkpoint's perceptual-loss weights have an unknown layout (%d convolutions, %d heads): "
                    "not extracted", convs, heads)
        return None
    return out


# ----------------------------------------------------------------------------------------------
# Optimiser state
# ----------------------------------------------------------------------------------------------
def _their_trainable(sd_keys: list[str]) -> list[str]:
    """Their trainable parameters in state_dict order (= named_parameters order), the order in which
    get_learnable_params hands them to AdamW and Muon."""
    return [k for k in sd_keys if not k.startswith("lpips_loss.") and k not in _FROZEN
            and not k.startswith("encoder.feat_rope")]


def convert_optimizers(raw: dict, sd: dict, model: torch.nn.Module, cfg: Config) -> list[dict] | None:
    """Their AdamW + Muon states -> our [Muon, AdamW] state_dicts; None when absent or not mappable."""
    theirs_adamw, theirs_muon = raw.get("optimizer"), raw.get("optimizer_muon")
    if not isinstance(theirs_adamw, dict) or not isinstance(theirs_muon, dict):
        return None
    num_classes = sd["encoder.y_embedder.embedding_table.weight"].shape[0] - 2
    trainable = _their_trainable(list(sd))

    def is_muon(k: str) -> bool:
        excluded = any(s in k for s in ("patch_embed", "final_layer", "in_context_posemb", "latent_tokens"))
        return sd[k].dim() >= 2 and not excluded

    lists = {"muon": [k for k in trainable if is_muon(k)], "adamw": [k for k in trainable if not is_muon(k)]}
    by_name: dict[str, dict] = {}
    for which, opt in (("muon", theirs_muon), ("adamw", theirs_adamw)):
        groups = opt.get("param_groups") or []
        indices = [i for g in groups for i in g.get("params", [])]
        if len(indices) != len(lists[which]):
            log.warning("the checkpoint's %s state covers %d tensors, expected %d: optimiser state not imported",
                        which, len(indices), len(lists[which]))
            return None
        for idx, key in zip(indices, lists[which]):
            state = opt.get("state", {}).get(idx)
            if state:
                by_name[key] = state
    ours = build_optimizers(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    reverse = {project_name(k): k for k in sd if project_name(k)}
    out = []
    for opt in ours:
        sdict = opt.state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]
        new_state = {}
        for idx, p in enumerate(params):
            their = reverse.get(names[id(p)])
            st = by_name.get(their) if their else None
            if not st:
                continue
            conv = {}
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    v = convert_tensor(their, v, num_classes).float().contiguous()
                    if v.shape != p.shape:
                        log.warning("optimiser state of %s has shape %s, expected %s: not imported", their,
                                    tuple(v.shape), tuple(p.shape))
                        return None
                elif torch.is_tensor(v):
                    v = v.float()
                conv[k] = v
            new_state[idx] = conv
        sdict["state"] = new_state
        out.append(sdict)
    return out


# ----------------------------------------------------------------------------------------------
# The whole import
# ----------------------------------------------------------------------------------------------
def import_checkpoint(src: str | Path, out: str | Path, *, in_context_start: int = 4, data_root: str | None = None,
                      epochs: int | None = None) -> ImportResult:
    """Convert the authors' checkpoint `src` into a project checkpoint `out`; write `<out stem>.params.yaml`
    beside it (the params that rebuild the model and resume its training) and, when the checkpoint holds
    their perceptual loss, `<out stem>.perceptual.pt`."""
    import yaml

    src, out = Path(src), Path(out)
    raw = read_authors_checkpoint(src)
    sd = raw["model"]
    step = int(raw.get("step", -1)) + 1  # they save after the optimiser step numbered `step` (from 0)
    perceptual_path = out.with_name(out.stem + ".perceptual.pt")
    params = authors_params(sd, in_context_start=in_context_start, data_root=data_root, step=step, epochs=epochs)
    cfg = config_from_dict(params)
    weights, dropped, lpips = convert_state_dict(sd, cfg)
    if lpips is not None:
        params["loss"].update({"w_perc": 1.0, "perceptual_weights": str(perceptual_path.resolve())})
        cfg = config_from_dict(params)
    info = {"modality": "images", "channels": int(sd["patch_embed.patch_embeddings.projection.weight"].shape[1]),
            "image_size": cfg.data.image_size, "num_classes": int(sd["encoder.y_embedder.embedding_table.weight"].shape[0] - 2)}
    model_cfg = config_from_dict({**params, "loss": {**params["loss"], "w_perc": 0.0, "perceptual_weights": None}})
    with torch.device("meta"):
        model = UNITE(model_cfg, info)
    expected = model.state_dict()
    _check_keys(weights, expected, "model")
    ema = weights
    if isinstance(raw.get("ema"), dict):
        ema, _, _ = convert_state_dict(raw["ema"], cfg)
        _check_keys(ema, expected, "ema")
    real = UNITE(model_cfg, info)
    real.load_state_dict(weights)
    optimizers = convert_optimizers(raw, sd, real, cfg)
    state = {
        "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "info": info, "step": max(step, 0),
        "model": weights, "ema": ema, "ema_n_averaged": torch.tensor(max(step, 0), dtype=torch.long),
        "optimizers": optimizers or [], "history": [],
        "imported": {"source": str(src), "epoch": raw.get("epoch"), "dropped": dropped,
                     "optimizer_state": optimizers is not None},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if lpips is not None:
        save_checkpoint(perceptual_path, lpips)
    save_checkpoint(out, state)
    params_path = out.with_name(out.stem + ".params.yaml")
    params["train"]["init_from"] = str(out.resolve())
    header = (f"# Params of the authors' checkpoint {src.name}, imported by `unite import-checkpoint` into {out.name}.\n"
              "# Sizes come from the weights; the training recipe is the authors' (M=14 flow noisings, two-phase lr).\n"
              "# Point data.root at ImageNet's train/ folder (and eval.* at local Inception weights) before\n"
              "# evaluating or resuming; train.init_from starts a new run from the imported state.\n")
    atomic_write_text(params_path, header + yaml.safe_dump(params, sort_keys=False))
    return ImportResult(out, params_path, perceptual_path if lpips is not None else None, cfg, step, dropped,
                        optimizers is not None)


def _check_keys(ours: dict, expected: dict, what: str) -> None:
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise AuthorsCheckpointError(
            f"the checkpoint's {what} weights do not fit the model its shapes describe: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AuthorsCheckpointError(
                f"the checkpoint's {what} tensor for {k} has shape {tuple(v.shape)}, the model needs "
                f"{tuple(expected[k].shape)}"
            )
