"""Full-size Stable Diffusion shapes (random weights) for benchmarks: no download needed for speed."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

from xpsr.config import ModelConfig
from xpsr.models.build import XPSRModules, check_conditioning_factor, freeze_for_training, inject_xpsr
from xpsr.models.tiny import SD_SCHEDULER

_SD_COMMON = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
UNET_CONFIGS = {
    "sd15": dict(_SD_COMMON, cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(_SD_COMMON, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
}
TEXT_WIDTH = {"sd15": 768, "sd21": 1024}
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)


# The text encoders' shapes: CLIP ViT-L/14 (SD 1.5) and OpenCLIP ViT-H/14 cut at its penultimate layer (SD 2.1).
TEXT_CONFIGS = {
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu"),
    "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu"),
}


def build_random_text_encoder(preset: str):
    """(text encoder at the preset's full size with random weights, the offline tokenizer): inference speed
    measured without a download. The tokenizer's small vocabulary does not change the cost per token."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from xpsr.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, projection_dim=TEXT_CONFIGS[preset]["hidden_size"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIGS[preset]))
    return encoder.eval(), tokenizer


def build_random_sd(preset: str, cfg: ModelConfig, device: str | torch.device = "cpu",
                    with_text: bool = False) -> XPSRModules:
    """SD 1.5 / 2.1 shapes with random weights and XPSR injected; ``text_encoder`` is None (training benchmarks
    feed random embeddings) unless ``with_text``."""
    if preset not in UNET_CONFIGS:
        raise ValueError(f"preset {preset!r} is not one of {sorted(UNET_CONFIGS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**UNET_CONFIGS[preset])
            vae = AutoencoderKL(**SD_VAE)
            check_conditioning_factor(cfg, vae)
            controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(
                cfg.conditioning_channels))
            unet, controlnet = inject_xpsr(unet, controlnet, cfg)
        text_encoder, tokenizer = build_random_text_encoder(preset) if with_text else (None, None)
    modules = XPSRModules(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=DDPMScheduler(**SD_SCHEDULER), config=cfg)
    freeze_for_training(modules)
    return modules
