"""LoRA adapters (peft) on the UNet: where they go, switching between them, saving, merging.

The UNet carries up to two adapters: ``student`` (the one-step generator) and ``fake`` (the fake score model of
the VSD regulariser). With adapters disabled it is the frozen teacher's UNet. Adapters go only on the stock
UNet's modules named in ``lora_targets``; the XPSR pixel attentions and SFA branches keep their names, so our
trained-weights format (which stores them) is unchanged, and the LoRA weights are stored beside them.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from xpsr.config import OneStepConfig

STUDENT, FAKE = "student", "fake"
XPSR_PARTS = (".pixel_attentions.", ".quality_transformer.", ".fusion_transformer.")


def lora_module_names(unet: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the UNet's Linear/Conv2d modules whose name ends with one of ``targets``, outside the
    XPSR additions (sorted)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    for name, module in unet.named_modules():
        if ".lora_" in name or name.endswith(".base_layer"):  # inside a layer that already has an adapter
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d, BaseTunerLayer)) or any(p in f".{name}." for p in XPSR_PARTS):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise ValueError(f"onestep.lora_targets={targets} match no Linear/Conv2d module of the UNet")
    return sorted(names)


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def attach_adapter(unet: nn.Module, name: str, rank: int, alpha: float, targets: list[str], seed: int) -> None:
    """Add a LoRA adapter ``name`` (A: peft's Kaiming init from ``seed``, B: zeros, so the UNet is unchanged)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_module_names(unet, targets),
                        init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # two adapters is the design
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=name)


def attach_onestep(unet: nn.Module, cfg: OneStepConfig, seed: int) -> None:
    """The student adapter, and the fake score model's when the VSD term is on; the student is active."""
    attach_adapter(unet, STUDENT, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed)
    if cfg.vsd_weight > 0:
        attach_adapter(unet, FAKE, cfg.fake_lora_rank, cfg.fake_lora_rank, cfg.lora_targets, seed + 1)
    set_active(unet, STUDENT)


def set_active(unet: nn.Module, name: str | None) -> None:
    """Run the UNet with adapter ``name`` only, or with none (the teacher's UNet) for ``None``.

    Sets peft's per-layer flags directly: peft's own ``set_adapter``/``enable_adapters`` also change
    ``requires_grad``, which must not change between a forward and its backward."""
    for layer in _tuner_layers(unet):
        layer._disable_adapters = name is None
        if name is not None:
            layer._active_adapter = [name]


@contextmanager
def active(unet: nn.Module, name: str | None):
    """``set_active(name)`` inside the block, the student again after it."""
    set_active(unet, name)
    try:
        yield
    finally:
        set_active(unet, STUDENT)


def adapter_parameters(unet: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """``{"unet.<key>": p}`` of adapter ``name``'s LoRA weights."""
    return {f"unet.{k}": p for k, p in unet.named_parameters()
            if f".lora_A.{name}." in k or f".lora_B.{name}." in k}


def save_adapter(unet: nn.Module, folder: str | Path, name: str = STUDENT) -> Path:
    """peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys without the adapter name)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(unet, adapter_name=name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    config = unet.peft_config[name].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return folder


def load_adapter(unet: nn.Module, folder: str | Path, name: str = STUDENT) -> None:
    """Add adapter ``name`` from a folder written by :func:`save_adapter` (its config, then its weights)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder} is not a LoRA adapter folder: {f} is missing")
    config = LoraConfig(**{k: v for k, v in json.loads((folder / "adapter_config.json").read_text()).items()
                           if k in LoraConfig.__dataclass_fields__})
    unet.add_adapter(config, adapter_name=name)
    result = set_peft_model_state_dict(unet, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise KeyError(f"{folder}: adapter weights that fit no layer: {result.unexpected_keys[:5]}")
    set_active(unet, STUDENT)


def drop_adapter(unet: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (inference has no use for the fake score model)."""
    if name in getattr(unet, "peft_config", {}):
        unet.delete_adapters(name)
        set_active(unet, STUDENT)


def has_student(unet: nn.Module) -> bool:
    return STUDENT in (getattr(unet, "peft_config", None) or {})


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold the student adapter into the UNet's weights and remove every adapter: a plain XPSR UNet whose
    one-step output equals the unmerged one (up to float rounding; pinned by a test)."""
    if not has_student(unet):
        raise ValueError("merge_lora: the UNet has no student LoRA adapter (not one-step weights)")
    drop_adapter(unet, FAKE)
    unet.fuse_lora(adapter_names=[STUDENT])
    unet.unload_lora()
    return unet
