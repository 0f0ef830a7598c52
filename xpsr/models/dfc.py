"""Degradation-free constraint (DFC): side outputs that must look like the *clean* image.

* pixel space: the ControlNet conditioning embedding gets an RGB head (3x3 conv) after each stride-2
  stage; its outputs are compared with the HR image resized to their size;
* latent space: one 3x3 conv per ControlNet residual (after its zero-conv, mid included) maps it to
  latent channels; compared with the HR latents resized to its size.

Both use L1 and are scaled by lambda (0.05 in the paper and the official code).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn


def _scaled_kaiming_init(convs: Sequence[nn.Conv2d], scale: float) -> None:
    """BasicSR's ``default_init_weights``: Kaiming-normal weights (fan-in, leaky-ReLU gain with slope 0) times
    ``scale``, zero biases -- small residual branches, so a fresh RRDB starts close to the identity."""
    with torch.no_grad():
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.mul_(scale)
            conv.bias.zero_()


class _DenseBlock(nn.Module):
    """Residual dense block (five 3x3 convs with dense connections, residual scaled by 0.2)."""

    def __init__(self, channels: int, growth: int = 32):
        super().__init__()
        for i in range(5):
            out = channels if i == 4 else growth
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels + i * growth, out, 3, padding=1))
        self.act = nn.LeakyReLU(0.2, inplace=True)
        _scaled_kaiming_init([getattr(self, f"conv{i + 1}") for i in range(5)], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(4):
            feats.append(self.act(getattr(self, f"conv{i + 1}")(torch.cat(feats, 1))))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block (ESRGAN, as BasicSR builds it); key names match the official checkpoint."""

    def __init__(self, channels: int, growth: int = 32):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (_DenseBlock(channels, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class DFCConditioningEmbedding(ControlNetConditioningEmbedding):
    """The stock conditioning embedding plus RGB side outputs (and an optional RRDB preprocessor).

    ``forward`` still returns only the embedding (the stock ControlNet expects a tensor); the side
    outputs of the latest call wait in ``side_outputs`` until the ControlNet takes them.
    """

    to_rgbs: nn.ModuleList | None
    preprocessor: nn.Sequential | None

    @classmethod
    def from_embedding(cls, base: ControlNetConditioningEmbedding, rgb_heads: bool = True,
                       rrdb: bool = False) -> "DFCConditioningEmbedding":
        if isinstance(base, DFCConditioningEmbedding):
            raise ValueError("this conditioning embedding already has DFC heads")
        ref = base.conv_in.weight
        stage_widths = [base.blocks[i].out_channels for i in range(1, len(base.blocks), 2)]
        base.__class__ = cls
        base.to_rgbs = (nn.ModuleList(nn.Conv2d(w, 3, 3, padding=1) for w in stage_widths).to(ref)
                        if rgb_heads else None)
        # The official embedding builds RRDB(width, width): the growth equals the width (16 for SD), not
        # BasicSR's default 32 -- with 32 an official use_rrdb checkpoint would not load.
        width = base.conv_in.out_channels
        base.preprocessor = nn.Sequential(RRDB(width, width), RRDB(width, width)).to(ref) if rrdb else None
        base.side_outputs = None
        return base

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(conditioning))
        if self.preprocessor is not None:
            x = self.preprocessor(x)
        rgbs = []
        for i, block in enumerate(self.blocks):
            x = F.silu(block(x))
            if i % 2 == 1 and self.to_rgbs is not None:  # after each stride-2 conv
                rgbs.append(self.to_rgbs[i // 2](x))
        self.side_outputs = rgbs
        return self.conv_out(x)

    def pop_side_outputs(self) -> list[torch.Tensor]:
        out, self.side_outputs = self.side_outputs or [], None
        return out


def latent_heads(channels: Sequence[int], latent_channels: int) -> nn.ModuleList:
    """One 3x3 conv per residual width, to latent channels."""
    return nn.ModuleList(nn.Conv2d(c, latent_channels, 3, padding=1) for c in channels)


@dataclass
class DFCLoss:
    total: torch.Tensor
    pixel: torch.Tensor
    latent: torch.Tensor


def _l1_to_resized(preds: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    total = target.new_zeros(())
    for pred in preds:
        resized = F.interpolate(target, size=pred.shape[-2:], mode="bilinear")
        total = total + F.l1_loss(pred.float(), resized.float())
    return total


def dfc_loss(
    pixel_rgbs: Sequence[torch.Tensor],
    latent_preds: Sequence[torch.Tensor],
    hr_image: torch.Tensor,
    hr_latents: torch.Tensor,
    weight: float = 0.05,
    pixel: bool = True,
    latent: bool = True,
    latent_indices: Sequence[int] | None = None,
) -> DFCLoss:
    """lambda * [sum_k L1(rgb_k, resize(hr_image)) + sum_i L1(latent_i, resize(hr_latents))].

    ``hr_image`` is in [-1, 1]; ``latent_preds`` lists the down-residual heads then the mid head;
    ``latent_indices`` keeps only some of them (None = all, the official 13 terms for SD 1.5).
    ``bilinear`` with PyTorch defaults (align_corners=False), mean reduction, as the official code.
    """
    zero = hr_image.new_zeros((), dtype=torch.float32)
    pixel_term = _l1_to_resized(pixel_rgbs, hr_image) if pixel and pixel_rgbs else zero
    chosen = list(latent_preds) if latent_indices is None else [latent_preds[i] for i in latent_indices]
    latent_term = _l1_to_resized(chosen, hr_latents) if latent and chosen else zero
    return DFCLoss(total=weight * (pixel_term + latent_term), pixel=weight * pixel_term,
                   latent=weight * latent_term)
