"""The model a plan runs: built on the meta device (no memory, seconds), cast as `xpsr train`/`xpsr infer`
cast it, then every parameter and buffer replaced by a fake CPU tensor of the same shape and dtype.

Why this order: inside ``FakeTensorMode`` ``Module.to(dtype)`` fails ("Couldn't swap ..."), so the casts happen
on meta tensors, before any fake tensor exists. Fake *CPU* rather than fake CUDA tensors because a backward
on fake CUDA tensors needs a CUDA context (docs/gpu-memory.md lists what the CPU choice changes).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from xpsr.config import ModelConfig
from xpsr.models.build import DTYPES, XPSRModules, build_xpsr, trainable_parameters

# SD 1.5's layout (4 levels, 2 layers per block, the same block types, heads, text width and VAE layout) at a
# fifth of the UNet's and a quarter of the VAE's channels: what the CPU validation runs for real in seconds.
NARROW_UNET = {"block_out_channels": (64, 128, 256, 256)}
NARROW_VAE = {"block_out_channels": (32, 64, 128, 128)}


def build_modules(preset: str, model_cfg: ModelConfig, device: str = "meta", with_text: bool = True) -> XPSRModules:
    """XPSR at ``preset`` shapes (tiny, sd15, sd21, sd15-narrow) on ``device``, injected and frozen like the real
    build (random weights: a plan needs shapes only)."""
    cfg = dataclasses.replace(model_cfg, base="tiny")
    with torch.device(device):
        if preset == "tiny":
            modules = build_xpsr(cfg)
        elif preset == "sd15-narrow":
            modules = _narrow_sd(cfg, device)
        else:
            from xpsr.models.presets import build_random_sd

            modules = build_random_sd(preset, cfg, device=device, with_text=with_text)
    # the scheduler's tables are data the step reads (add_noise), not GPU-sized: real CPU tensors
    modules.scheduler = type(modules.scheduler).from_config(modules.scheduler.config)
    return modules


def meta_modules(preset: str, model_cfg: ModelConfig, with_text: bool = True) -> XPSRModules:
    return build_modules(preset, model_cfg, "meta", with_text)


def _narrow_sd(cfg: ModelConfig, device: str) -> XPSRModules:
    from unittest import mock

    from xpsr.models import presets

    unet = dict(presets.UNET_CONFIGS["sd15"], **NARROW_UNET)
    vae = dict(presets.SD_VAE, **NARROW_VAE)
    with mock.patch.dict(presets.UNET_CONFIGS, {"sd15": unet}), mock.patch.object(presets, "SD_VAE", vae):
        return presets.build_random_sd("sd15", cfg, device=device, with_text=True)


def cast_for_training(modules: XPSRModules, mixed_precision: str, frozen_unet_dtype: str,
                      text_encoder_device: str = "same") -> None:
    """As ``xpsr.training.loop.build_session``: the VAE and text encoder (and with
    ``frozen_unet_dtype=mixed_precision`` the UNet) stored in half precision, trainable weights in fp32; a text
    encoder kept on the CPU stays fp32."""
    dtype = DTYPES[mixed_precision]
    half = [modules.vae] + ([modules.text_encoder] if text_encoder_device == "same" else []) + \
        ([modules.unet] if frozen_unet_dtype == "mixed_precision" else [])
    if dtype != torch.float32:
        for m in half:
            if m is not None:
                m.to(dtype=dtype)
    for p in trainable_parameters(modules.unet, modules.controlnet).values():
        p.data = p.data.float()


def cast_for_inference(modules: XPSRModules, dtype: str) -> None:
    """As ``xpsr infer``: every part in the inference dtype."""
    for m in (modules.unet, modules.controlnet, modules.vae, modules.text_encoder):
        if m is not None:
            m.to(dtype=DTYPES[dtype])
            m.eval()


def materialize(roots: list[nn.Module | None]) -> None:
    """Replace every meta parameter/buffer of ``roots`` by an empty tensor of the current default device and
    mode (a fake CPU tensor inside ``FakeTensorMode``); shared parameters stay shared."""
    memo: dict[int, torch.Tensor] = {}
    for root in roots:
        if root is None:
            continue
        for m in root.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    if id(t) not in memo:
                        new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                        if isinstance(t, nn.Parameter):
                            new = nn.Parameter(new, requires_grad=t.requires_grad)
                        memo[id(t)] = new
                    store[name] = memo[id(t)]
