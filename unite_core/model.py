"""UNITE = Generative Encoder + decoder + flow matching, for any modality.

A *modality* (`unite_core.modalities`: images, molecules) tells the model how to embed observations
into GE tokens, how to decode latents, how to measure reconstruction, and how to turn decoder
outputs into user-facing results. The GE never changes.

Variants (all parameters of the config):
- weight_sharing: "shared" (one GE for tokenize and denoise) or "separate" (two GEs of equal size).
- flow.stop_grad: stop-gradient on z0 before the denoising pass (the paper's default) or not.
- loss.recon_only: tokenizer-only training (stage 1 of the two-stage baseline).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config, SampleConfig
from .devices import autocast
from .encoder import GenerativeEncoder
from .flow import GuidanceConfig, flow_loss, guided_prediction, integrate, interpolate, sample_timesteps, x_to_velocity
from .modalities import build_modality


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
                tokenize_t_max=f.tokenize_t_max, register_pos_scale=m.register_pos_scale,
                latent_out_init=m.latent_out_init,
            )

        self.encoder = make_ge(self.modality.make_embed(width))
        self.separate = m.weight_sharing == "separate"
        if self.separate:
            self.denoiser_ge = make_ge(None)
        self.decoder = self.modality.make_decoder()

    # ------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> GenerativeEncoder:
        return self.denoiser_ge if self.separate else self.encoder

    @property
    def null_class(self) -> int:
        return self.encoder.null_class

    def tokenize(self, obs, generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None,
                 t: torch.Tensor | None = None) -> torch.Tensor:
        """Observations (in the model's range) -> clean latents z0 (B, K, d), after the final norm.
        The register noise and timestep come from `generator` unless given."""
        return self.encoder.tokenize(obs, generator, noise=noise, t=t)[0]

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noisy latents -> predicted clean latents (after the final norm); y: labels (null = unconditional)."""
        return self.denoiser.denoise(z_t, t, y)[0]

    def decode(self, z: torch.Tensor):
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, obs, generator: torch.Generator | None = None):
        """Autoencoder path: tokenize then decode (no noise augmentation). Raw decoder output."""
        return self.decode(self.tokenize(obs, generator))

    # ------------------------------------------------------------------------------------------
    def forward(self, batch, generator: torch.Generator | None = None, **kwargs) -> tuple[torch.Tensor, dict]:
        """The training objective (compute_loss): the call DistributedDataParallel hooks into."""
        return self.compute_loss(batch, generator, **kwargs)

    def compute_loss(self, batch, generator: torch.Generator | None = None, *,
                     with_flow: bool = True) -> tuple[torch.Tensor, dict]:
        """One UNITE step's objective: L_recon + w_gen * L_flow. Returns (loss, detached metrics).

        with_flow=False drops the flow term (the trainer's loss.flow_warmup_steps warm start)."""
        cfg = self.cfg
        obs, y = self.modality.unpack(batch)
        if self.training:
            obs = self.modality.augment(obs, generator)
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
            lflow, per_noising = self.flow_objective(z0, y, generator)
            metrics["flow"] = per_noising.detach()
            loss = loss + cfg.loss.w_gen * lflow
        metrics["loss"] = loss.detach()
        metrics["latent_std"] = z0.detach().float().std()
        return loss, metrics

    def flow_objective(
        self, z0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, *,
        noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow loss of M independent noisings of the same latents. Returns (the loss term, the mean
        loss per noising).

        The M noisings run `flow.chunk_size` at a time (default: all in one batch). `flow.reduction`:
        "sum" (the authors': each noising's mean loss, summed, so the term weighs M x loss.w_gen
        against the reconstruction) or "mean" (weight 1 whatever M). `noise` (M*B, K, d) and `t` (M*B,),
        noising-major, replace the draws from `generator` (to compare implementations exactly).
        """
        f = self.cfg.flow
        target = z0.detach() if f.stop_grad else z0
        M, B = f.minibatches, z0.shape[0]
        chunk = f.chunk_size or M
        total = z0.new_zeros((), dtype=torch.float32)
        for first in range(0, M, chunk):
            m = min(chunk, M - first)
            rows = slice(first * B, (first + m) * B)
            zrep = target.repeat(m, 1, 1)
            yrep = self.denoiser.drop_labels(y.repeat(m), generator)
            tt = t[rows] if t is not None else sample_timesteps(
                m * B, mu=f.t_mu, sigma=f.t_sigma, shift=f.shift, device=z0.device, generator=generator)
            eps = noise[rows] if noise is not None else torch.randn(zrep.shape, device=z0.device, generator=generator)
            z_t = interpolate(zrep, eps, tt)
            out = self.denoiser(z_t, tt, yrep, checkpoint=self.cfg.train.checkpoint_denoiser and self.training)
            x_hat = self.denoiser.normalize(out.raw)
            total = total + m * flow_loss(x_hat, zrep, z_t, tt, clamp=f.velocity_clamp, space=f.loss_space)
        per_noising = total / M
        return (total if f.reduction == "sum" else per_noising), per_noising

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        sample: SampleConfig | None = None,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        autocast_dtype: torch.dtype | None = None,
        **settings,
    ) -> tuple[torch.Tensor, int]:
        """Integrate the probability-flow ODE from noise (t=0) to clean latents (t=1).

        `sample` (default: the model's cfg.sample) holds solver, steps, guidance and the rest;
        keyword `settings` override its fields (e.g. cfg_scale=3.0, solver="euler"). `noise`
        (B, K, d) replaces the draw from `generator`. With sample.final_norm the final latent norm is
        applied to the ODE's end point (the authors decode the end point as it is)."""
        s = sample or self.cfg.sample
        if settings:
            unknown = sorted(set(settings) - set(SampleConfig.model_fields))
            if unknown:
                raise TypeError(f"sample_latents: unknown sampler settings {unknown}")
            s = SampleConfig.model_validate({**s.model_dump(), **settings})
        dev = labels.device
        B = labels.shape[0]
        K, d = self.cfg.model.latent_tokens, self.cfg.model.latent_dim
        z = noise.to(dev) if noise is not None else torch.randn(B, K, d, device=dev, generator=generator)
        ge = self.denoiser
        y = labels if self.num_classes > 0 else torch.full_like(labels, self.null_class)
        guidance = GuidanceConfig(
            scale=s.cfg_scale if self.num_classes > 0 else 1.0, interval=tuple(s.cfg_interval),
            norm_first=s.norm_first, open_interval=s.cfg_interval_open, norm_unguided=s.norm_unguided,
        )
        clamp = self.cfg.flow.velocity_clamp

        def raw_fn(zz, tt, yy):
            with autocast(dev, autocast_dtype):
                return ge(zz, tt, yy).raw.float()

        def velocity(t_scalar, zz):
            t = t_scalar.to(zz.dtype).expand(zz.shape[0])
            x_hat = guided_prediction(raw_fn, ge.normalize, zz, t, y, self.null_class, guidance)
            return x_to_velocity(x_hat, zz, t, clamp)

        grid_shift = self.cfg.flow.shift if s.shifted_grid else None
        z1, nfe = integrate(velocity, z, solver=s.solver, steps=s.steps, rtol=s.rtol, atol=s.atol,
                            grid_shift=grid_shift)
        return (ge.normalize(z1) if s.final_norm else z1), nfe

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, sample: SampleConfig | None = None, **kwargs):
        """Sample latents with guidance and decode them; images come back in [0, 1] on the CPU.
        Arguments as for `sample_latents`."""
        autocast_dtype = kwargs.get("autocast_dtype")
        z, nfe = self.sample_latents(labels, sample, **kwargs)
        with autocast(z.device, autocast_dtype):
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


