"""One XPSR noise prediction: ControlNet (SFA + DFC heads) then the UNet with its residuals."""
from __future__ import annotations

import torch

from xpsr.models.controlnet import XPSRControlNetOutput


def unwrap(model):
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def predict_noise(unet, controlnet, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                  content_embeds: torch.Tensor, quality_embeds: torch.Tensor | None, lr_cond: torch.Tensor,
                  conditioning_scale: float = 1.0,
                  cross_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, XPSRControlNetOutput]:
    """Return ``(UNet output, ControlNet output)``; ``lr_cond`` is the LR image upsampled to HR size in [0, 1].
    ``cross_attention_kwargs`` go to the attention processors of both (diffusers' keyword, e.g. a LoRA
    ``scale``); XPSR's own entries are added to a copy of it."""
    control = controlnet(noisy_latents, timesteps, encoder_hidden_states=content_embeds,
                         controlnet_cond=lr_cond, quality_embeds=quality_embeds,
                         conditioning_scale=conditioning_scale, cross_attention_kwargs=cross_attention_kwargs)
    extra = {"quality_embeds": quality_embeds} if hasattr(unwrap(unet), "_route_residuals") else {}
    sample = unet(noisy_latents, timesteps, encoder_hidden_states=content_embeds,
                  down_block_additional_residuals=control.down_block_res_samples,
                  mid_block_additional_residual=control.mid_block_res_sample,
                  cross_attention_kwargs=cross_attention_kwargs, **extra).sample
    return sample, control
