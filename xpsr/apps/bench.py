"""Timing of one XPSR training step (forward + backward + AdamW) for a model preset and resolution."""
from __future__ import annotations

import platform
import resource
import statistics
import time

import torch

from xpsr.config import BenchConfig, ModelConfig
from xpsr.models.build import DTYPES, XPSRModules, build_xpsr, trainable_parameters


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_for_bench(cfg: BenchConfig, device: torch.device, with_text: bool = False) -> tuple[XPSRModules, int]:
    model_cfg = ModelConfig(base="tiny", fusion_mode=cfg.fusion_mode, gradient_checkpointing=cfg.gradient_checkpointing,
                            seed=cfg.seed)
    if cfg.preset == "tiny":
        model_cfg.conditioning_channels = [8, 16, 16, 32]
        modules = build_xpsr(model_cfg)
        width = modules.unet.config.cross_attention_dim
    else:
        from xpsr.models.presets import TEXT_WIDTH, build_random_sd

        modules = build_random_sd(cfg.preset, model_cfg, device=device, with_text=with_text)
        width = TEXT_WIDTH[cfg.preset]
    for m in (modules.unet, modules.controlnet, modules.vae):
        m.to(device)
    if cfg.dtype != "fp32":  # as `xpsr train`: the VAE (and with frozen_unet_dtype=mixed_precision the frozen
        # UNet) stored in half precision; trainable master weights stay fp32
        half = [modules.vae] + ([modules.unet] if cfg.frozen_unet_dtype == "mixed_precision" else [])
        for m in half:
            m.to(DTYPES[cfg.dtype])
        for p in trainable_parameters(modules.unet, modules.controlnet).values():
            p.data = p.data.float()
    return modules, width


def _data_batches(cfg: BenchConfig, tmp: str, device: torch.device):
    """An endless stream of real batches: demo pairs at the bench resolution through the DataLoader."""
    from xpsr.training.dataset import build_dataset
    from xpsr.training.demo_data import make_demo_data

    data_cfg = make_demo_data(tmp, crop_size=cfg.resolution, crops_per_image=1)
    dataset, sampler = build_dataset(data_cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.workers)
    for batch in loader:
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_bench(cfg: BenchConfig) -> dict:
    """One training step's timing (see `_run_bench`), with `deterministic` GPU kernels if asked."""
    from xpsr.training.determinism import deterministic_mode

    with deterministic_mode(cfg.deterministic):
        return _run_bench(cfg)


def _time_calls(fn, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised around
    each timed call; the peak-memory counter is reset first)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t1)
    return times


def _run_bench(cfg: BenchConfig) -> dict:
    """Build the preset and time ``warmup`` + ``steps`` real training steps (xpsr.training.step) + AdamW.

    ``include_data=false``: one random batch reused (model cost only; prompt embeddings precomputed).
    ``include_data=true``: batches come from the DataLoader and prompts go through the text encoder.
    """
    import tempfile

    from xpsr.config import DFCConfig
    from xpsr.training.step import training_step

    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    modules, width = build_for_bench(cfg, device)
    build_s = time.perf_counter() - t0
    if cfg.include_data and modules.text_encoder is None:
        raise ValueError("include_data=true needs a text encoder: use preset=tiny (sd15/sd21 presets have none)")
    params = list(trainable_parameters(modules.unet, modules.controlnet).values())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if modules.text_encoder is not None:
        modules.text_encoder.to(device)
    modules.controlnet.train()
    if cfg.compile:
        import dataclasses

        modules = dataclasses.replace(modules, unet=torch.compile(modules.unet),
                                      controlnet=torch.compile(modules.controlnet))
    b, r = cfg.batch_size, cfg.resolution
    fixed = {"hr": torch.rand(b, 3, r, r, device=device) * 2 - 1, "lr_cond": torch.rand(b, 3, r, r, device=device)}
    content = torch.randn(b, 77, width, device=device)
    quality = torch.randn(b, 77, width, device=device)
    generator = torch.Generator().manual_seed(cfg.seed)
    amp = cfg.dtype != "fp32"
    weight_dtype = DTYPES[cfg.dtype]
    tmp = tempfile.TemporaryDirectory()
    batches = _data_batches(cfg, tmp.name, device) if cfg.include_data else None

    def step() -> float:
        with torch.autocast(device.type, dtype=weight_dtype, enabled=amp):
            if batches is None:
                out = training_step(modules, fixed, DFCConfig(), generator=generator, weight_dtype=weight_dtype,
                                    content_embeds=content, quality_embeds=quality)
            else:
                out = training_step(modules, next(batches), DFCConfig(), generator=generator,
                                    weight_dtype=weight_dtype)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    try:
        times = _time_calls(step, cfg.warmup, cfg.steps, device)
    finally:
        tmp.cleanup()
    result = {
        "what": "train_step", "preset": cfg.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": cfg.dtype, "resolution": r, "batch_size": b, "gradient_checkpointing": cfg.gradient_checkpointing,
        "compile": cfg.compile, "fusion_mode": cfg.fusion_mode, "include_data": cfg.include_data,
        "steps": cfg.steps, "step_s_mean": statistics.mean(times), "step_s_min": min(times),
        "step_s_std": statistics.pstdev(times), "images_per_s": b / statistics.mean(times), "build_s": build_s,
        "trainable_params": sum(p.numel() for p in params), "torch": torch.__version__,
        "frozen_unet_dtype": cfg.frozen_unet_dtype, "deterministic": cfg.deterministic,
        "frozen_unet_weights_mb": sum(p.numel() * p.element_size() for p in modules.unet.parameters()
                                      if not p.requires_grad) / 2**20,
    }
    return result | peak_memory(device)


def peak_memory(device: torch.device) -> dict:
    """The run's peak memory: CUDA's allocator high-water mark, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_infer_bench(cfg: BenchConfig) -> dict:
    """Seconds per image of `super_resolve` for an lr_size x lr_size input (x4 output); ``mode=both``: the
    multi-step sampler, then the one-step student on the same model, with their ratio."""
    if cfg.mode != "both":
        return _infer_bench(cfg, cfg.mode)
    multi, one = _infer_bench(cfg, "multistep"), _infer_bench(cfg, "onestep")
    return {"multistep": multi, "onestep": one,
            "speedup": multi["seconds_per_image"] / one["seconds_per_image"]}


def _infer_bench(cfg: BenchConfig, mode: str) -> dict:
    """Seconds per image and peak memory of `super_resolve` for an lr_size x lr_size input (x4 output)."""
    import numpy as np

    from xpsr.config import InferConfig
    from xpsr.inference.pipeline import super_resolve

    device = _device(cfg.device)
    modules, _ = build_for_bench(cfg, device, with_text=True)
    modules.text_encoder.to(device)
    for m in (modules.unet, modules.controlnet, modules.vae, modules.text_encoder):
        m.eval()
        if cfg.dtype != "fp32":
            m.to(DTYPES[cfg.dtype])
    if mode == "onestep":  # the student as trained: an (untrained) LoRA adapter on the UNet, not merged
        from xpsr.config import OneStepConfig
        from xpsr.onestep.lora import STUDENT, attach_adapter

        ocfg = OneStepConfig()
        attach_adapter(modules.unet, STUDENT, ocfg.lora_rank, ocfg.lora_alpha, ocfg.lora_targets, cfg.seed)
        modules.unet.to(device)
    big = 10**6
    infer = InferConfig(input="-", output_dir="-", mode=mode, lr_latent="mean" if mode == "onestep" else "sample",
                        num_inference_steps=cfg.inference_steps, scheduler="ddim",
                        process_size=64, dtype=cfg.dtype, latent_tile=64 if cfg.tiled else big,
                        vae_tile=512 if cfg.tiled else big, vae_decoder_tile=64 if cfg.tiled else big)
    lr = np.random.default_rng(cfg.seed).integers(0, 255, (cfg.lr_size, cfg.lr_size, 3), dtype=np.uint8)
    times = _time_calls(lambda: super_resolve(modules, lr, "a photo", "blurry and noisy", infer, device),
                        0, max(cfg.steps, 1), device)
    result = {"what": "infer", "mode": mode, "preset": cfg.preset, "device": str(device), "dtype": cfg.dtype,
              "tiled": cfg.tiled,
              "lr_size": cfg.lr_size, "sr_size": cfg.lr_size * 4, "inference_steps": cfg.inference_steps,
              "seconds_per_image": statistics.mean(times), "runs": len(times)}
    return result | peak_memory(device)


def run_flops_bench(cfg: BenchConfig) -> dict:
    """FLOPs per output image (torch's FlopCounterMode: matmuls, convolutions, attention) of the multi-step
    sampler (``inference_steps`` x CFG batch 2 x (ControlNet + UNet)) and of the one-step student (one
    ControlNet + UNet call, batch 1, LoRA merged), each with the text encoder, VAE encode and decode. Built on
    the meta device: shapes only, nothing is computed, so SD-size models cost no memory or time."""
    from torch.utils.flop_counter import FlopCounterMode

    from xpsr.models.forward import predict_noise
    from xpsr.models.presets import TEXT_WIDTH, build_random_sd

    if cfg.preset == "tiny":
        raise ValueError("what=flops counts SD shapes: preset=sd15 or sd21")
    meta = torch.device("meta")
    with torch.device(meta):
        modules = build_random_sd(cfg.preset, ModelConfig(base="tiny", seed=cfg.seed), device=meta, with_text=True)
    size, f, width = cfg.resolution, 8, TEXT_WIDTH[cfg.preset]
    tokens = torch.zeros(1, 77, dtype=torch.long, device=meta)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    def denoiser(batch: int) -> int:
        z = torch.zeros(batch, 4, size // f, size // f, device=meta)
        emb = torch.zeros(batch, 77, width, device=meta)
        cond = torch.zeros(batch, 3, size, size, device=meta)
        t = torch.zeros(batch, dtype=torch.long, device=meta)
        return count(lambda: predict_noise(modules.unet, modules.controlnet, z, t, emb, emb, cond))

    text = count(lambda: modules.text_encoder(tokens))  # one prompt
    encode = count(lambda: modules.vae.encode(torch.zeros(1, 3, size, size, device=meta)))
    decode = count(lambda: modules.vae.decode(torch.zeros(1, 4, size // f, size // f, device=meta)))
    multi_call, one_call = denoiser(2), denoiser(1)
    multi = 4 * text + encode + cfg.inference_steps * multi_call + decode  # 2 prompts x (negative, positive)
    one = 2 * text + encode + one_call + decode
    tera = 1e12
    return {"what": "flops", "preset": cfg.preset, "resolution": size, "inference_steps": cfg.inference_steps,
            "counted": "FlopCounterMode (matmul, conv, attention); one multiply-add = 2 FLOPs",
            "tflops": {"text_encoder_per_prompt": text / tera, "vae_encode": encode / tera, "vae_decode": decode / tera,
                       "controlnet_unet_cfg_batch2": multi_call / tera, "controlnet_unet_batch1": one_call / tera,
                       "multistep_total": multi / tera, "onestep_total": one / tera},
            "ratio_multistep_over_onestep": multi / one}
