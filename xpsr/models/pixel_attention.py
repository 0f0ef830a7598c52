"""Pixel-aware attention in the UNet decoder.

After every resnet (and its frozen attention, where the block has one) of every up block, a
``Transformer2DModel`` cross-attends to the ControlNet residual that pairs with the skip connection
being consumed, flattened to ``(B, H*W, C)`` tokens. The k-th decoder layer (counted over all up
blocks) reads residual N-1-k: the same index as the skip it pops, the *raw* residual (not skip +
residual). It runs before the upsampler; the mid block has none. Modules live at
``up_blocks.i.pixel_attentions.j`` (the official key names).

Residuals reach the up blocks through :class:`XPSRUNet`, which hands each up block its slice for the
duration of one forward. The up block passes them to the pixel attention as explicit arguments, so
gradient-checkpoint recomputation always sees the residuals of its own forward.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from xpsr.models.sfa import QUALITY_KEY, has_sfa

_RESIDUALS = "_xpsr_pixel_residuals"
# the caller's cross_attention_kwargs, for up blocks the UNet calls without them (no cross-attention of their own)
_ATTENTION_KWARGS = "_xpsr_attention_kwargs"


class _PixelAwareUpBlock:
    """Shared forward of the pixel-aware up blocks (resnet -> [attention] -> pixel attention)."""

    pixel_attentions: nn.ModuleList

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        upsample_size: int | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if getattr(self, "s1", None) and getattr(self, "b1", None):
            raise NotImplementedError("FreeU is not supported together with pixel-aware attention")
        residuals = getattr(self, _RESIDUALS, None)  # aligned with res_hidden_states_tuple
        attentions = getattr(self, "attentions", None)
        checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing
        # the caller's attention keywords (diffusers' cross_attention_kwargs) reach the pixel attentions too;
        # the quality prompt is for the SFA transformers only
        given = cross_attention_kwargs if cross_attention_kwargs is not None else getattr(self, _ATTENTION_KWARGS, None)
        pixel_kwargs = {k: v for k, v in (given or {}).items() if k != QUALITY_KEY} or None
        for j, resnet in enumerate(self.resnets):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1 - j]], dim=1)
            if checkpoint:
                hidden_states = self._gradient_checkpointing_func(resnet, hidden_states, temb)
            else:
                hidden_states = resnet(hidden_states, temb)
            if attentions is not None:
                hidden_states = attentions[j](
                    hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    cross_attention_kwargs=cross_attention_kwargs,
                    attention_mask=attention_mask,
                    encoder_attention_mask=encoder_attention_mask,
                    return_dict=False,
                )[0]
            if residuals is not None:
                control_tokens = residuals[-1 - j].flatten(2).transpose(1, 2)
                hidden_states = self.pixel_attentions[j](
                    hidden_states, encoder_hidden_states=control_tokens, cross_attention_kwargs=pixel_kwargs,
                    return_dict=False,
                )[0]
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


class PixelAwareCrossAttnUpBlock2D(_PixelAwareUpBlock, CrossAttnUpBlock2D):
    pass


class PixelAwareUpBlock2D(_PixelAwareUpBlock, UpBlock2D):
    pass


_SWAPS = {CrossAttnUpBlock2D: PixelAwareCrossAttnUpBlock2D, UpBlock2D: PixelAwareUpBlock2D}


class XPSRUNet(UNet2DConditionModel):
    """The stock UNet, plus: ``quality_embeds`` for UNet SFA and residual routing to pixel attentions."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, quality_embeds=None, **kwargs):
        if quality_embeds is not None and has_sfa(self):
            cak = dict(kwargs.get("cross_attention_kwargs") or {})
            cak[QUALITY_KEY] = quality_embeds
            kwargs["cross_attention_kwargs"] = cak
        self._route_residuals(kwargs.get("down_block_additional_residuals"), kwargs.get("cross_attention_kwargs"))
        try:
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        finally:
            self._route_residuals(None)  # never keep tensors on the module (EMA deepcopy, memory)

    def _route_residuals(self, residuals: Sequence[torch.Tensor] | None, attention_kwargs: dict | None = None) -> None:
        remaining = list(residuals) if residuals is not None else None
        for block in self.up_blocks:
            setattr(block, _ATTENTION_KWARGS, attention_kwargs)
            if remaining is None:
                setattr(block, _RESIDUALS, None)
                continue
            n = len(block.resnets)  # the same slicing as the UNet forward applies to the skips
            setattr(block, _RESIDUALS, tuple(remaining[-n:]))
            remaining = remaining[:-n]


def as_xpsr_unet(unet: UNet2DConditionModel) -> XPSRUNet:
    """Re-class a stock UNet in place as :class:`XPSRUNet` (idempotent; weights and keys unchanged)."""
    if not isinstance(unet, XPSRUNet):
        unet.__class__ = XPSRUNet
    return unet


def residual_channels(unet_config: Any) -> list[int]:
    """Channel count of each ControlNet down residual (= each UNet skip), in order."""
    channels = [unet_config.block_out_channels[0]]
    n_blocks = len(unet_config.block_out_channels)
    for i, width in enumerate(unet_config.block_out_channels):
        channels += [width] * unet_config.layers_per_block
        if i < n_blocks - 1:
            channels.append(width)
    return channels


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def inject_pixel_attention(unet: UNet2DConditionModel, init: str = "zero") -> XPSRUNet:
    """Add a pixel-aware attention after every up-block layer of ``unet`` (in place).

    Heads = the up block's head count, head dim = channels / heads, context width = the residual's
    channels, as many transformer layers as the up block's own attentions. ``init='zero'`` zeroes each
    ``proj_out`` so the decoder starts exactly as the pretrained one; ``'random'`` is the official init.
    """
    if init not in ("zero", "random"):
        raise ValueError(f"pixel attention init must be 'zero' or 'random', got {init!r}")
    cfg = unet.config
    n = len(cfg.block_out_channels)
    heads = list(reversed(_per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)))
    layers = list(reversed(_per_block(cfg.transformer_layers_per_block, n)))
    channels_of = residual_channels(cfg)
    ref = unet.conv_in.weight
    k = 0
    for i, block in enumerate(unet.up_blocks):
        if any(isinstance(block, new) for new in _SWAPS.values()):
            raise ValueError("this UNet already has pixel attention; inject once, on a freshly loaded model")
        swap = _SWAPS.get(type(block))
        if swap is None:
            raise ValueError(f"pixel attention supports CrossAttnUpBlock2D/UpBlock2D, not {type(block).__name__}")
        modules = []
        for resnet in block.resnets:
            width = resnet.out_channels
            attn = Transformer2DModel(
                num_attention_heads=heads[i],
                attention_head_dim=width // heads[i],
                in_channels=width,
                num_layers=layers[i],
                cross_attention_dim=channels_of[len(channels_of) - 1 - k],
                norm_num_groups=cfg.norm_num_groups,
                use_linear_projection=cfg.use_linear_projection,
                upcast_attention=cfg.upcast_attention,
            )
            if init == "zero":
                nn.init.zeros_(attn.proj_out.weight)
                nn.init.zeros_(attn.proj_out.bias)
            modules.append(attn)
            k += 1
        block.__class__ = swap
        block.pixel_attentions = nn.ModuleList(modules).to(device=ref.device, dtype=ref.dtype)
        setattr(block, _RESIDUALS, None)
    return as_xpsr_unet(unet)


def has_pixel_attention(unet: nn.Module) -> bool:
    return any(isinstance(b, _PixelAwareUpBlock) for b in getattr(unet, "up_blocks", []))
