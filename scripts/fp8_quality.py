#!/usr/bin/env python
"""The quality cost of fp8 weight storage (docs/gpu-memory.md): PSNR of the SR image with the UNet and
ControlNet stored in fp8 (computed in bf16) against the bf16 image, and the weight bytes saved.

    python scripts/fp8_quality.py tiny sd15-narrow           # random weights (zero-inits filled), CPU, minutes
    python scripts/fp8_quality.py sd15 --lr-side 16 --steps 2   # SD 1.5 at full width: bf16 is slow on CPU
    python scripts/fp8_quality.py demo --demo-dir xpsr_demo  # the demo's trained prior (made there if missing)
"""
import argparse
import json

import numpy as np
import torch

from xpsr.config import InferConfig, ModelConfig
from xpsr.inference.low_memory import apply_low_memory
from xpsr.inference.pipeline import super_resolve
from xpsr.memory.build import build_modules


def weight_bytes(*models) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def demo_modules(folder: str):
    """XPSR on the demo's prior (`xpsr demo`'s 4x VAE and base UNet trained on the bundled photos)."""
    from xpsr.apps.demo import demo_prior
    from xpsr.models.build import build_xpsr

    base = demo_prior(folder, log=lambda _: None)
    return build_xpsr(ModelConfig(base=str(base), conditioning_channels=[8, 16, 32]))


def demo_photo(side: int) -> np.ndarray:
    """A bundled photo, resized to ``side`` x ``side`` (the trained prior is measured on a real picture)."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from xpsr.training.demo_data import write_sample_photos

    with tempfile.TemporaryDirectory() as tmp:
        path = sorted(write_sample_photos(Path(tmp)))[0]
        return np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC))


def measure(preset: str, lr_side: int = 64, steps: int = 4, demo_dir: str = "xpsr_demo") -> dict:
    modules = demo_modules(demo_dir) if preset == "demo" else build_modules(preset, ModelConfig(), device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised XPSR weights get noise, so every path is in the comparison
        for p in list(modules.unet.parameters()) + list(modules.controlnet.parameters()):
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    for m in (modules.unet, modules.controlnet, modules.vae, modules.text_encoder):
        m.eval().to(dtype=torch.bfloat16)
    cfg = InferConfig(input="-", output_dir="-", num_inference_steps=steps, process_size=lr_side * 4, dtype="bf16")
    lr = demo_photo(lr_side) if preset == "demo" else \
        np.random.default_rng(0).integers(0, 255, (lr_side, lr_side, 3), dtype=np.uint8)
    ref = super_resolve(modules, lr, "a photo of a cat", "blurry, noisy", cfg, torch.device("cpu"))
    before = weight_bytes(modules.unet, modules.controlnet)
    apply_low_memory(modules, "fp8", "none", "bf16", "cpu")
    out = super_resolve(modules, lr, "a photo of a cat", "blurry, noisy", cfg, torch.device("cpu"))
    mse = np.mean((out.astype(np.float64) - ref.astype(np.float64)) ** 2)
    return {"preset": preset, "output_px": lr_side * 4, "steps": steps,
            "psnr_fp8_vs_bf16_db": round(float(10 * np.log10(255**2 / mse)) if mse else float("inf"), 2),
            "unet_controlnet_weights_bf16_gib": round(before / 2**30, 3),
            "unet_controlnet_weights_fp8_gib": round(weight_bytes(modules.unet, modules.controlnet) / 2**30, 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", default=["tiny"],
                        help="tiny, sd15-narrow, sd15 (random weights), demo (the demo's trained prior)")
    parser.add_argument("--demo-dir", default="xpsr_demo", help="an `xpsr demo` output folder (its prior is made "
                                                                "there when missing)")
    parser.add_argument("--lr-side", type=int, default=64, help="LR input side in px (output = 4x)")
    parser.add_argument("--steps", type=int, default=4, help="DDPM steps (with CFG)")
    args = parser.parse_args()
    for preset in args.presets:
        print(json.dumps(measure(preset, args.lr_side, args.steps, args.demo_dir)), flush=True)
