"""The one-step student's forward and its loss terms (docs/one-step.md, with the equations).

Student:  z_lr = E(lr_up) * s,  out = UNet_student(z_lr, t*, c, q, ControlNet(z_lr, t*, c, q, lr_up)),
          z_sr = x0(out) = (z_lr - sqrt(1 - abar_t*) out) / sqrt(abar_t*)        (epsilon prediction)
               = sqrt(abar_t*) z_lr - sqrt(1 - abar_t*) out                      (v prediction)
Every term below is a function of tensors, so each can be tested on its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _abar(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    ab = scheduler.alphas_cumprod.to(like.device, torch.float32)[t.long()]
    return ab.reshape(-1, *([1] * (like.dim() - 1))) if ab.dim() else ab


def predicted_x0(model_out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """x0 from the model output at z_t (epsilon or v prediction, as the scheduler's config says)."""
    ab = _abar(scheduler, t, z_t)
    out, z = model_out.float(), z_t.float()
    if scheduler.config.prediction_type == "v_prediction":
        return ab.sqrt() * z - (1 - ab).sqrt() * out
    return (z - (1 - ab).sqrt() * out) / ab.sqrt()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    ab = _abar(scheduler, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """What the UNet predicts at x_t: the noise, or v = sqrt(abar) noise - sqrt(1 - abar) x0."""
    if scheduler.config.prediction_type == "v_prediction":
        ab = _abar(scheduler, t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0
    return noise


def vsd_surrogate(z_sr: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Loss whose gradient w.r.t. ``z_sr`` is g / numel, with the distribution-matching direction
    g = (x0_fake - x0_real) / w,  w = mean_over_pixels |z_sr - x0_real| (per sample, detached):
    L = 0.5 * mean((z_sr - sg(z_sr - g))^2). A descent step moves z_sr towards the real model's denoised
    estimate and away from the fake one's; in epsilon terms g is proportional to eps_real - eps_fake."""
    z = z_sr.float()
    dims = tuple(range(1, z.dim()))
    with torch.no_grad():
        weight = (z - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
        g = torch.nan_to_num((x0_fake - x0_real) / weight)
    return 0.5 * F.mse_loss(z, (z - g).detach())


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())
