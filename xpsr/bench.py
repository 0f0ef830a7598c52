"""Timing of one XPSR training step (forward + backward + AdamW) for a model preset and resolution."""
from __future__ import annotations

import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from xpsr.config import BenchConfig, ModelConfig
from xpsr.models.build import XPSRModules, build_xpsr, trainable_parameters
from xpsr.models.dfc import dfc_loss
from xpsr.models.forward import predict_noise

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_for_bench(cfg: BenchConfig, device: torch.device) -> tuple[XPSRModules, int]:
    model_cfg = ModelConfig(base="tiny", fusion_mode=cfg.fusion_mode, gradient_checkpointing=cfg.gradient_checkpointing,
                            seed=cfg.seed)
    if cfg.preset == "tiny":
        model_cfg.conditioning_channels = [8, 16, 16, 32]
        modules = build_xpsr(model_cfg)
        width = modules.unet.config.cross_attention_dim
    else:
        from xpsr.models.presets import TEXT_WIDTH, build_random_sd

        modules = build_random_sd(cfg.preset, model_cfg, device=device)
        width = TEXT_WIDTH[cfg.preset]
    for m in (modules.unet, modules.controlnet, modules.vae):
        m.to(device)
    if cfg.dtype != "fp32":  # frozen weights in half precision, trainable master weights stay fp32
        for m in (modules.unet, modules.vae):
            m.to(DTYPES[cfg.dtype])
        for p in trainable_parameters(modules.unet, modules.controlnet).values():
            p.data = p.data.float()
    return modules, width


def run_bench(cfg: BenchConfig) -> dict:
    """Build the preset, run ``warmup`` + ``steps`` training steps on random data, return timings as a dict."""
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    modules, width = build_for_bench(cfg, device)
    build_s = time.perf_counter() - t0
    unet, controlnet, vae = modules.unet, modules.controlnet, modules.vae
    controlnet.train()
    params = list(trainable_parameters(unet, controlnet).values())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if cfg.compile:
        unet, controlnet = torch.compile(unet), torch.compile(controlnet)
    b, r = cfg.batch_size, cfg.resolution
    hr = torch.rand(b, 3, r, r, device=device) * 2 - 1
    lr_cond = torch.rand(b, 3, r, r, device=device)
    content = torch.randn(b, 77, width, device=device)
    quality = torch.randn(b, 77, width, device=device)
    scaling = vae.config.scaling_factor
    amp = cfg.dtype != "fp32"

    def step() -> float:
        with torch.no_grad(), torch.autocast(device.type, dtype=DTYPES[cfg.dtype], enabled=amp):
            latents = vae.encode(hr.to(vae.dtype)).latent_dist.sample() * scaling
        latents = latents.float()
        noise = torch.randn_like(latents)
        t = torch.randint(0, modules.scheduler.config.num_train_timesteps, (b,), device=device)
        noisy = modules.scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=DTYPES[cfg.dtype], enabled=amp):
            pred, control = predict_noise(unet, controlnet, noisy, t, content, quality, lr_cond)
            loss = F.mse_loss(pred.float(), noise)
            loss = loss + dfc_loss(control.pixel_rgbs, control.latent_preds, hr, latents).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(cfg.warmup):
        step()
    times = []
    for _ in range(cfg.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t1)
    result = {
        "what": "train_step", "preset": cfg.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": cfg.dtype, "resolution": r, "batch_size": b, "gradient_checkpointing": cfg.gradient_checkpointing,
        "compile": cfg.compile, "fusion_mode": cfg.fusion_mode, "steps": cfg.steps,
        "step_s_mean": statistics.mean(times), "step_s_min": min(times),
        "step_s_std": statistics.pstdev(times), "images_per_s": b / statistics.mean(times), "build_s": build_s,
        "trainable_params": sum(p.numel() for p in params), "torch": torch.__version__,
        "text_encoder": "excluded (random prompt embeddings)",
    }
    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result
