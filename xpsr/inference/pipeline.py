"""XPSR super-resolution of one image: prompts, start latent, tiled CFG denoising, tiled VAE, colour fix."""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from PIL import Image

from xpsr.config import InferConfig
from xpsr.inference.color import fix_colors
from xpsr.inference.low_memory import compute_dtype
from xpsr.inference.tiling import (
    blend_latent_tiles,
    vae_decode,
    vae_posterior,
    vae_tile_options,
)
from xpsr.inference.trained_settings import resolve_settings, settings_of
from xpsr.models.build import vae_scale_factor
from xpsr.models.forward import predict_noise
from xpsr.models.text import encode_prompts

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler,
              "dpmsolver++": DPMSolverMultistepScheduler}


@dataclasses.dataclass
class CallExtras:
    """What diffusers' calling conventions add to one :func:`super_resolve` call (``XPSRPipeline`` only; the
    defaults change nothing, so ``xpsr infer`` and the other faces never pass it)."""

    embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # (content, quality) as prompt_embeddings gives them
    latents: torch.Tensor | None = None  # the start, in place of the one start_from draws
    schedule: dict[str, Any] = dataclasses.field(default_factory=dict)  # set_timesteps keywords (timesteps=, sigmas=)
    step_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # scheduler.step keywords (eta=, generator=)
    decode: bool = True  # False: return the final latents (output_type="latent")
    # after each step: (i, t, state) -> state; state = latents, prompt_embeds, quality_prompt_embeds, image,
    # guidance_scale, and what it returns is sampled on
    on_step_end: Callable[[int, torch.Tensor, dict[str, Any]], dict[str, Any]] | None = None
    interrupted: Callable[[], bool] = lambda: False  # True: skip the remaining steps, decode what there is
    num_timesteps: int = 0  # set by the sampler: how many steps this image gets


def make_scheduler(name: str, base_config, base_class: type | None = None):
    """A fresh scheduler of kind ``name`` over ``base_config`` (a config of ``base_class``). A config of that kind
    already (a scheduler swapped into ``XPSRPipeline``, e.g. DPM-Solver with ``algorithm_type="sde-dpmsolver++"``)
    is taken with every setting it has; from another class (the base model's DDPM), ``dpmsolver++`` is that
    algorithm."""
    cls = SCHEDULERS[name]
    if base_class is cls:
        return cls.from_config(base_config)
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
    return cls.from_config(base_config, **extra)


def output_size(h: int, w: int, cfg: InferConfig, multiple: int = 8) -> tuple[tuple[int, int], tuple[int, int]]:
    """(final size, processing size), as the official test script: an output whose short side is below
    ``process_size`` is processed with that short side (long side truncated), and both sides are rounded
    down to multiples of ``multiple`` (the VAE's scale factor; 8 in the official script)."""
    th, tw = h * cfg.upscale, w * cfg.upscale
    ph, pw = _grown(th, tw, cfg.process_size)
    return (th, tw), (max(ph // multiple * multiple, multiple), max(pw // multiple * multiple, multiple))


def _grown(h: int, w: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side raised to ``short`` if below it, the long side truncated (torchvision Resize)."""
    if min(h, w) >= short:
        return h, w
    return (short, int(short * w / h)) if h <= w else (int(short * h / w), short)


def noise_to(x: torch.Tensor, noise: torch.Tensor, t: int, scheduler) -> torch.Tensor:
    """The forward process q(x_t | x_0) of the scheduler's training schedule, for any integer timestep
    (sigma-based samplers only accept timesteps of their own schedule in ``add_noise``)."""
    ab = scheduler.alphas_cumprod[int(t)].to(x.device, torch.float32)
    return ab.sqrt() * x + (1 - ab).sqrt() * noise


def lr_latents(modules, lr_cond: torch.Tensor, cfg: InferConfig, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents of the condition image (the upscaled LR, [0, 1] -> [-1, 1]): a posterior sample
    (``lr_latent=sample``, official; the first draw from ``generator``) or the posterior mean."""
    mean, std = vae_posterior(modules.vae, lr_cond * 2 - 1, cfg.vae_tile, **vae_tile_options(cfg))
    if (cfg.lr_latent or "sample") == "sample":  # None (not resolved against weights): the sampler's default
        mean = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
    return mean * modules.vae.config.scaling_factor


def start_latents(modules, lr_cond: torch.Tensor, scheduler, timesteps: torch.Tensor, cfg: InferConfig,
                  generator: torch.Generator, device,
                  given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial latents, timesteps to sample) for ``cfg.start_from``.

    lr (official XPSR/PASD): z_lr noised to the first scheduled timestep, then noised again to
    ``added_noise_level``; every scheduled step is sampled. sdedit: z_lr noised once to
    ``added_noise_level``; sampling starts at the first scheduled timestep at or below it. noise: N(0, I).
    Draws from ``generator`` in the official order: posterior sample, first noise, second noise.
    ``given`` (diffusers' ``latents=``) replaces what would be drawn and noised: scaled by ``init_noise_sigma``
    for noise/lr (as diffusers scales its ``latents``), as is for sdedit; no draw is made."""
    f = vae_scale_factor(modules.vae)
    shape = (1, modules.unet.config.in_channels, lr_cond.shape[-2] // f, lr_cond.shape[-1] // f)
    if given is not None:
        return _given_start(given, shape, scheduler, timesteps, cfg, device)
    if cfg.start_from == "noise":
        return torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma, timesteps
    if not 0 <= cfg.added_noise_level < len(scheduler.alphas_cumprod):
        raise ValueError(f"added_noise_level={cfg.added_noise_level} is outside the scheduler's timesteps "
                         f"[0, {len(scheduler.alphas_cumprod) - 1}]")
    z_lr = lr_latents(modules, lr_cond, cfg, generator)
    noise = torch.randn(shape, generator=generator).to(device)
    if cfg.start_from == "lr":
        latents = noise_to(z_lr, noise, timesteps[0], scheduler)
        second = torch.randn(shape, generator=generator).to(device)
        return noise_to(latents, second, cfg.added_noise_level, scheduler) * scheduler.init_noise_sigma, timesteps
    keep = _sdedit_timesteps(scheduler, timesteps, cfg)
    return noise_to(z_lr, noise, keep[0], scheduler), keep


def _sdedit_timesteps(scheduler, timesteps: torch.Tensor, cfg: InferConfig) -> torch.Tensor:
    """sdedit samples the scheduled timesteps at or below ``added_noise_level``."""
    keep = timesteps[timesteps <= cfg.added_noise_level]
    if len(keep) == 0:
        raise ValueError(f"added_noise_level={cfg.added_noise_level} is below every scheduled timestep")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(len(timesteps) - len(keep))
    return keep


def _given_start(given: torch.Tensor, shape: tuple, scheduler, timesteps: torch.Tensor, cfg: InferConfig,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(given.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for this image (its processing size / VAE factor), "
                         f"got {tuple(given.shape)}")
    given = given.to(device, torch.float32)
    if cfg.start_from != "sdedit":
        return given * scheduler.init_noise_sigma, timesteps
    return given, _sdedit_timesteps(scheduler, timesteps, cfg)


def guided_noise(modules, latents, t, lr_cond, content, quality, cfg: InferConfig) -> torch.Tensor:
    """CFG noise prediction; both prompt embeddings are batched [negative; positive] for ControlNet and UNet.
    Large latents are predicted tile by tile (``latent_tiling``) and blended before the guidance, as the
    official pipeline does. ``modules.cross_attention_kwargs`` (set by XPSRPipeline for one call, as
    diffusers pipelines keep it) reaches every attention processor of the ControlNet and the UNet."""
    dtype = compute_dtype(modules.unet)  # fp8-stored weights compute in half precision
    guided = cfg.guidance_scale > 1.0
    attention_kwargs = getattr(modules, "cross_attention_kwargs", None)
    f = vae_scale_factor(modules.vae)

    def window(y: int, x: int, h: int, w: int) -> torch.Tensor:
        z = latents[:, :, y:y + h, x:x + w]
        cond = lr_cond[:, :, y * f:(y + h) * f, x * f:(x + w) * f]
        if guided:
            z, cond = torch.cat([z, z]), torch.cat([cond, cond])
        eps, _ = predict_noise(modules.unet, modules.controlnet, z.to(dtype), t.expand(z.shape[0]), content,
                               quality, cond.to(dtype), conditioning_scale=cfg.conditioning_scale,
                               cross_attention_kwargs=attention_kwargs)
        return eps.float()

    h, w = latents.shape[-2:]
    eps = blend_latent_tiles(window, h, w, cfg.latent_tile, cfg.latent_overlap, cfg.latent_tiling)
    if guided:
        uncond, text = eps.chunk(2)
        eps = uncond + cfg.guidance_scale * (text - uncond)
    return eps


def condition_image(lr: np.ndarray, cfg: InferConfig, device, multiple: int = 8) -> torch.Tensor:
    """The ControlNet condition: the LR enlarged to the processing size, (1, 3, ph, pw) in [0, 1].

    ``resize=pil`` repeats the official test script on 8-bit images: PIL bicubic x upscale, then (short side
    below ``process_size``) PIL bilinear with antialiasing up to it, then PIL bicubic to multiples of
    ``multiple`` (the VAE's scale factor; 8 in the official script)."""
    (th, tw), (ph, pw) = output_size(lr.shape[0], lr.shape[1], cfg, multiple)
    if cfg.resize == "torch":
        t = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float().div(255).to(device)
        return F.interpolate(t, size=(ph, pw), mode="bicubic", align_corners=False).clamp(0, 1)
    image = Image.fromarray(lr).resize((tw, th), Image.BICUBIC)
    sh, sw = _grown(th, tw, cfg.process_size)
    if (sh, sw) != (th, tw):
        image = image.resize((sw, sh), Image.BILINEAR)
    if image.size != (pw, ph):
        image = image.resize((pw, ph), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255).to(device)


def final_resize(image: torch.Tensor, size: tuple[int, int], cfg: InferConfig) -> np.ndarray:
    """(1, 3, h, w) in [0, 1] -> uint8 (th, tw, 3); ``resize=pil`` rounds to 8 bits first, as the official
    script's PIL round trip does."""
    th, tw = size
    if cfg.resize == "torch" and image.shape[-2:] != (th, tw):
        image = F.interpolate(image, size=(th, tw), mode="bicubic", align_corners=False, antialias=True)
    out = (image[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    if out.shape[:2] != (th, tw):  # resize=pil
        out = np.asarray(Image.fromarray(out).resize((tw, th), Image.BICUBIC))
    return out


def content_prompt_used(content_prompt: str, cfg: InferConfig) -> str:
    """The content prompt the model sees: the caption, a space, the added prompt (as the official script)."""
    return f"{content_prompt.strip()} {cfg.added_prompt}".strip()


def prompt_embeddings(modules, content_prompt: str, quality_prompt: str, cfg: InferConfig,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
    """(content, quality) embeddings, batched [negative; positive] with CFG, only the positive without it
    (``guidance_scale <= 1`` or ``mode=onestep``); the added prompt follows a space (official script)."""
    dtype = compute_dtype(modules.unet)  # fp8-stored weights compute in half precision
    content = content_prompt_used(content_prompt, cfg)
    tok, enc = modules.tokenizer, modules.text_encoder
    c = encode_prompts(tok, enc, [cfg.negative_prompt, content], device).to(dtype)
    q = encode_prompts(tok, enc, [cfg.negative_quality_prompt, quality_prompt], device).to(dtype)
    if cfg.guidance_scale <= 1.0 or cfg.mode == "onestep":
        c, q = c[1:], q[1:]
    return c, q


def denoise(modules, lr_cond: torch.Tensor, c: torch.Tensor, q: torch.Tensor, cfg: InferConfig, device,
            generator: torch.Generator, extras: CallExtras | None = None, progress=None) -> torch.Tensor:
    """The multi-step sampler: start latents, then every scheduled step with CFG; returns the final latents."""
    extras = extras if extras is not None else CallExtras()
    scheduler = make_scheduler(cfg.scheduler, modules.scheduler.config, type(modules.scheduler))
    scheduler.set_timesteps(**(extras.schedule or {"num_inference_steps": cfg.num_inference_steps}), device=device)
    latents, timesteps = start_latents(modules, lr_cond, scheduler, scheduler.timesteps, cfg, generator, device,
                                       given=extras.latents)
    extras.num_timesteps = len(timesteps)
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        if extras.interrupted():  # diffusers' pipe.interrupt: the remaining steps are skipped
            break
        model_in = scheduler.scale_model_input(latents, t)
        eps = guided_noise(modules, model_in, t, lr_cond, c, q, cfg)
        # the seeded generator for any step that draws noise (DDPM, SDE DPM-Solver, DDIM with eta > 0)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        latents = scheduler.step(eps, t, latents, **{**step_kwargs, **extras.step_kwargs}).prev_sample
        if extras.on_step_end is not None:
            state = extras.on_step_end(i, t, {"latents": latents, "prompt_embeds": c, "quality_prompt_embeds": q,
                                              "image": lr_cond, "guidance_scale": cfg.guidance_scale})
            latents, c, q, lr_cond = (state[k] for k in ("latents", "prompt_embeds", "quality_prompt_embeds", "image"))
            if state["guidance_scale"] != cfg.guidance_scale:  # e.g. diffusers' SDCFGCutoffCallback
                cfg = dataclasses.replace(cfg, guidance_scale=state["guidance_scale"])
    return latents


def onestep_latents(modules, lr_cond: torch.Tensor, c: torch.Tensor, q: torch.Tensor, cfg: InferConfig,
                    generator: torch.Generator) -> torch.Tensor:
    """One-step XPSR: z_sr = x0(z_lr, UNet(z_lr, t*)) with one UNet + ControlNet call, no CFG, latent tiling as
    the multi-step path (docs/one-step.md)."""
    from xpsr.onestep.objective import predicted_x0

    if cfg.onestep_timestep is None:
        raise ValueError("onestep_latents needs a resolved config (xpsr.inference.trained_settings.resolve_settings)")
    z_lr = lr_latents(modules, lr_cond, cfg, generator)
    timestep = torch.tensor(int(cfg.onestep_timestep), device=z_lr.device)
    out = guided_noise(modules, z_lr, timestep, lr_cond, c, q, dataclasses.replace(cfg, guidance_scale=1.0))
    return predicted_x0(out, z_lr, timestep, modules.scheduler)


@torch.no_grad()
def super_resolve(modules, lr: np.ndarray, content_prompt: str, quality_prompt: str, cfg: InferConfig,
                  device: torch.device, *, generator: torch.Generator | None = None,
                  extras: CallExtras | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None) -> np.ndarray | torch.Tensor:
    """RGB uint8 LR (h, w, 3) -> RGB uint8 SR (h*upscale, w*upscale, 3), by the multi-step sampler or
    (``mode=onestep``) one call of a one-step student. ``cfg``'s mode, t* and LR latent left ``None`` are those
    the weights were trained under (:mod:`xpsr.inference.trained_settings`), so every face runs them alike.

    Hooks for the diffusers face (``XPSRPipeline``), all optional: ``generator`` (a CPU generator) replaces
    the one seeded with ``cfg.seed``; ``extras`` (:class:`CallExtras`): given embeddings/latents, custom
    timesteps, step callback, interruption, and ``decode=False`` to return the final latents instead of an
    image; ``progress`` wraps the timesteps (a progress bar)."""
    cfg = resolve_settings(cfg, settings_of(modules))
    generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    extras = extras if extras is not None else CallExtras()
    (th, tw), _ = output_size(lr.shape[0], lr.shape[1], cfg)
    lr_cond = condition_image(lr, cfg, device, vae_scale_factor(modules.vae))
    if extras.embeds is not None:
        c, q = extras.embeds
    else:
        c, q = prompt_embeddings(modules, content_prompt, quality_prompt, cfg, device)
    if cfg.mode == "onestep":
        latents = onestep_latents(modules, lr_cond, c, q, cfg, generator)
        extras.num_timesteps = 1
        if extras.on_step_end is not None:  # one step, one callback
            state = {"latents": latents, "prompt_embeds": c, "quality_prompt_embeds": q, "image": lr_cond,
                     "guidance_scale": 1.0}
            latents = extras.on_step_end(0, torch.tensor(int(cfg.onestep_timestep)), state)["latents"]
    else:
        latents = denoise(modules, lr_cond, c, q, cfg, device, generator, extras, progress)
    if not extras.decode:
        return latents
    image = (vae_decode(modules.vae, latents, cfg.vae_decoder_tile, **vae_tile_options(cfg)) + 1) / 2
    image = fix_colors(image.clamp(0, 1), lr_cond.float(), cfg.color_fix, cfg.color_fix_8bit)
    return final_resize(image, (th, tw), cfg)
