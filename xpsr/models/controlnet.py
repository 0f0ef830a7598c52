"""The XPSR ControlNet: the stock ``ControlNetModel`` with SFA inside and DFC heads on its outputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.utils import BaseOutput
from torch import nn

from xpsr.models.dfc import DFCConditioningEmbedding, latent_heads
from xpsr.models.pixel_attention import residual_channels
from xpsr.models.sfa import QUALITY_KEY, has_sfa


@dataclass
class XPSRControlNetOutput(BaseOutput):
    """Residuals for the UNet (already x conditioning_scale) and the DFC side outputs (unscaled)."""

    # Defaults on all but the first field: accelerate's mixed-precision wrapper rebuilds outputs as
    # ``type(out)(dict(out))``, which BaseOutput only accepts when the other fields may be left out.
    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor = None
    pixel_rgbs: list[torch.Tensor] = None
    latent_preds: list[torch.Tensor] = None  # one per down residual, then the mid one


class XPSRControlNet(ControlNetModel):
    """Re-classed stock ControlNet; build it with :func:`as_xpsr_controlnet`."""

    dfc_latent_heads: nn.ModuleList | None
    dfc_latent_head_mid: nn.Conv2d | None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        quality_embeds: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        cross_attention_kwargs: dict | None = None,
        **kwargs,
    ) -> XPSRControlNetOutput:
        if kwargs.get("guess_mode"):
            raise ValueError("guess_mode is not supported by the XPSR ControlNet")
        kwargs.pop("return_dict", None)
        if quality_embeds is not None and has_sfa(self):
            cross_attention_kwargs = dict(cross_attention_kwargs or {})
            cross_attention_kwargs[QUALITY_KEY] = quality_embeds
        embedding = self.controlnet_cond_embedding
        try:
            # Scale 1.0 inside: the DFC heads read the unscaled residuals; we scale afterwards.
            out = super().forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                  cross_attention_kwargs=cross_attention_kwargs, return_dict=True, **kwargs)
        finally:
            rgbs = embedding.pop_side_outputs() if isinstance(embedding, DFCConditioningEmbedding) else []
        down, mid = tuple(out.down_block_res_samples), out.mid_block_res_sample
        latents: list[torch.Tensor] = []
        if self.dfc_latent_heads is not None:
            latents = [head(r) for head, r in zip(self.dfc_latent_heads, down)]
            latents.append(self.dfc_latent_head_mid(mid))
        if conditioning_scale != 1.0:
            down = tuple(r * conditioning_scale for r in down)
            mid = mid * conditioning_scale
        return XPSRControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid,
                                    pixel_rgbs=rgbs, latent_preds=latents)


def as_xpsr_controlnet(controlnet: ControlNetModel, pixel_heads: bool = True, latent: bool = True,
                       rrdb: bool = False) -> XPSRControlNet:
    """Re-class ``controlnet`` in place and add the DFC heads (keys of the stock model unchanged)."""
    if isinstance(controlnet, XPSRControlNet):
        raise ValueError("this ControlNet is already an XPSR ControlNet; inject once, on a fresh model")
    ref = controlnet.conv_in.weight
    if pixel_heads or rrdb:
        DFCConditioningEmbedding.from_embedding(controlnet.controlnet_cond_embedding, rgb_heads=pixel_heads,
                                                rrdb=rrdb)
    controlnet.__class__ = XPSRControlNet
    if latent:
        channels = residual_channels(controlnet.config)
        controlnet.dfc_latent_heads = latent_heads(channels, controlnet.config.in_channels).to(ref)
        controlnet.dfc_latent_head_mid = latent_heads(channels[-1:], controlnet.config.in_channels)[0].to(ref)
    else:
        controlnet.dfc_latent_heads = None
        controlnet.dfc_latent_head_mid = None
    return controlnet
