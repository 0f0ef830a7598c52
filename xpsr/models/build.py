"""Build the XPSR model: load the Stable Diffusion parts, derive the ControlNet, inject, freeze.

Order matters (each step has a test):
1. ``ControlNetModel.from_unet`` on the *stock* UNet (before any injection, so the ControlNet copies
   only pretrained weights);
2. inject SFA into the ControlNet (and optionally the UNet), DFC heads, pixel attention;
3. enable gradient checkpointing *after* injection so that the new modules are covered too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from torch import nn

from xpsr.config import ModelConfig
from xpsr.models.controlnet import XPSRControlNet, as_xpsr_controlnet
from xpsr.models.pixel_attention import as_xpsr_unet, inject_pixel_attention
from xpsr.models.sfa import has_sfa, inject_sfa

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # config names -> torch

REQUIRED = {
    "unet": (["config.json"], ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                               "diffusion_pytorch_model.fp16.safetensors"]),
    "vae": (["config.json"], ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                              "diffusion_pytorch_model.fp16.safetensors"]),
    "text_encoder": (["config.json"], ["model.safetensors", "pytorch_model.bin", "model.fp16.safetensors"]),
    "tokenizer": ([], ["vocab.json", "tokenizer.json"]),
    "scheduler": (["scheduler_config.json"], []),
}


class MissingWeightsError(FileNotFoundError):
    """A base-model folder lacks parts; the message lists them and how to get them."""


@dataclass
class XPSRModules:
    """Everything the stages need; ``unet``/``controlnet`` carry the XPSR additions (a one-step student's
    ``unet`` also the settings it was trained under: ``xpsr.models.checkpoint.STUDENT_SETTINGS``)."""

    unet: UNet2DConditionModel
    controlnet: XPSRControlNet
    vae: AutoencoderKL
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: DDPMScheduler
    config: ModelConfig


def vae_scale_factor(vae) -> int:
    """Pixels per latent along a side, from the VAE's config (diffusers' convention: one 2x downsampler
    between consecutive blocks)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_base_folder(folder: Path) -> None:
    """Raise :class:`MissingWeightsError` listing every missing file of a diffusers SD folder."""
    problems = []
    for sub, (needed, one_of) in REQUIRED.items():
        d = folder / sub
        if not d.is_dir():
            problems.append(f"{sub}/ (folder missing)")
            continue
        problems += [f"{sub}/{name}" for name in needed if not (d / name).is_file()]
        if one_of and not any((d / w).is_file() for w in one_of):
            what = "weights" if sub != "tokenizer" else "vocabulary"
            problems.append(f"{sub}/ {what} (one of {', '.join(one_of)})")
    if problems:
        raise MissingWeightsError(
            f"base model folder {folder} is incomplete; missing:\n  " + "\n  ".join(problems)
            + "\nGet a diffusers-format Stable Diffusion 1.5 or 2.1-base folder, e.g. on a machine with network:\n"
            "  hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR "
            "--include 'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*'\n"
            "then pass model.base=DIR (or model.base=tiny for the built-in test model)."
        )


def load_base(base: str, revision: str | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Load unet, vae, text_encoder, tokenizer and scheduler from a local folder or a hub id."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(base).expanduser()
    looks_local = path.exists() or base.startswith((".", "/", "~")) or base.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise MissingWeightsError(f"base model folder {path} does not exist (model.base={base!r})")
        check_base_folder(path)
        source, extra = str(path), {}
    else:
        source, extra = base, {"revision": revision}
    try:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **extra),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **extra),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype,
                                                          **extra),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **extra),
            "scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler", **extra),
        }
    except OSError as e:
        if looks_local:
            raise
        raise MissingWeightsError(
            f"could not load {base!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0]}). Without network, "
            "download the folder elsewhere and pass model.base=/path/to/folder."
        ) from e
    return parts


def check_conditioning_factor(cfg: ModelConfig, vae: AutoencoderKL) -> None:
    """The ControlNet's conditioning embedding must shrink the LR condition to the latent size: it has one
    stride-2 stage per ``conditioning_channels`` entry after the first, so it needs log2(factor) + 1 entries."""
    factor, widths = vae_scale_factor(vae), list(cfg.conditioning_channels)
    if 2 ** (len(widths) - 1) != factor:
        from xpsr.config import ConfigError

        n = factor.bit_length()
        raise ConfigError(
            f"model.conditioning_channels={widths} shrinks the condition {2 ** (len(widths) - 1)}x, but the VAE of "
            f"model.base={cfg.base!r} makes latents {factor}x smaller than the image: give {n} widths "
            f"(e.g. {[8 * 2 ** min(i, 2) for i in range(n)]})")


def inject_controlnet(controlnet: ControlNetModel, cfg: ModelConfig) -> XPSRControlNet:
    """SFA (``cfg.fusion_mode``) and the DFC heads into a stock ControlNet, in place. Fresh weights come
    from the global RNG: :func:`inject_xpsr` seeds it; a loader that overwrites every weight need not."""
    inject_sfa(controlnet, cfg.fusion_mode, down_blocks=cfg.sfa_down_blocks, mid=cfg.sfa_mid)
    return as_xpsr_controlnet(controlnet, pixel_heads=cfg.dfc_pixel_heads, latent=cfg.dfc_latent_heads,
                              rrdb=cfg.rrdb)


def inject_unet(unet: UNet2DConditionModel, cfg: ModelConfig) -> UNet2DConditionModel:
    """Optional UNet SFA and the pixel-aware attentions into a stock UNet, in place (RNG as above)."""
    if cfg.unet_sfa:
        n_up = len(unet.up_blocks)
        inject_sfa(unet, cfg.fusion_mode, down_blocks=None, mid=True, up_blocks=range(n_up))
        unet = as_xpsr_unet(unet)
    if cfg.pixel_attention:
        unet = inject_pixel_attention(unet, init=cfg.pixel_attention_init)
    return unet


def apply_gradient_checkpointing(model: nn.Module, cfg: ModelConfig) -> None:
    """After injection, so the new modules are checkpointed too (re-applied if set before)."""
    if cfg.gradient_checkpointing or model.is_gradient_checkpointing:
        model.enable_gradient_checkpointing()


def inject_xpsr(unet: UNet2DConditionModel, controlnet: ControlNetModel, cfg: ModelConfig):
    """Add every XPSR module ``cfg`` asks for to a stock UNet/ControlNet pair (in place); returns both."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # fresh XPSR weights are reproducible for a given seed
        controlnet = inject_controlnet(controlnet, cfg)
        unet = inject_unet(unet, cfg)
    for model in (unet, controlnet):
        apply_gradient_checkpointing(model, cfg)
    return unet, controlnet


def unet_trainable_names(unet: nn.Module) -> list[str]:
    """UNet parameter names that train: pixel attentions and any SFA branches; the rest stays frozen.
    A one-step student's LoRA weights (xpsr.onestep) are listed too, so our trained-weights files carry them."""
    names = []
    for name, _ in unet.named_parameters():
        if ".pixel_attentions." in name or ".quality_transformer." in name or ".fusion_transformer." in name:
            names.append(name)
        elif ".lora_A." in name or ".lora_B." in name:
            names.append(name)
    return names


def trainable_parameters(unet: nn.Module, controlnet: nn.Module) -> dict[str, nn.Parameter]:
    """``{"controlnet.x": p, "unet.y": p}`` for every parameter that trains."""
    params = {f"controlnet.{n}": p for n, p in controlnet.named_parameters()}
    unet_params = dict(unet.named_parameters())
    params.update({f"unet.{n}": unet_params[n] for n in unet_trainable_names(unet)})
    return params


def freeze_for_training(modules: XPSRModules) -> dict[str, nn.Parameter]:
    """Freeze everything but the trainable set, which is kept in fp32; returns the trainable set."""
    for model in (modules.unet, modules.vae, modules.text_encoder, modules.controlnet):
        if model is not None:  # the random-weight benchmark presets have no text encoder
            model.requires_grad_(False)
    trainable = trainable_parameters(modules.unet, modules.controlnet)
    for p in trainable.values():
        p.requires_grad_(True)
        p.data = p.data.float()  # master weights in fp32 even when the frozen parts run in half precision
    return trainable


def build_xpsr(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> XPSRModules:
    """Load ``cfg.base`` (or the tiny preset), derive the ControlNet, inject XPSR, freeze."""
    if cfg.base == "tiny":
        from xpsr.models.tiny import build_tiny_base

        parts = build_tiny_base(seed=cfg.seed)
    else:
        parts = load_base(cfg.base, cfg.revision, dtype=dtype)
    unet = parts["unet"]
    check_conditioning_factor(cfg, parts["vae"])
    if has_sfa(unet):
        raise ValueError("ControlNet must be derived from the stock UNet, before any injection")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the conditioning embedding is initialised at random
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(
            cfg.conditioning_channels))
    unet, controlnet = inject_xpsr(unet, controlnet, cfg)
    modules = XPSRModules(unet=unet, controlnet=controlnet, vae=parts["vae"], text_encoder=parts["text_encoder"],
                          tokenizer=parts["tokenizer"], scheduler=parts["scheduler"], config=cfg)
    freeze_for_training(modules)
    return modules


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_summary(modules: XPSRModules) -> str:
    """A short table of parameter counts per part (what `xpsr demo` prints for now)."""
    trainable = trainable_parameters(modules.unet, modules.controlnet)
    groups = {
        "ControlNet (base copy)": lambda k: k.startswith("controlnet.") and "_transformer." not in k
        and "dfc_" not in k and "to_rgbs" not in k and "preprocessor" not in k,
        "ControlNet SFA branches": lambda k: k.startswith("controlnet.") and "_transformer." in k,
        "DFC heads (pixel + latent)": lambda k: "dfc_" in k or "to_rgbs" in k or "preprocessor" in k,
        "UNet pixel attentions": lambda k: ".pixel_attentions." in k,
        "UNet SFA branches": lambda k: k.startswith("unet.") and "_transformer." in k,
    }
    lines = [f"XPSR model (base={modules.config.base}, fusion_mode={modules.config.fusion_mode})",
             f"{'part':<30}{'parameters':>14}"]
    for title, pred in groups.items():
        n = sum(p.numel() for k, p in trainable.items() if pred(k))
        lines.append(f"{title:<30}{n:>14,}")
    for title, model in (("UNet (all, incl. additions)", modules.unet), ("VAE (frozen)", modules.vae),
                         ("text encoder (frozen)", modules.text_encoder)):
        lines.append(f"{title:<30}{count_parameters(model):>14,}")
    lines.append(f"{'trainable total':<30}{sum(p.numel() for p in trainable.values()):>14,}")
    return "\n".join(lines)
