"""UNITE = Generative Encoder + decoder + flow matching, for any modality.

A *modality* tells the model how to embed observations into GE tokens, how to decode latents, how
to measure reconstruction, and how to turn decoder outputs into user-facing results. Images are
built in; molecules register themselves from `unite_core.molecules`. The GE never changes.

Variants (all parameters of the config):
- weight_sharing: "shared" (one GE for tokenize and denoise) or "separate" (two GEs of equal size).
- flow.stop_grad: stop-gradient on z0 before the denoising pass (the paper's default) or not.
- loss.recon_only: tokenizer-only training (stage 1 of the two-stage baseline).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from .config import Config
from .decoder import PatchEmbed, PixelDecoder
from .encoder import GenerativeEncoder
from .flow import GuidanceConfig, flow_loss, guided_prediction, integrate, interpolate, sample_timesteps, x_to_velocity


class Modality(Protocol):
    name: str

    def make_embed(self, width: int) -> nn.Module: ...
    def make_decoder(self) -> nn.Module: ...
    def unpack(self, batch) -> tuple[Any, torch.Tensor]: ...
    def recon_loss(self, decoded, obs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def recon_metrics(self, decoded, obs) -> dict[str, float]: ...
    def postprocess(self, decoded, **kwargs): ...
    def batch_size(self, obs) -> int: ...


_MODALITIES: dict[str, Callable[[Config, dict], Modality]] = {}


def register_modality(name: str, factory: Callable[[Config, dict], Modality]) -> None:
    _MODALITIES[name] = factory


def build_modality(cfg: Config, info: dict) -> Modality:
    name = info.get("modality", cfg.modality)
    if name not in _MODALITIES and name == "molecules":
        from . import molecules  # noqa: F401  (registers itself)
    if name not in _MODALITIES:
        raise ValueError(f"unknown modality '{name}'; known: {sorted(_MODALITIES)}")
    return _MODALITIES[name](cfg, info)


class ImageModality:
    name = "images"

    def __init__(self, cfg: Config, info: dict):
        self.cfg = cfg
        self.channels = int(info["channels"])
        self.image_size = int(info["image_size"])
        self.patch = cfg.model.patch_size
        if self.image_size % self.patch:
            raise ValueError(f"model.patch_size={self.patch} must divide the image size {self.image_size}")
        self.perceptual = None
        if cfg.loss.w_perc > 0:
            from .perceptual import PerceptualLoss

            self.perceptual = PerceptualLoss(cfg.loss.perceptual_weights)

    def make_embed(self, width: int) -> nn.Module:
        return PatchEmbed(self.channels, self.image_size, self.patch, width)

    def make_decoder(self) -> nn.Module:
        m = self.cfg.model
        depth, width, heads = m.decoder_dims()
        return PixelDecoder(
            latent_dim=m.latent_dim, latent_tokens=m.latent_tokens, channels=self.channels,
            image_size=self.image_size, patch=self.patch, depth=depth, width=width, heads=heads,
            mlp_ratio=m.decoder_mlp_ratio,
        )

    def unpack(self, batch):
        x, y = batch
        return x, y

    def batch_size(self, obs) -> int:
        return obs.shape[0]

    def recon_loss(self, decoded, obs):
        err = decoded.float() - obs.float()
        kind = self.cfg.loss.recon
        metrics: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=err.device)
        if kind in ("l1", "l1_mse"):
            l1 = err.abs().mean()
            metrics["l1"] = l1.detach()
            loss = loss + l1
        if kind in ("mse", "l1_mse"):
            mse = err.pow(2).mean()
            metrics["mse"] = mse.detach()
            loss = loss + mse
        if self.perceptual is not None:
            perc = self.perceptual.to(obs.device)(decoded, obs)
            metrics["perceptual"] = perc.detach()
            loss = loss + self.cfg.loss.w_perc * perc
        return loss, metrics

    def recon_metrics(self, decoded, obs) -> dict[str, float]:
        a = ((decoded.float().clamp(-1, 1) + 1) / 2).flatten(1)
        b = ((obs.float() + 1) / 2).flatten(1)
        mse = (a - b).pow(2).mean(1).clamp_min(1e-10)
        return {"psnr": float((10 * torch.log10(1.0 / mse)).mean())}

    def postprocess(self, decoded, **_):
        return ((decoded.float().clamp(-1, 1) + 1) / 2).cpu()

    def to(self, device):
        return self


register_modality("images", ImageModality)


def balanced_labels(n: int, num_classes: int, device=None) -> torch.Tensor:
    """Class-balanced labels (equal count per class, sorted); the null label when unconditional."""
    if num_classes <= 0:
        return torch.zeros(n, dtype=torch.long, device=device)
    return torch.arange(n, device=device) * num_classes // max(n, num_classes)


class UNITE(nn.Module):
    def __init__(self, cfg: Config, info: dict):
        super().__init__()
        self.cfg = cfg
        self.info = dict(info)
        self.modality = build_modality(cfg, info)
        m, f = cfg.model, cfg.flow
        self.num_classes = int(info.get("num_classes", 0))
        depth, width, heads = m.ge_dims()

        def make_ge(embed):
            return GenerativeEncoder(
                depth=depth, width=width, heads=heads, latent_tokens=m.latent_tokens,
                latent_dim=m.latent_dim, num_classes=self.num_classes, embed=embed,
                in_context_tokens=m.in_context_tokens, in_context_start=m.in_context_start,
                final_norm=m.final_norm, block_norm=m.block_norm, qk_norm=m.qk_norm, rope=m.rope,
                label_dropout=m.label_dropout, fourier_scale=m.fourier_scale,
                tokenize_t_max=f.tokenize_t_max,
            )

        self.encoder = make_ge(self.modality.make_embed(width))
        self.separate = m.weight_sharing == "separate"
        if self.separate:
            self.denoiser_ge = make_ge(None)
        self.decoder = self.modality.make_decoder()
        if getattr(self.modality, "perceptual", None) is not None:
            # kept outside the state_dict: frozen and loaded from the user's file
            object.__setattr__(self, "_perceptual", self.modality.perceptual)

    # ------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> GenerativeEncoder:
        return self.denoiser_ge if self.separate else self.encoder

    @property
    def null_class(self) -> int:
        return self.encoder.null_class

    def tokenize(self, obs, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.encoder.tokenize(obs, generator)[0]

    def decode(self, z: torch.Tensor):
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, obs, generator: torch.Generator | None = None):
        """Autoencoder path: tokenize then decode (no noise augmentation). Raw decoder output."""
        return self.decode(self.tokenize(obs, generator))

    # ------------------------------------------------------------------------------------------
    def compute_loss(self, batch, generator: torch.Generator | None = None, *,
                     with_flow: bool = True) -> tuple[torch.Tensor, dict]:
        """One UNITE step's objective: L_recon + w_gen * L_flow. Returns (loss, detached metrics).

        with_flow=False drops the flow term (the trainer's loss.flow_warmup_steps warm start)."""
        cfg = self.cfg
        obs, y = self.modality.unpack(batch)
        augment = getattr(self.modality, "augment", None)  # optional: modality's training augmentation
        if self.training and augment is not None:
            obs = augment(obs, generator)
        z0 = self.tokenize(obs, generator)
        B = z0.shape[0]
        dev = z0.device
        z_dec = z0
        if self.training and cfg.loss.decoder_noise and cfg.loss.decoder_noise_prob > 0:
            start = cfg.loss.decoder_noise_start
            t_aug = start + (1 - start) * torch.rand(B, device=dev, generator=generator)
            eps = torch.randn(z0.shape, device=dev, generator=generator)
            noisy = interpolate(z0, eps, t_aug)
            pick = torch.rand(B, device=dev, generator=generator) < cfg.loss.decoder_noise_prob
            z_dec = torch.where(pick[:, None, None], noisy, z0)
        decoded = self.decode(z_dec)
        recon, metrics = self.modality.recon_loss(decoded, obs)
        metrics["recon"] = recon.detach()
        loss = recon
        if with_flow and not cfg.loss.recon_only and cfg.loss.w_gen > 0:
            lflow = self.flow_objective(z0, y, generator)
            metrics["flow"] = lflow.detach()
            loss = loss + cfg.loss.w_gen * lflow
        metrics["loss"] = loss.detach()
        metrics["latent_std"] = z0.detach().float().std()
        return loss, metrics

    def flow_objective(self, z0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow loss of M independent noisings of the same latents, run as one batch."""
        f = self.cfg.flow
        target = z0.detach() if f.stop_grad else z0
        M = f.minibatches
        zrep = target.repeat(M, 1, 1)
        yrep = self.denoiser.drop_labels(y.repeat(M), generator)
        t = sample_timesteps(zrep.shape[0], mu=f.t_mu, sigma=f.t_sigma, shift=f.shift, device=z0.device, generator=generator)
        eps = torch.randn(zrep.shape, device=z0.device, generator=generator)
        z_t = interpolate(zrep, eps, t)
        x_hat, _ = self.denoiser.denoise(z_t, t, yrep)
        return flow_loss(x_hat, zrep, z_t, t, clamp=f.velocity_clamp, space=f.loss_space)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        *,
        solver: str = "heun",
        steps: int = 50,
        cfg_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.1, 1.0),
        norm_first: bool = True,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        generator: torch.Generator | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Integrate the probability-flow ODE from noise (t=0) to clean latents (t=1)."""
        dev = labels.device
        B = labels.shape[0]
        K, d = self.cfg.model.latent_tokens, self.cfg.model.latent_dim
        z = torch.randn(B, K, d, device=dev, generator=generator)
        ge = self.denoiser
        y = labels if self.num_classes > 0 else torch.full_like(labels, self.null_class)
        guidance = GuidanceConfig(cfg_scale if self.num_classes > 0 else 1.0, tuple(cfg_interval), norm_first)
        clamp = self.cfg.flow.velocity_clamp

        def raw_fn(zz, tt, yy):
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return ge(zz, tt, yy).raw.float()

        def velocity(t_scalar, zz):
            t = t_scalar.to(zz.dtype).expand(zz.shape[0])
            x_hat = guided_prediction(raw_fn, ge.normalize, zz, t, y, self.null_class, guidance)
            return x_to_velocity(x_hat, zz, t, clamp)

        z1, nfe = integrate(velocity, z, solver=solver, steps=steps, rtol=rtol, atol=atol)
        return ge.normalize(z1), nfe

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, **kwargs):
        """Sample latents with guidance and decode them; images come back in [0, 1] on the CPU."""
        autocast_dtype = kwargs.get("autocast_dtype")
        z, nfe = self.sample_latents(labels, **kwargs)
        with torch.autocast(z.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            decoded = self.decode(z)
        return self.modality.postprocess(decoded.float(), labels=labels), nfe


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_report(model: UNITE) -> dict[str, int]:
    """Parameter counts: GE (incl. observation embedding), separate denoiser, decoder, total."""
    rep = {"ge": count_parameters(model.encoder), "decoder": count_parameters(model.decoder)}
    if model.separate:
        rep["denoiser"] = count_parameters(model.denoiser_ge)
    rep["total"] = count_parameters(model)
    return rep


