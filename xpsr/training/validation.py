"""Validation during training: super-resolve a few fixed pairs, save an LR | SR | HR grid, log it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xpsr.data.images import load_rgb, save_png_atomic


def _centre(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) < size:
        return img
    y, x = (h - size) // 2, (w - size) // 2
    return img[y:y + size, x:x + size]


def validation_batch(dataset, num_images: int, crop_size: int):
    """Fixed pairs: the first ``num_images`` of the first folder, centre-cropped; prompts from the dataset."""
    part = dataset.parts[0]
    lrs, hrs, contents, qualities = [], [], [], []
    for i in range(min(num_images, len(part))):
        r = part.records[i]
        hr = _centre(load_rgb(part.folder / r["hr"])[0], crop_size)
        lr = _centre(load_rgb(part.folder / r["lr"])[0], crop_size // part.scale)
        hrs.append(torch.from_numpy(hr.copy()).permute(2, 0, 1).float() / 255)
        lrs.append(torch.from_numpy(lr.copy()).permute(2, 0, 1).float() / 255)
        content, quality, _ = part.prompts[i]
        contents.append(content)
        qualities.append(quality)
    return torch.stack(lrs), torch.stack(hrs), contents, qualities


def grid_image(lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor) -> np.ndarray:
    """Rows of LR (nearest-upsampled) | SR | HR as an RGB uint8 array."""
    lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="nearest")
    rows = [torch.cat([a, b, c], dim=2) for a, b, c in zip(lr_up, sr.cpu(), hr)]
    grid = torch.cat(rows, dim=1).clamp(0, 1)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def validation_infer_config(cfg, scale: int):
    """The InferConfig validation samples with: ``validation.infer_config`` (or the InferConfig defaults),
    then the validation sampling keys, then what the training data fixes (x``scale`` to ``crop_size``,
    the run's seed). Built by the same loader as `xpsr infer`, so a bad key fails here, naming it."""
    from xpsr.config import InferConfig, load_config

    val = cfg.validation
    overrides = [f"scheduler={val.scheduler}", f"num_inference_steps={val.num_inference_steps}",
                 f"guidance_scale={val.guidance_scale}", f"start_from={val.start_from}",
                 f"added_noise_level={val.added_noise_level}", f"color_fix={val.color_fix}",
                 f"upscale={scale}", f"process_size={cfg.data.crop_size}", f"seed={cfg.seed}",
                 "input=validation-pairs", "output_dir=samples"]  # unused: pairs come from the dataset
    if cfg.onestep.enabled:
        overrides += ["mode=onestep", f"onestep_timestep={cfg.onestep.timestep}", f"lr_latent={cfg.onestep.lr_latent}"]
    return load_config(InferConfig, val.infer_config, overrides)


@torch.no_grad()
def run_validation(cfg, modules, dataset, path: Path, accelerator, step: int, ema=None, trainable=None) -> Path:
    """Super-resolve the fixed validation pairs with the inference pipeline (xpsr.inference) and log a grid.
    Runs under the training autocast, so mixed-precision runs validate in mixed precision."""
    from xpsr.inference.pipeline import super_resolve

    val = cfg.validation
    lr, hr, contents, qualities = validation_batch(dataset, val.num_images, cfg.data.crop_size)
    infer = validation_infer_config(cfg, dataset.parts[0].scale)
    use_ema = ema is not None and val.use_ema
    if use_ema:
        ema.swap(trainable)
    was_training = modules.controlnet.training
    modules.controlnet.eval()
    try:
        srs = []
        for i in range(lr.shape[0]):
            lr_u8 = (lr[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            content = contents[i] if cfg.content_prompt == "caption" else ""
            with accelerator.autocast():
                sr = super_resolve(modules, lr_u8, content, qualities[i], infer, accelerator.device)
            srs.append(torch.from_numpy(sr).permute(2, 0, 1).float() / 255)
    finally:
        modules.controlnet.train(was_training)
        if use_ema:
            ema.swap(trainable)
    grid = grid_image(lr, torch.stack(srs), hr)
    save_png_atomic(grid, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption="LR | SR | HR")]}, step=step)
    return path
