"""Schemas of ``xpsr demo`` and its stand-in prior."""
from __future__ import annotations

from dataclasses import dataclass, field

from xpsr.config.model import ModelConfig
from xpsr.config.rules import SEED, choice, doc


@dataclass
class DemoPriorConfig:
    """The demo's stand-in for Stable Diffusion: a tiny VAE and base UNet pre-trained on the bundled photos."""

    vae_steps: int = doc(400, "VAE training steps (reconstruction of random photo crops)")
    unet_steps: int = doc(600, "base-UNet training steps (denoising the VAE's latents of random photo crops)")
    batch_size: int = doc(8, "crops per step of both stages")
    vae_crop: int = doc(32, "HR crop size in pixels of the VAE stage")
    unet_crop: int = doc(64, "HR crop size in pixels of the UNet stage (latents are crop / 4)")
    vae_learning_rate: float = doc(1e-3, "peak AdamW learning rate of the VAE stage (warm-up, then cosine to 0)")
    unet_learning_rate: float = doc(5e-4, "peak AdamW learning rate of the UNet stage (warm-up, then cosine to 0)")
    reuse: bool = doc(True, "reuse OUTPUT_DIR/prior when it was made with the same settings and photos")


@dataclass
class DemoConfig:
    """`xpsr demo`: the whole pipeline on bundled photos with the tiny model, on CPU, into one HTML report."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(conditioning_channels=[8, 16, 32]))
    prior: DemoPriorConfig = field(default_factory=DemoPriorConfig)
    output_dir: str = doc("xpsr_demo", "where pairs, prompts, the run, SR images, metrics and report.html go",
                          nonempty=True)
    train_steps: int = doc(300, "XPSR training steps of the tiny model (on top of the prior)", min=1)
    learning_rate: float = doc(1e-3, "AdamW learning rate of the XPSR stage (tiny model, few steps: higher than "
                                     "the paper's 5e-5)", above=0)
    crop_size: int = doc(64, "HR crop size of the demo pairs", min=16, multiple_of=8)
    inference_steps: int = doc(20, "denoising steps when super-resolving the held-out images", min=1)
    start_from: str = choice("sdedit", ("lr", "sdedit", "noise"), "initial latent of the held-out SR (see `infer`)")
    added_noise_level: int = doc(400, "timestep the held-out SR starts from (see `infer`)", min=0, max=999)
    guidance_scale: float = doc(3.0, "classifier-free guidance of the held-out SR", min=0)
    seed: int = doc(0, "seed of everything", **SEED)
