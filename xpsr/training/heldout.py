"""Noise-prediction error on held-out pairs: does XPSR training teach the ControlNet to use the LR image?

The training loss (epsilon MSE) measured on pairs the model never saw, with the VAE sample, the noise and
the timesteps drawn from one fixed seed, so two models (the frozen prior before XPSR training, and after)
are scored on exactly the same noisy latents. Only the LR condition can tell the model more about the clean
latent than the noisy latent does, so a lower error after training means the ControlNet learned to use it.
Unlike the PSNR of a sampled image it is cheap (one forward per pair and draw) and not hidden by the SDEdit
start, which already carries most of the LR image into the sample.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from xpsr.config import DFCConfig


def load_pairs(test_dir: str | Path, cache: str | Path | None = None) -> dict:
    """``hr`` in [-1, 1], ``lr_cond`` (LR bicubic-upsampled to HR size, as the dataset makes it) in [0, 1] and
    the cached content/quality prompts of a prepared test set (``test_dir/hr``, ``test_dir/lr``)."""
    from xpsr.captions.cache import PromptCache
    from xpsr.data.images import file_hash, list_images, load_rgb

    test_dir = Path(test_dir)
    prompts = PromptCache(str(cache or test_dir / "prompts.sqlite"))
    hrs, conds, content, quality = [], [], [], []
    for lr_path in list_images([test_dir / "lr"]):
        hr = torch.from_numpy(load_rgb(test_dir / "hr" / lr_path.name)[0]).permute(2, 0, 1).float() / 255
        lr = torch.from_numpy(load_rgb(lr_path)[0]).permute(2, 0, 1).float() / 255
        hrs.append(hr * 2 - 1)
        conds.append(F.interpolate(lr[None], size=hr.shape[-2:], mode="bicubic", align_corners=False)[0].clamp(0, 1))
        key = file_hash(lr_path)
        content.append(prompts.lookup(key, "content") or "")
        quality.append(prompts.lookup(key, "quality") or "")
    if not hrs:
        raise FileNotFoundError(f"no LR images in {test_dir / 'lr'}")
    return {"hr": torch.stack(hrs), "lr_cond": torch.stack(conds), "content_prompt": content,
            "quality_prompt": quality}


@torch.no_grad()
def heldout_noise_mse(modules, pairs: dict, draws: int = 8, seed: int = 0) -> float:
    """Mean epsilon MSE over ``draws`` fixed draws (VAE sample, noise, timestep per pair) of ``pairs``."""
    from xpsr.training.step import training_step

    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        out = training_step(modules, pairs, DFCConfig(weight=0.0), generator=generator)
        total += float(out.terms["noise_mse"])
    return total / draws
