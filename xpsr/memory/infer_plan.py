"""The memory plan of one super-resolution: OUR sampler (``xpsr.inference.pipeline``: prompts, the tiled
VAE encode of the LR condition, CFG denoise steps over latent tiles, the tiled VAE decode, the colour fix)
on fake CPU tensors at the chosen output size, counted by :class:`xpsr.memory.tracker.LiveBytes`.

Every denoising step allocates the same tensors, so the plan runs ``min(num_inference_steps, 2)`` of them
(the peak of step 20 is the peak of step 2); the uint8 result on the host is not GPU memory and is left out.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from xpsr.config import InferConfig
from xpsr.memory.build import cast_for_inference, materialize, meta_modules
from xpsr.memory.tracker import LiveBytes


def plan_inference(cfg: InferConfig, preset: str, output_size: int, with_costs: bool = False) -> dict:
    """Peak live bytes of super-resolving one ``output_size`` x ``output_size`` image with ``cfg`` at ``preset``
    shapes (tiny, sd15, sd21): by category, by module, the instant of the peak. Fake tensors: no memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    run = Sampling(cfg, preset, output_size, device="meta")
    tracker = LiveBytes()
    if with_costs:
        tracker.costs = []
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        materialize(list(run.roots.values()))
        tracker.register_module_weights(**run.roots)
        lr_cond = torch.empty(1, 3, *run.size)
        tracker.register(lr_cond, "inputs", "(condition)")
        with tracker, tracker.modules(**run.roots):
            start, end = run.sample(lr_cond, tracker)
    result = tracker.report()
    cfg = run.cfg
    result.update(what="infer", preset=preset, output_size=output_size, processing_size=list(run.size),
                  mode=cfg.mode, dtype=cfg.dtype, num_inference_steps=cfg.num_inference_steps,
                  steps_counted=run.run_cfg.num_inference_steps, latent_tile=cfg.latent_tile, vae_tile=cfg.vae_tile,
                  vae_decoder_tile=cfg.vae_decoder_tile, vae_tile_attention=cfg.vae_tile_attention,
                  vae_tile_cache_mb=cfg.vae_tile_cache_mb, plan_seconds=round(time.perf_counter() - t0, 1))
    if with_costs:  # the steps not run cost what the counted ones cost (the LR encode is counted once: close)
        scale = cfg.num_inference_steps / run.run_cfg.num_inference_steps if cfg.mode == "multistep" else 1
        result["costs"] = [(f * scale, b * scale, h) if start <= i < end else (f, b, h)
                           for i, (f, b, h) in enumerate(tracker.costs)]
    return result


class Sampling:
    """One super-resolution as ``xpsr.inference.pipeline`` runs it, on modules built at ``preset`` shapes and cast
    as `xpsr infer` casts them: on the meta device for the plan, on the CPU with real weights for the check."""

    def __init__(self, cfg: InferConfig, preset: str, output_size: int, device: str):
        from xpsr.inference.pipeline import make_scheduler
        from xpsr.inference.pipeline import output_size as sizes
        from xpsr.inference.tiling import vae_scale_factor
        from xpsr.inference.trained_settings import TrainedSettings, resolve_settings
        from xpsr.memory.build import build_modules

        # weights that say nothing: a plan of mode=onestep is a student's (OneStepConfig's t* and LR latent)
        mode = cfg.mode or "multistep"
        self.cfg = cfg = resolve_settings(cfg, TrainedSettings(mode=mode, source="the plan") if mode == "onestep"
                                          else TrainedSettings())
        model_cfg = dataclasses.replace(cfg.model, gradient_checkpointing=False)
        modules = meta_modules(preset, model_cfg) if device == "meta" else build_modules(preset, model_cfg, device)
        if cfg.mode == "onestep":  # the student's LoRA adapter on the UNet, not merged (as a one-step run saves it)
            from xpsr.config import OneStepConfig
            from xpsr.onestep.lora import STUDENT, attach_adapter

            o = OneStepConfig()
            with torch.device(device):
                attach_adapter(modules.unet, STUDENT, o.lora_rank, o.lora_alpha, o.lora_targets, cfg.seed)
        cast_for_inference(modules, cfg.dtype)
        self.modules = modules
        self.run_cfg = dataclasses.replace(cfg, num_inference_steps=min(cfg.num_inference_steps, 2))
        lr_side = max(output_size // cfg.upscale, 1)
        _, self.size = sizes(lr_side, lr_side, cfg, vae_scale_factor(modules.vae))
        # The scheduler's timesteps stay real tensors: `noise_to` reads one as an int, which a fake tensor refuses.
        self.scheduler = make_scheduler(cfg.scheduler, modules.scheduler.config)
        self.scheduler.set_timesteps(self.run_cfg.num_inference_steps, device="cpu")
        self.roots = dict(unet=modules.unet, controlnet=modules.controlnet, vae=modules.vae,
                          text_encoder=modules.text_encoder)

    def sample(self, lr_cond: torch.Tensor, tracker: LiveBytes) -> tuple[int, int]:
        """The phases of one image (named on ``tracker``); returns the span of the denoising ops in its costs."""
        from xpsr.inference.color import fix_colors
        from xpsr.inference.pipeline import onestep_latents, prompt_embeddings
        from xpsr.inference.tiling import vae_decode, vae_tile_options

        modules, run_cfg, cfg = self.modules, self.run_cfg, self.cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        with tracker.phase("prompts"):
            c, q = prompt_embeddings(modules, "a photo of a cat on a sofa", "noisy, blurry", run_cfg, "cpu")
        start = len(tracker.costs or [])
        with tracker.phase("denoise"):
            if cfg.mode == "onestep":
                latents = onestep_latents(modules, lr_cond, c, q, run_cfg, generator)
            else:
                latents = _denoise(modules, lr_cond, c, q, run_cfg, generator, self.scheduler)
        end = len(tracker.costs or [])
        with tracker.phase("vae_decode"):
            image = (vae_decode(modules.vae, latents, cfg.vae_decoder_tile, **vae_tile_options(cfg)) + 1) / 2
        with tracker.phase("color_fix"):
            fix_colors(image.clamp(0, 1), lr_cond.float(), cfg.color_fix, cfg.color_fix_8bit)
        return start, end


def _denoise(modules, lr_cond, c, q, cfg: InferConfig, generator, scheduler) -> torch.Tensor:
    """``xpsr.inference.pipeline.denoise`` with a scheduler made outside the fake mode (same calls, same order)."""
    from xpsr.inference.pipeline import guided_noise, start_latents

    latents, timesteps = start_latents(modules, lr_cond, scheduler, scheduler.timesteps, cfg, generator, "cpu")
    for t in timesteps:
        eps = guided_noise(modules, scheduler.scale_model_input(latents, t), t, lr_cond, c, q, cfg)
        step_kwargs = {"generator": generator} if cfg.scheduler == "ddpm" else {}
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents
