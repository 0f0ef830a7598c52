"""Colour fix: pull the SR image's colours back to the LR input's (diffusion drifts in colour).

Both fixes follow the official ``myutils/wavelet_color_fix.py`` formula for formula (AdaIN statistics,
the wavelet decomposition's accumulation order); there is no reason to differ, so they are the only ones.
``color_fix_8bit`` repeats the official script's 8-bit round trip around the fix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and sqrt(unbiased variance + eps) of (B, C, H, W), each (B, C, 1, 1)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]


def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of ``sr`` set to those of ``ref`` (both (B, 3, H, W) in [0, 1]), clamped to [0, 1].

    The eps goes under the square root, with the unbiased variance, as the official ``calc_mean_std``."""
    s_mean, s_std = _mean_std(sr, eps)
    r_mean, r_std = _mean_std(ref, eps)
    return ((sr - s_mean) / s_std * r_std + r_mean).clamp(0, 1)


def _wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur with holes (a-trous), edges replicated so the size is kept."""
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    d = dilation
    return F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])


def _wavelet_split(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): ``levels`` blurs with dilation 1, 2, 4, ...; the high part sums each level's detail (in that
    order, as the official ``wavelet_decomposition``, so the rounding matches), the low part is the last blur."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of ``sr`` + low frequencies (colour, shading) of ``ref``, clamped to [0, 1]."""
    high, _ = _wavelet_split(sr, levels)
    _, low = _wavelet_split(ref, levels)
    return (high + low).clamp(0, 1)


def color_fix(sr: torch.Tensor, ref: torch.Tensor, method: str) -> torch.Tensor:
    if method == "none":
        return sr
    if method == "adain":
        return adain_color_fix(sr, ref)
    if method == "wavelet":
        return wavelet_color_fix(sr, ref)
    raise ValueError(f"colour fix must be adain, wavelet or none, not {method!r}")


def round_to_8bit(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> k/255 with k = round(255 x), half to even (diffusers' ``numpy_to_pil``), as float again."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).float().div(255)


def truncate_to_8bit(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> k/255 with k = int(255 x), truncated (torchvision's ``ToPILImage``: ``mul(255).byte()``)."""
    return (image.clamp(0, 1) * 255).to(torch.uint8).float().div(255)


def fix_colors(sr: torch.Tensor, ref: torch.Tensor, method: str, eight_bit: bool) -> torch.Tensor:
    """The colour fix of the pipeline's decoded SR (in [0, 1]) against ``ref``.

    ``eight_bit`` repeats the official test script: its pipeline hands back a PIL image (rounded to 8 bits),
    ``adain_color_fix`` reads it with ToTensor and writes the result with ToPILImage (truncated to 8 bits).
    Without it the fix runs on floats and the caller rounds once at the end."""
    if not eight_bit:
        return color_fix(sr, ref, method)
    # with method=none the truncation keeps the rounded values: k/255 * 255 truncates back to k for every k
    return truncate_to_8bit(color_fix(round_to_8bit(sr), ref, method))
