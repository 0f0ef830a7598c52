"""Loading and saving the parts of an ``XPSRPipeline`` the way diffusers users do it: a part alone
(``pipe.unet.save_pretrained(d)``, ``XPSRControlNetLoader.from_pretrained(E, subfolder="controlnet")``),
weight variants and shards, and diffusers' pipeline ``device_map`` values.

Each XPSR part carries its model settings twice: as the ``xpsr_config`` attribute the pipeline reads, and as
an ``xpsr`` entry of its diffusers config, so that the part's own ``save_pretrained`` writes them into its
``config.json`` and our loader can rebuild the same modules from that folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xpsr.config import ModelConfig, to_dict
from xpsr.models.checkpoint import build_exported_part, export_diffusers, load_exported_part

MODEL_CONFIG_ATTR = "xpsr_config"  # the ModelConfig travels with the loaded parts
# diffusers passes these to every model loader; they only mean something for what XPSR parts do not do
# (quantization, pickle weights, FlashPack files, accelerate's per-layer placement and disk offload).
REFUSED_LOAD_OPTIONS = {
    "quantization_config": "XPSR parts load unquantized",
    "use_safetensors": "XPSR parts are safetensors only (use_safetensors=False asks for pickle files)",
    "use_flashpack": "XPSR parts are safetensors only",
    "offload_folder": "XPSR parts load whole onto one device",
    "max_memory": "XPSR parts load whole onto one device",
}


def tag_part(model: torch.nn.Module, model_config: ModelConfig) -> None:
    """Attach the model settings to a part: the attribute, and the ``xpsr`` entry its ``save_pretrained`` writes."""
    setattr(model, MODEL_CONFIG_ATTR, model_config)
    if hasattr(model, "register_to_config"):
        model.register_to_config(xpsr=to_dict(model_config))


def part_device(device_map: Any) -> torch.device | None:
    """The one device a part goes to, from the ``device_map`` values diffusers passes to a model loader: None,
    a device (``"cpu"``, ``"cuda:1"``, 0) or ``{"": device}`` (its pipeline ``"balanced"`` placement)."""
    if device_map is None:
        return None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    accelerator = torch.accelerator.current_accelerator()
    if isinstance(device_map, int) and not isinstance(device_map, bool) and accelerator is not None:
        return torch.device(accelerator.type, device_map)
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced", "sequential"):
        try:
            return torch.device(device_map)
        except RuntimeError:  # not a device name: the message below says what is accepted
            pass
    raise ValueError(f"device_map={device_map!r}: an XPSR part loads whole onto one device; pass a device "
                     "('cpu', 'cuda', 'cuda:1'), or device_map='balanced' / a device to XPSRPipeline.from_pretrained")


def _refused(name: str, value: Any) -> bool:
    if name == "use_safetensors":
        return value is False
    if name == "use_flashpack":
        return bool(value)
    return value is not None


def load_part(part: str, folder: str | Path, torch_dtype: torch.dtype | None, subfolder: str | None,
              variant: str | None, device_map: Any, options: dict[str, Any]) -> torch.nn.Module:
    """One XPSR part from a local folder (``subfolder`` of it), strictly, tagged with its model settings."""
    for name, why in REFUSED_LOAD_OPTIONS.items():
        if _refused(name, options.get(name)):
            raise ValueError(f"loading the XPSR {part}: {name}={options[name]!r} is not supported ({why})")
    device = part_device(device_map)
    model, model_config = load_exported_part(Path(folder) / (subfolder or ""), part, torch_dtype, variant)
    tag_part(model, model_config)
    return model if device is None else model.to(device)


def part_config(folder: str | Path, subfolder: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a part folder (diffusers' ``load_config`` for the ``"balanced"`` size estimate)."""
    path = Path(folder) / (subfolder or "") / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not an exported XPSR part: {path} is missing")
    return json.loads(path.read_text())


def empty_part(config: dict[str, Any], part: str) -> torch.nn.Module:
    """The part a config describes, unloaded (diffusers builds it under ``init_empty_weights`` to size it)."""
    return build_exported_part(config, part)[0]


def accelerator_count() -> int:
    return torch.accelerator.device_count() if torch.accelerator.is_available() else 0


def check_pipeline_device_map(device_map: Any) -> None:
    """Before loading: diffusers' pipeline values ("balanced", its accelerator, "cpu") that keep the ControlNet
    and the UNet, which run together at every step, on one device."""
    if device_map == "balanced" and accelerator_count() > 1:
        raise ValueError(f"device_map='balanced' would spread the parts over {accelerator_count()} accelerators; "
                         "XPSR's ControlNet and UNet run together at every step, so they need one device: pass "
                         "device_map='cuda' (or one device), or use pipe.enable_model_cpu_offload()")


def check_parts_together(pipe) -> None:
    """After loading: every model part on one device (a "balanced" map can leave a part that did not fit
    on the CPU)."""
    devices = {str(p.device) for name in ("vae", "text_encoder", "unet", "controlnet")
               for p in getattr(pipe, name).parameters()}
    if len(devices) > 1:
        raise ValueError(f"device_map={pipe.hf_device_map!r} placed the parts on {sorted(devices)}; XPSR runs them "
                         "on one device: pass a device, or use pipe.enable_model_cpu_offload()")


def save_parts(pipe, out: Path, variant: str | None, max_shard_size: int | str | None) -> None:
    """The four model parts and the rest as diffusers lays a pipeline out, with ``variant`` / shards."""
    export_diffusers(out, pipe.unet, pipe.controlnet, to_dict(pipe.xpsr_config), variant, max_shard_size)
    for name in ("vae", "text_encoder"):
        options: dict[str, Any] = {"safe_serialization": True} if name == "vae" else {}
        if max_shard_size is not None:
            options["max_shard_size"] = max_shard_size
        if variant is not None:
            options["variant"] = variant
        getattr(pipe, name).save_pretrained(out / name, **options)
    for name in ("tokenizer", "scheduler"):
        getattr(pipe, name).save_pretrained(out / name)
