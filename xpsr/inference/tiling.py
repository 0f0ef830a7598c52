"""Tiles: overlapping windows with Gaussian weights, so tiled results blend without seams.

Latent diffusion is tiled at every UNet/ControlNet call; the VAE encodes/decodes tile by tile. Memory
then depends on the tile size, not on the image size.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``length`` with windows of ``tile`` overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def gaussian_weight(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, h, w) weights peaking at the centre (sigma = size / 4), never exactly zero."""
    ys = torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2
    xs = torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2
    wy = torch.exp(-0.5 * (ys / (h / 4)) ** 2)
    wx = torch.exp(-0.5 * (xs / (w / 4)) ** 2)
    return (wy[:, None] * wx[None, :])[None, None]


def tiled_apply(fn: Callable[[int, int, int, int], torch.Tensor], height: int, width: int, tile: int, overlap: int,
                scale: int = 1) -> torch.Tensor:
    """Blend ``fn(y, x, h, w)`` over tiles of the input grid; outputs are ``scale`` x the input grid.

    ``fn`` returns a (B, C, h*scale, w*scale) tensor for the input window at (y, x) of size (h, w).
    """
    out = weights = None
    for y in tile_starts(height, tile, overlap):
        for x in tile_starts(width, tile, overlap):
            h, w = min(tile, height), min(tile, width)
            piece = fn(y, x, h, w)
            if out is None:
                b, c = piece.shape[:2]
                out = piece.new_zeros((b, c, height * scale, width * scale), dtype=torch.float32)
                weights = piece.new_zeros((1, 1, height * scale, width * scale), dtype=torch.float32)
            g = gaussian_weight(h * scale, w * scale, piece.device)
            ys, xs = slice(y * scale, (y + h) * scale), slice(x * scale, (x + w) * scale)
            out[:, :, ys, xs] += piece.float() * g
            weights[:, :, ys, xs] += g
    return out / weights


def vae_encode(vae, image: torch.Tensor, tile: int | None, overlap: int = 64) -> torch.Tensor:
    """Scaled latents (mean of the posterior) of ``image`` in [-1, 1]; tiled when larger than ``tile`` px."""
    scale = vae.config.scaling_factor
    dtype = next(vae.parameters()).dtype
    h, w = image.shape[-2:]
    if not tile or max(h, w) <= tile:
        return vae.encode(image.to(dtype)).latent_dist.mean.float() * scale
    f = 8

    def window(y, x, th, tw):
        return vae.encode(image[:, :, y * f:(y + th) * f, x * f:(x + tw) * f].to(dtype)).latent_dist.mean

    return tiled_apply(window, h // f, w // f, tile // f, overlap // f) * scale


def vae_decode(vae, latents: torch.Tensor, tile: int | None, overlap: int = 8) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents; tiled when the latent is larger than ``tile`` latent px."""
    z = latents / vae.config.scaling_factor
    dtype = next(vae.parameters()).dtype
    h, w = z.shape[-2:]
    if not tile or max(h, w) <= tile:
        return vae.decode(z.to(dtype)).sample.float()

    def window(y, x, th, tw):
        return vae.decode(z[:, :, y:y + th, x:x + tw].to(dtype)).sample

    return tiled_apply(window, h, w, tile, overlap, scale=8)
