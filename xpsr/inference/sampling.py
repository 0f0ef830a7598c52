"""The XPSR sampling loop: classifier-free guidance over content and quality prompts, our own loop
(the stock ControlNet pipeline neither passes our kwargs to the ControlNet nor duplicates them for CFG)."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from xpsr.models.forward import predict_noise


@torch.no_grad()
def sample_sr(unet, controlnet, vae, scheduler_config, lr_cond: torch.Tensor, content_embeds: torch.Tensor,
              quality_embeds: torch.Tensor, negative_content_embeds: torch.Tensor,
              negative_quality_embeds: torch.Tensor, num_inference_steps: int = 20, guidance_scale: float = 5.5,
              conditioning_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Super-resolve ``lr_cond`` (B, 3, H, W) in [0, 1] (LR upsampled to the output size); returns [0, 1] images."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device=lr_cond.device)
    b, _, h, w = lr_cond.shape
    dtype = next(unet.parameters()).dtype
    latents = torch.randn((b, unet.config.in_channels, h // 8, w // 8), generator=generator,
                          device="cpu").to(lr_cond.device, torch.float32) * scheduler.init_noise_sigma
    cfg = guidance_scale > 1.0
    if cfg:  # unconditional half first, as diffusers does
        content = torch.cat([negative_content_embeds, content_embeds])
        quality = torch.cat([negative_quality_embeds, quality_embeds])
        cond = torch.cat([lr_cond, lr_cond])
    else:
        content, quality, cond = content_embeds, quality_embeds, lr_cond
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        eps, _ = predict_noise(unet, controlnet, x.to(dtype), t.expand(x.shape[0]), content.to(dtype),
                               quality.to(dtype), cond.to(dtype), conditioning_scale=conditioning_scale)
        eps = eps.float()
        if cfg:
            uncond, text = eps.chunk(2)
            eps = uncond + guidance_scale * (text - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    image = vae.decode((latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample
    return ((image.float() + 1) / 2).clamp(0, 1)
