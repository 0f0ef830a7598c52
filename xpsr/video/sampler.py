"""XPSR on one frame of a clip, with the noise (and optionally the start) chosen for temporal stability.

The sampler is the image sampler of :mod:`xpsr.inference.pipeline` (same condition image, LR latent, start
latents, CFG noise prediction, scheduler steps, tiled VAE, colour fix, final resize; those functions are called,
not copied) with one difference: every Gaussian draw of a frame comes from a *noise field* that the
stability method chooses, not from a generator:

- field 0: the VAE posterior sample of the LR latent (``lr_latent=sample``);
- fields 1, 2: the start noise(s) (``start_from=lr`` uses both, ``sdedit``/``noise`` the first);
- field 3 + i: the noise a stochastic sampler (DDPM) adds at step i.

``independent`` draws them fresh per frame (seeded by seed and frame index), ``same`` draws the same fields for
every frame, ``flow``/``carry`` move the previous frame's fields along the optical flow (:mod:`xpsr.video.motion`),
and ``carry`` also starts each frame from the previous SR frame warped along the flow and noised to
``video.carry_timestep`` (SDEdit), sampling only the steps below it.
"""
from __future__ import annotations

import numpy as np
import torch

from xpsr.config import InferConfig
from xpsr.inference.color import fix_colors
from xpsr.inference.pipeline import (
    condition_image,
    final_resize,
    guided_noise,
    make_scheduler,
    noise_to,
    output_size,
    prompt_embeddings,
)
from xpsr.inference.tiling import vae_decode, vae_posterior, vae_scale_factor, vae_tile_options
from xpsr.video.motion import estimate, warp_image, warp_noise


def frame_seed(seed: int, index: int) -> int:
    """The seed of frame ``index``'s fresh noise (independent of how the clip is split into chunks)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


class FrameSampler:
    """Super-resolves the frames of one clip in order; holds what the next frame takes from the previous."""

    def __init__(self, modules, cfg: InferConfig, device, content: str, quality: str):
        self.modules, self.cfg, self.device = modules, cfg, device
        self.method = cfg.video.stability
        self.embeds = prompt_embeddings(modules, content, quality, cfg, device)
        self.reset()

    def reset(self) -> None:
        """Forget the previous frame (a chunk's first frame, or after a cut)."""
        self.previous_lr, self.fields, self.previous_sr = None, None, None

    def state(self) -> dict[str, torch.Tensor]:
        """What the next frame takes from this one (saved with a chunk, so the next chunk continues exactly)."""
        out = {f"field{i}": f for i, f in enumerate(self.fields or [])}
        if self.previous_lr is not None:
            out["previous_lr"] = torch.from_numpy(np.ascontiguousarray(self.previous_lr))
        if self.previous_sr is not None and self.method == "carry":
            out["previous_sr"] = self.previous_sr.float().cpu()
        return out

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.fields = [state[f"field{i}"] for i in range(sum(k.startswith("field") for k in state))] or None
        self.previous_lr = state["previous_lr"].numpy() if "previous_lr" in state else None
        self.previous_sr = state["previous_sr"].to(self.device) if "previous_sr" in state else None

    def _noise_fields(self, index: int, shape: tuple[int, ...], count: int, lr: np.ndarray) -> list[torch.Tensor]:
        seed = self.cfg.seed if self.method == "same" else frame_seed(self.cfg.seed, index)
        generator = torch.Generator().manual_seed(seed)
        fresh = [torch.randn(shape, generator=generator) for _ in range(count)]
        motion = None
        if self.method in ("flow", "carry") and self.previous_lr is not None and self.fields is not None:
            v = self.cfg.video
            motion = estimate(self.previous_lr, lr, v.flow_preset, v.flow_check)
            if self.fields[0].shape == fresh[0].shape:
                fresh = [warp_noise(prev, motion, new) for prev, new in zip(self.fields, fresh)]
        self.fields, self.motion = fresh, motion
        return [f.to(self.device) for f in fresh]

    def _carried(self, lr_cond: torch.Tensor) -> torch.Tensor | None:
        """The previous SR frame warped to this one (the LR condition where content is new), as latents."""
        if self.method != "carry" or self.previous_sr is None or self.motion is None \
                or self.previous_sr.shape != lr_cond.shape:
            return None
        warped, tracked = warp_image(self.previous_sr, self.motion)
        image = tracked * warped + (1 - tracked) * lr_cond.float()
        mean, _ = vae_posterior(self.modules.vae, image * 2 - 1, self.cfg.vae_tile, **vae_tile_options(self.cfg))
        return mean * self.modules.vae.config.scaling_factor

    @torch.no_grad()
    def __call__(self, index: int, lr: np.ndarray) -> np.ndarray:
        """RGB uint8 LR frame -> RGB uint8 SR frame (the next call continues from this one)."""
        modules, cfg = self.modules, self.cfg
        (th, tw), _ = output_size(lr.shape[0], lr.shape[1], cfg)
        lr_cond = condition_image(lr, cfg, self.device, vae_scale_factor(modules.vae))
        f = vae_scale_factor(modules.vae)
        shape = (1, modules.unet.config.in_channels, lr_cond.shape[-2] // f, lr_cond.shape[-1] // f)
        scheduler = make_scheduler(cfg.scheduler, modules.scheduler.config)
        scheduler.set_timesteps(cfg.num_inference_steps, device=self.device)
        noise = self._noise_fields(index, shape, 3 + len(scheduler.timesteps), lr)
        mean, std = vae_posterior(modules.vae, lr_cond * 2 - 1, cfg.vae_tile, **vae_tile_options(cfg))
        z_lr = (mean + std * noise[0] if cfg.lr_latent == "sample" else mean) * modules.vae.config.scaling_factor
        if cfg.mode == "onestep":
            latents = self._onestep(z_lr, lr_cond)
        else:
            latents = self._denoise(scheduler, z_lr, lr_cond, noise, self._carried(lr_cond))
        image = (vae_decode(modules.vae, latents, cfg.vae_decoder_tile, **vae_tile_options(cfg)) + 1) / 2
        image = fix_colors(image.clamp(0, 1), lr_cond.float(), cfg.color_fix, cfg.color_fix_8bit)
        self.previous_lr, self.previous_sr = lr, image
        return final_resize(image, (th, tw), cfg)

    def _onestep(self, z_lr: torch.Tensor, lr_cond: torch.Tensor) -> torch.Tensor:
        import dataclasses

        from xpsr.onestep.objective import predicted_x0

        stored = getattr(self.modules, "onestep_timestep", None)
        t = self.cfg.onestep_timestep if self.cfg.onestep_timestep is not None else (
            stored if stored is not None else 999)
        timestep = torch.tensor(int(t), device=z_lr.device)
        out = guided_noise(self.modules, z_lr, timestep, lr_cond, *self.embeds,
                           dataclasses.replace(self.cfg, guidance_scale=1.0))
        return predicted_x0(out, z_lr, timestep, self.modules.scheduler)

    def _denoise(self, scheduler, z_lr, lr_cond, noise, carried) -> torch.Tensor:
        cfg, timesteps = self.cfg, scheduler.timesteps
        if carried is not None or cfg.start_from == "sdedit":
            level = cfg.video.carry_timestep if carried is not None else cfg.added_noise_level
            keep = timesteps[timesteps <= level]
            keep = keep if len(keep) else timesteps[-1:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(len(timesteps) - len(keep))
            latents, timesteps = noise_to(carried if carried is not None else z_lr, noise[1], keep[0], scheduler), keep
        elif cfg.start_from == "lr":
            latents = noise_to(z_lr, noise[1], timesteps[0], scheduler)
            latents = noise_to(latents, noise[2], cfg.added_noise_level, scheduler) * scheduler.init_noise_sigma
        else:
            latents = noise[1] * scheduler.init_noise_sigma
        for i, t in enumerate(timesteps):
            eps = guided_noise(self.modules, scheduler.scale_model_input(latents, t), t, lr_cond, *self.embeds, cfg)
            latents = self._step(scheduler, eps, t, latents, noise[3 + i])
        return latents

    def _step(self, scheduler, eps, t, latents, noise) -> torch.Tensor:
        """One scheduler step; a DDPM step adds ``noise`` (scaled by its std) instead of a generator's draw."""
        if self.cfg.scheduler != "ddpm":
            return scheduler.step(eps, t, latents).prev_sample
        # the step is x_prev = mean + std * z with z drawn from the generator passed; two known draws give
        # std (linear regression), so the step can add our field with the scheduler's own std
        za, zb = (torch.randn(eps.shape, generator=torch.Generator().manual_seed(s)).to(eps) for s in (1, 2))
        a = scheduler.step(eps, t, latents, generator=torch.Generator().manual_seed(1)).prev_sample
        b = scheduler.step(eps, t, latents, generator=torch.Generator().manual_seed(2)).prev_sample
        dz = za - zb
        std = ((a - b) * dz).sum() / (dz * dz).sum()
        return a + std * (noise.to(a) - za)
