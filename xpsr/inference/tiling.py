"""Tiles: latent diffusion tile by tile with blended overlaps, and the entry points of the tiled VAE.

Latents larger than a tile are denoised tile by tile at every UNet/ControlNet call and blended with
Gaussian weights: ``latent_tiling=ours`` tiles when a side exceeds the tile (weights sigma = size / 4),
``official`` repeats the official pipeline (tiles only when h * w > tile^2, square tiles, its weights and
summation order). The VAE goes through tiles that reproduce the untiled result (``vae_tiling``).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from xpsr.inference.vae_tiling import run_tiled
from xpsr.models.build import vae_scale_factor  # noqa: F401 - defined with the models; re-exported here

LATENT_TILINGS = ("ours", "official")


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


def tiled_apply(fn: Callable[[int, int, int, int], torch.Tensor], height: int, width: int, tile: int,
                overlap: int) -> torch.Tensor:
    """Blend ``fn(y, x, h, w)`` (a (B, C, h, w) tensor for the window at (y, x)) over tiles of the grid."""
    out = weights = None
    for y in tile_starts(height, tile, overlap):
        for x in tile_starts(width, tile, overlap):
            h, w = min(tile, height), min(tile, width)
            piece = fn(y, x, h, w)
            if out is None:
                b, c = piece.shape[:2]
                out = piece.new_zeros((b, c, height, width), dtype=torch.float32)
                weights = piece.new_zeros((1, 1, height, width), dtype=torch.float32)
            g = gaussian_weight(h, w, piece.device)
            out[:, :, y:y + h, x:x + w] += piece.float() * g
            weights[:, :, y:y + h, x:x + w] += g
    return out / weights


def official_gaussian_weight(size: int) -> torch.Tensor:
    """(size, size) float64 weights of the official pipeline's ``_gaussian_weights``: variance 0.01 of the
    tile size; its columns are centred at (size - 1) / 2 but its rows at size / 2 (kept as it is)."""
    var = 0.01

    def probs(mid: float) -> list:
        return [np.exp(-(i - mid) * (i - mid) / (size * size) / (2 * var)) / np.sqrt(2 * np.pi * var)
                for i in range(size)]

    return torch.tensor(np.outer(probs(size / 2), probs((size - 1) / 2)))


def official_tiled_apply(fn: Callable[[int, int, int, int], torch.Tensor], height: int, width: int, tile: int,
                         overlap: int) -> torch.Tensor:
    """The official pipeline's latent tiling: square tiles of min(tile, height, width) at the same offsets as
    ``tile_starts``, visited column-major, each multiplied by the float64 weights and summed in float32."""
    size = min(tile, height, width)
    if size <= overlap:
        raise ValueError(f"latent_tiling=official: the tile ({size} latents) must exceed latent_overlap={overlap} "
                         "(the official loop never ends otherwise)")
    weight = official_gaussian_weight(size)
    out = contributors = None
    for x in tile_starts(width, size, overlap):
        for y in tile_starts(height, size, overlap):
            piece = fn(y, x, size, size)
            if out is None:
                shape = (*piece.shape[:2], height, width)
                out = torch.zeros(shape, device=piece.device)
                contributors = torch.zeros(shape, device=piece.device)
            w = weight.to(piece.device)
            out[:, :, y:y + size, x:x + size] += piece * w
            contributors[:, :, y:y + size, x:x + size] += w
    out /= contributors
    return out


def blend_latent_tiles(fn: Callable[[int, int, int, int], torch.Tensor], height: int, width: int, tile: int,
                       overlap: int, rule: str = "ours") -> torch.Tensor:
    """``fn`` over the whole latent grid, or tile by tile when ``rule`` says the grid is too large for one:
    ours when a side exceeds ``tile``, official when height * width > tile^2; ``tile`` 0 never tiles."""
    if rule not in LATENT_TILINGS:
        raise ValueError(f"latent_tiling must be one of {LATENT_TILINGS}, got {rule!r}")
    if rule == "official":
        if not tile or height * width <= tile * tile:
            return fn(0, 0, height, width)
        return official_tiled_apply(fn, height, width, tile, overlap)
    if not tile or max(height, width) <= tile:
        return fn(0, 0, height, width)
    return tiled_apply(fn, height, width, tile, overlap)


def vae_tile_options(cfg) -> dict:
    """The tiled-VAE keyword arguments of an ``InferConfig``."""
    return {"attention": cfg.vae_tile_attention, "cache_mb": cfg.vae_tile_cache_mb}


def vae_posterior(vae, image: torch.Tensor, tile: int | None, *, pad: int | None = None, attention: str = "global",
                  cache_mb: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of ``image`` in [-1, 1], unscaled, float32.

    Images whose longer side exceeds ``tile`` + 2 ``pad`` px go through tiles of ``tile`` px padded by
    ``pad`` (default: the encoder's receptive field) with whole-image GroupNorm statistics, which gives the
    untiled result (see ``vae_tiling``); ``tile`` None/0 never tiles. The std follows diffusers'
    ``DiagonalGaussianDistribution`` (log-variance clamped to [-30, 20])."""
    x = image.to(next(vae.parameters()).dtype)
    moments = run_tiled(vae, x, tile, False, pad, attention, cache_mb) if tile else None
    if moments is None:
        dist = vae.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()
    mean, logvar = moments.float().chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def vae_encode(vae, image: torch.Tensor, tile: int | None, **tile_options) -> torch.Tensor:
    """Scaled latents (mean of the posterior) of ``image`` in [-1, 1]; tiling as ``vae_posterior``."""
    return vae_posterior(vae, image, tile, **tile_options)[0] * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor, tile: int | None, *, pad: int | None = None, attention: str = "global",
               cache_mb: float = 0) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents; latents whose longer side exceeds ``tile`` + 2 ``pad`` go through
    tiles of ``tile`` latents padded by ``pad`` (default: the decoder's receptive field), as ``vae_encode``."""
    z = (latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype)
    image = run_tiled(vae, z, tile, True, pad, attention, cache_mb) if tile else None
    if image is None:
        return vae.decode(z).sample.float()
    return image.float()
