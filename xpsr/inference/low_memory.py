"""Low-VRAM inference with diffusers' own mechanisms: fp8 storage of the UNet and ControlNet weights with
half-precision compute (``ModelMixin.enable_layerwise_casting``) and CPU offload (``enable_group_offload``:
block by block; ``model``: whole models moved to the GPU only while they run, accelerate's hooks as
``DiffusionPipeline.enable_model_cpu_offload`` uses them). Reachable from `xpsr infer`, `xpsr serve`
(``weights_storage=fp8``, ``offload=group|model``) and ``XPSRPipeline.enable_low_memory``.
"""
from __future__ import annotations

import torch

from xpsr.errors import XPSRError

FP8 = torch.float8_e4m3fn
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: its compute dtype when its weights are stored in fp8, else its weights'."""
    return getattr(model, "_xpsr_compute_dtype", None) or next(model.parameters()).dtype


def apply_low_memory(modules, weights_storage: str, offload: str, dtype: str, device) -> None:
    """After the parts are cast to ``dtype`` (and, without offload, moved to ``device``): fp8 storage of the
    UNet and ControlNet (VAE and text encoder stay in ``dtype``: small, and precision-critical), then offload."""
    if weights_storage == "fp8":
        if dtype not in HALF:
            raise XPSRError(f"weights_storage=fp8 computes in half precision: set dtype=bf16 or fp16 (not {dtype})")
        for model in (modules.unet, modules.controlnet):
            model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=HALF[dtype])
            model._xpsr_compute_dtype = HALF[dtype]
    parts = [modules.text_encoder, modules.vae, modules.controlnet, modules.unet]
    device = torch.device(device)
    if offload == "group":
        for model in parts:
            if hasattr(model, "enable_group_offload"):  # diffusers models: block by block
                model.to("cpu")
                model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                           offload_type="block_level", num_blocks_per_group=1)
            else:  # the transformers text encoder: whole, as offload=model
                _model_offload([model], device)
    elif offload == "model":
        _model_offload(parts, device)


def _model_offload(parts: list[torch.nn.Module], device: torch.device) -> None:
    """Each part on the CPU until its forward runs; the previous part goes back when the next one starts."""
    from accelerate import cpu_offload_with_hook

    hook = None
    for model in parts:
        model.to("cpu")
        _, hook = cpu_offload_with_hook(model, device, prev_module_hook=hook)
