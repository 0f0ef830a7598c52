"""Sharded training: FSDP2 (torch's ``fully_shard``) through accelerate's FSDP plugin.

The accelerate config (configs/accelerate/fsdp2_*.yaml) asks for ``fsdp_version: 2`` and wraps each
``BasicTransformerBlock`` (the attentions of the UNet, the ControlNet, SFA and the pixel attentions) as one
FSDP unit; everything else of the UNet and the ControlNet sits in the root unit. Both go into one module,
:class:`TrainedPair`, because accelerate shards one model per ``prepare`` call and maps the optimizer's
parameters by name (two models with the same names would collide). Sharded: the ControlNet, the UNet's
XPSR additions and its frozen base (its weights, once per process under DDP, are split over the ranks).
Replicated: the frozen VAE and text encoder (not part of the pair).

Checkpoints stay our ordinary files: the trainable weights, the AdamW moments and the EMA are gathered
(``DTensor.full_tensor``, every rank takes part) and the main process writes the same trained.safetensors,
optimizer.pt and ema.safetensors as under DDP; a resume loads them whole and shards them again.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from xpsr.errors import XPSRError
from xpsr.models.build import unet_trainable_names
from xpsr.models.forward import predict_noise


class TrainedPair(nn.Module):
    """The UNet and the ControlNet as one module: the unit accelerate prepares for FSDP."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, noisy_latents, timesteps, content_embeds, quality_embeds, lr_cond, conditioning_scale=1.0):
        return predict_noise(self.unet, self.controlnet, noisy_latents, timesteps, content_embeds, quality_embeds,
                             lr_cond, conditioning_scale)


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (`accelerate launch` with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator) -> None:
    """accelerate (1.16) turns a CPU launch into MULTI_CPU and then ignores the FSDP plugin, so a CPU run
    with an FSDP config would silently train with DDP. FSDP2 itself runs on gloo: switch the state to FSDP
    with the plugin the config describes. Only FSDP2 (FSDP1 needs CUDA streams)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise XPSRError(f"the accelerate config asks for FSDP version {plugin.fsdp_version} on the CPU; "
                        "only fsdp_version: 2 runs there (configs/accelerate/fsdp2_cpu_2proc.yaml)")
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a sharded one: every rank must call it)."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().cpu()


def _shard_like(value, param: torch.Tensor):
    """A whole tensor split as ``param`` is (its mesh and placements); other values unchanged."""
    from torch.distributed.tensor import distribute_tensor

    if _is_dtensor(param) and torch.is_tensor(value) and not _is_dtensor(value) and value.shape == param.shape:
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value


def after_prepare(pair: nn.Module, optimizer, old_params: list, trainable: dict, ema) -> dict:
    """After accelerate sharded ``pair``: the trainable set by name (now DTensors), the optimizer state a
    resume loaded before sharding moved onto the new parameters, and the EMA sharded the same way."""
    params = dict(pair.named_parameters())
    trainable = {k: params[k] for k in trainable}
    new_params = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state
    for old, new in zip(old_params, new_params):
        if old in state:
            state[new] = {k: _shard_like(v, new) for k, v in state.pop(old).items()}
    if ema is not None:
        ema.shadow = {k: _shard_like(v, trainable[k]) for k, v in ema.shadow.items()}
    return trainable


class Gathered:
    """Whole weights standing in for a module when writing our files (``state_dict``/``named_parameters``)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def named_parameters(self):
        return iter(self.state.items())


class GatheredOptimizer:
    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class GatheredEMA:
    def __init__(self, shadow: dict[str, torch.Tensor]):
        self.shadow = shadow


def gather(pair: nn.Module, optimizer=None, ema=None, use_ema: bool = False):
    """Whole (unet, controlnet) stand-ins of the trained weights, the optimizer state and the EMA, on every
    rank (collective: every rank calls it, in the same order). ``use_ema``: the weights with the EMA values."""
    state = pair.state_dict()
    keep = {f"unet.{n}" for n in unet_trainable_names(pair.unet)}
    whole = {k: _full(v) for k, v in state.items() if k.startswith("controlnet.") or k in keep}
    shadow = {k: _full(v) for k, v in ema.shadow.items()} if ema is not None else None
    if use_ema:
        whole.update(shadow)
    unet = Gathered({k[len("unet."):]: v for k, v in whole.items() if k.startswith("unet.")})
    controlnet = Gathered({k[len("controlnet."):]: v for k, v in whole.items() if k.startswith("controlnet.")})
    opt = None
    if optimizer is not None:
        sd = optimizer.state_dict()  # its per-parameter dicts are the live state: build new ones
        sd["state"] = {i: {k: _full(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in per_param.items()}
                       for i, per_param in sd["state"].items()}
        opt = GatheredOptimizer(sd)
    return unet, controlnet, opt, (GatheredEMA(shadow) if shadow is not None else None)
