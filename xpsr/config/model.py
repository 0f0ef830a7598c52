"""What to build: the base Stable Diffusion parts and the XPSR additions (``model.*`` of every stage)."""
from __future__ import annotations

from dataclasses import dataclass

from xpsr.config.rules import FUSION_MODES, SEED, choice, doc


@dataclass
class ModelConfig:
    """What to build: the base Stable Diffusion parts and the XPSR additions."""

    base: str = doc("tiny", "'tiny' (random tiny model built in code), a local diffusers folder, or a hub id")
    revision: str | None = doc(None, "hub revision when `base` is a hub id")
    fusion_mode: str = choice("sfa", FUSION_MODES, "how content and quality prompts meet (docs/model.md)")
    sfa_down_blocks: list[int] | None = doc(None, "ControlNet down blocks with SFA; null = every cross-attention block",
                                       min=0)
    sfa_mid: bool = doc(True, "SFA in the ControlNet mid block")
    unet_sfa: bool = doc(False, "also put SFA into the UNet's cross-attention blocks (not in the paper)")
    pixel_attention: bool = doc(True, "pixel-aware attention in every UNet up-block layer")
    pixel_attention_init: str = choice("zero", ("zero", "random"),
                                       "'zero': proj_out starts at 0 so the UNet starts unchanged; 'random': official")
    dfc_pixel_heads: bool = doc(True, "RGB side outputs of the conditioning embedding (pixel-space DFC)")
    dfc_latent_heads: bool = doc(True, "one 3x3 conv per ControlNet residual to latent channels (latent-space DFC)")
    rrdb: bool = doc(False, "two RRDBs after the conditioning embedding's first conv, growth = its width, BasicSR's "
                            "0.1-scaled init (official `use_rrdb`)")
    conditioning_channels: list[int] = doc([16, 32, 96, 256], "conditioning-embedding widths; one stride-2 stage "
                                          "per entry after the first, as many as the VAE's (4 entries for SD's 8x)",
                                           min=1, nonempty=True)
    gradient_checkpointing: bool = doc(False, "recompute activations in backward (enabled after injection)")
    seed: int = doc(0, "seed for the tiny preset and for freshly initialised XPSR weights", **SEED)
