"""Colour fix: pull the SR image's colours back to the LR input's (diffusion drifts in colour)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of ``sr`` set to those of ``ref`` (both (B, 3, H, W) in [0, 1], same size)."""
    s_mean, s_std = sr.mean((2, 3), keepdim=True), sr.std((2, 3), keepdim=True) + eps
    r_mean, r_std = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True) + eps
    return ((sr - s_mean) / s_std * r_std + r_mean).clamp(0, 1)


def _low_pass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Repeated dilated 3x3 binomial blurs (an a-trous wavelet decomposition's coarse part)."""
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2**i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])
    return x


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of ``sr`` + low frequencies (colour, shading) of ``ref``."""
    return (sr - _low_pass(sr, levels) + _low_pass(ref, levels)).clamp(0, 1)


def color_fix(sr: torch.Tensor, ref: torch.Tensor, method: str) -> torch.Tensor:
    if method == "none":
        return sr
    if method == "adain":
        return adain_color_fix(sr, ref)
    if method == "wavelet":
        return wavelet_color_fix(sr, ref)
    raise ValueError(f"colour fix must be adain, wavelet or none, not {method!r}")
