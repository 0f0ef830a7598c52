"""The demo's prior: the tiny VAE and base UNet pre-trained on the bundled photos, on CPU, in minutes.

XPSR freezes the VAE and the base UNet and trains a ControlNet (plus small additions) to steer them. In
the paper they are Stable Diffusion's; the demo cannot download those, and with random frozen parts the
ControlNet has nothing to steer and the VAE decoder cannot draw a photo. So the demo makes a small prior
first: a VAE with 4x spatial compression (``DEMO_VAE``) taught to reconstruct crops of the training photos,
then the base UNet (``DEMO_UNET``) taught to denoise that VAE's latents. Both are saved as an ordinary
diffusers base folder, so the XPSR stages load it with ``model.base=FOLDER`` like any Stable Diffusion
folder, and a later demo in the same output directory reuses it (``prior.json`` records what made it).
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xpsr.config import DemoPriorConfig, to_dict

RECIPE_VERSION = 1  # bump when the recipe below changes, so cached priors made by an older one are rebuilt
LOGVAR_INIT = -12.0  # the posterior starts nearly deterministic (std ~ 0.0025), as Stable Diffusion's VAE is


def load_photos(paths: Sequence[Path]) -> list[torch.Tensor]:
    """RGB photos as (3, H, W) float tensors in [-1, 1]."""
    from xpsr.data.images import load_rgb

    return [torch.from_numpy(load_rgb(p)[0]).permute(2, 0, 1).float() / 127.5 - 1 for p in paths]


def random_crops(images: Sequence[torch.Tensor], n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size): crops at random photos and positions, half of them flipped left-right."""
    crops = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=generator))]
        h, w = img.shape[-2:]
        if min(h, w) < size:
            raise ValueError(f"a demo photo of {w}x{h} px is smaller than the prior's {size} px crop")
        y = int(torch.randint(h - size + 1, (1,), generator=generator))
        x = int(torch.randint(w - size + 1, (1,), generator=generator))
        crop = img[:, y:y + size, x:x + size]
        crops.append(crop.flip(-1) if torch.rand(1, generator=generator) < 0.5 else crop)
    return torch.stack(crops)


def build_prior_parts(seed: int) -> dict:
    """The tiny preset with the demo's VAE and UNet in place of the 8x ones (random, deterministic per seed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from xpsr.models.tiny import DEMO_UNET, DEMO_VAE, build_tiny_base

    parts = build_tiny_base(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**DEMO_VAE)
        parts["unet"] = UNet2DConditionModel(**DEMO_UNET)
    with torch.no_grad():  # log-variance rows of the posterior: constant LOGVAR_INIT to start with
        vae.quant_conv.weight[vae.config.latent_channels:] = 0
        vae.quant_conv.bias[vae.config.latent_channels:] = LOGVAR_INIT
    parts["vae"] = vae
    return parts


def _warmup_cosine(params, lr: float, steps: int):
    """AdamW whose learning rate rises linearly over the first 5 % of the steps, then decays to 0 (cosine)."""
    import math

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1))))
    return optimizer, schedule


def train_vae(vae, images: Sequence[torch.Tensor], cfg: DemoPriorConfig, generator: torch.Generator,
              log: Callable[[str], None] = print) -> list[float]:
    """Reconstruction training (MSE + L1/2 on latents sampled from the posterior); returns the losses."""
    optimizer, schedule = _warmup_cosine(vae.parameters(), cfg.vae_learning_rate, cfg.vae_steps)
    vae.train().requires_grad_(True)
    losses = []
    for step in range(1, cfg.vae_steps + 1):
        x = random_crops(images, cfg.batch_size, cfg.vae_crop, generator)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % max(cfg.vae_steps // 4, 1) == 0:
            log(f"prior: VAE step {step}/{cfg.vae_steps}, loss {np.mean(losses[-20:]):.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def latent_scale(vae, images: Sequence[torch.Tensor], generator: torch.Generator, crop: int, n: int = 64) -> float:
    """1 / std of the latents of random crops: scaled latents have unit variance, as SD's 0.18215 gives."""
    z = vae.encode(random_crops(images, n, crop, generator)).latent_dist.mean
    return float(1.0 / z.float().std())


def train_base_unet(parts: dict, images: Sequence[torch.Tensor], prompts: Sequence[str], cfg: DemoPriorConfig,
                    generator: torch.Generator, log: Callable[[str], None] = print) -> list[float]:
    """Epsilon-prediction training of the base UNet on the VAE's scaled latents (uniform timesteps).

    Each sample's text is one of ``prompts`` at random: the tiny text encoder is random, so the prior learns
    to ignore the prompt rather than to depend on one wording."""
    from xpsr.models.text import encode_prompts

    unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
    embeds = encode_prompts(parts["tokenizer"], parts["text_encoder"], list(prompts), torch.device("cpu"))
    optimizer, schedule = _warmup_cosine(unet.parameters(), cfg.unet_learning_rate, cfg.unet_steps)
    unet.train().requires_grad_(True)
    scale, losses = vae.config.scaling_factor, []
    for step in range(1, cfg.unet_steps + 1):
        x = random_crops(images, cfg.batch_size, cfg.unet_crop, generator)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean * scale
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=generator)
        text = embeds[torch.randint(len(prompts), (len(x),), generator=generator)]
        pred = unet(scheduler.add_noise(latents, noise, t), t, text).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % max(cfg.unet_steps // 4, 1) == 0:
            log(f"prior: base UNet step {step}/{cfg.unet_steps}, loss {np.mean(losses[-20:]):.4f}")
    unet.eval().requires_grad_(False)
    return losses


def _recipe(cfg: DemoPriorConfig, photo_paths: Sequence[Path], prompts: Sequence[str], seed: int) -> dict:
    from xpsr.data.images import file_hash

    settings = {k: v for k, v in to_dict(cfg).items() if k != "reuse"}
    return {"recipe_version": RECIPE_VERSION, "settings": settings, "seed": seed, "prompts": list(prompts),
            "photos": sorted(file_hash(p) for p in photo_paths), "torch": torch.__version__}


def ensure_prior(folder: str | Path, cfg: DemoPriorConfig, photo_paths: Sequence[Path], prompts: Sequence[str],
                 seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Make (or reuse) the prior's diffusers base folder; returns the contents of its ``prior.json``."""
    folder = Path(folder)
    recipe = _recipe(cfg, photo_paths, prompts, seed)
    record = folder / "prior.json"
    if cfg.reuse and record.is_file():
        made = json.loads(record.read_text())
        if made.get("recipe") == recipe:
            log(f"prior: reusing {folder} (made in {made['seconds']} s with the same settings)")
            return made
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = load_photos(photo_paths)
        parts = build_prior_parts(seed)
        vae_losses = train_vae(parts["vae"], images, cfg, generator, log)
        parts["vae"].register_to_config(scaling_factor=latent_scale(parts["vae"], images, generator, cfg.unet_crop))
        unet_losses = train_base_unet(parts, images, prompts, cfg, generator, log)
    made = {"recipe": recipe, "seconds": round(time.perf_counter() - start, 1),
            "scaling_factor": parts["vae"].config.scaling_factor,
            "vae_losses": [round(v, 5) for v in vae_losses], "unet_losses": [round(v, 5) for v in unet_losses]}
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        parts[name].save_pretrained(partial / name)
    (partial / "prior.json").write_text(json.dumps(made, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # a crash leaves the .partial folder, never a half-written prior
    log(f"prior: {folder} made in {made['seconds']} s")
    return made
