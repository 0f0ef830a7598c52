"""One XPSR training step, top to bottom: encode, noise, predict, noise loss + lambda * DFC."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xpsr.config import DFCConfig
from xpsr.models.dfc import dfc_loss
from xpsr.models.forward import predict_noise
from xpsr.models.text import encode_prompts


@dataclass
class StepOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # every loss component, for logging and for the non-finite check


def paper_latent_indices(latent_preds: list[torch.Tensor], n_scales: int = 3) -> list[int]:
    """One latent DFC term per resolution for the ``n_scales`` finest ones (the paper's 3 scales):
    the first residual at each new spatial size. The paper does not say which residual; we take the first."""
    chosen, seen = [], []
    for i, pred in enumerate(latent_preds):
        size = tuple(pred.shape[-2:])
        if size not in seen:
            seen.append(size)
            if len(seen) <= n_scales:
                chosen.append(i)
    return chosen


def _randn(shape: torch.Size, generator) -> torch.Tensor:
    """Standard normal noise on the CPU: one draw of ``shape``, or one draw per sample from its own generator."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])
    return torch.randn(shape, generator=generator, device="cpu")


def _timesteps(n_train: int, b: int, generator) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randint(0, n_train, (1,), generator=g) for g in generator])
    return torch.randint(0, n_train, (b,), generator=generator)


def training_step(modules, batch: dict, dfc: DFCConfig, content_prompt: str = "caption",
                  generator: torch.Generator | list[torch.Generator] | None = None,
                  weight_dtype: torch.dtype = torch.float32,
                  content_embeds: torch.Tensor | None = None,
                  quality_embeds: torch.Tensor | None = None, predict=None) -> StepOutput:
    """Loss of one batch (``hr`` in [-1, 1], ``lr_cond`` in [0, 1], prompts as strings).

    ``generator`` drives the VAE sample, the noise and the timesteps (its state goes into checkpoints so
    a resumed run repeats exactly); a list of generators, one per sample, draws each sample's share from
    its own (the training loop's per-sample streams, :mod:`xpsr.distributed.streams`).
    Precomputed ``content_embeds``/``quality_embeds`` skip the text encoder. ``predict`` replaces
    ``predict_noise(unet, controlnet, ...)`` (the FSDP-sharded pair of xpsr.distributed.fsdp, called as one module).
    """
    unet, controlnet, vae, scheduler = modules.unet, modules.controlnet, modules.vae, modules.scheduler
    hr = batch["hr"]
    device = hr.device
    b = hr.shape[0]

    # 1. HR -> latents with the frozen VAE (scaled as SD expects); a sample is drawn every step
    with torch.no_grad():
        if "hr_moments" in batch:  # cached posterior (mean, log-variance): no VAE encoder in the step
            mean, logvar = batch["hr_moments"].float().chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        else:
            posterior = vae.encode(hr.to(weight_dtype)).latent_dist
            mean, std = posterior.mean, posterior.std
        noise_vae = _randn(mean.shape, generator).to(device)
        hr_latents = (mean + std * noise_vae.to(mean.dtype)).float()
        hr_latents = hr_latents * vae.config.scaling_factor

    # 2. noise at uniformly drawn timesteps
    noise = _randn(hr_latents.shape, generator).to(device)
    timesteps = _timesteps(scheduler.config.num_train_timesteps, b, generator).to(device)
    noisy = scheduler.add_noise(hr_latents, noise, timesteps)

    # 3. prompts through the frozen text encoder, once per distinct prompt
    if content_embeds is None:
        texts = batch["content_prompt"] if content_prompt == "caption" else [""] * b
        content_embeds = encode_prompts(modules.tokenizer, modules.text_encoder, list(texts), device)
    if quality_embeds is None:
        quality_embeds = encode_prompts(modules.tokenizer, modules.text_encoder, list(batch["quality_prompt"]),
                                        device)

    # 4. ControlNet (SFA, DFC heads) + UNet with the residuals
    predict = predict or functools.partial(predict_noise, unet, controlnet)
    pred, control = predict(noisy, timesteps, content_embeds.to(weight_dtype), quality_embeds.to(weight_dtype),
                            batch["lr_cond"].to(weight_dtype))

    # 5. loss: epsilon or v target (from the scheduler) + lambda * DFC
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(hr_latents, noise, timesteps)
    else:
        target = noise
    mse = F.mse_loss(pred.float(), target.float())
    indices = paper_latent_indices(control.latent_preds) if dfc.latent_scales == "paper" else None
    d = dfc_loss(control.pixel_rgbs, control.latent_preds, hr.float(), hr_latents, weight=dfc.weight,
                 pixel=dfc.pixel, latent=dfc.latent, latent_indices=indices)
    loss = mse + d.total
    return StepOutput(loss, {"loss": loss, "noise_mse": mse, "dfc_pixel": d.pixel, "dfc_latent": d.latent})
