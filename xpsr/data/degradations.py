"""Real-ESRGAN second-order degradation in torch, split into samplers and a deterministic applier.

``sample_degradation(cfg, rng)`` draws every random choice of one pair (kernels, resize factors and
modes, noise kind and level, JPEG qualities, order of the final step, noise seeds) into a JSON-able
record; ``degrade(img, params, scale)`` applies that record to a ``(B, 3, H, W)`` batch in [0, 1] on any
device. The record goes into the manifest, so every LR image can be regenerated and audited.

The official ``utils_data/make_train.py`` (``realesrgan_degradation``) makes some draws once per batch of
10 — resize direction, factor and mode of both stages, Gaussian-or-Poisson, the second-blur gate, the
order and resize mode of the final step — and shares the grey Gaussian-noise field across the batch.
:func:`sample_shared_draws` makes exactly those draws; by default every pair makes its own (a pair never
depends on other pairs), and `prepare` can share them within groups of pairs (``share_draws_every``).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from xpsr.config import DegradationConfig, StageConfig
from xpsr.data.jpeg import jpeg
from xpsr.data.kernels import build_kernel, sample_kernel
from xpsr.data.manifest import RECIPE_VERSION

SEED_MAX = 2**31 - 1


# ---------------------------------------------------------------- sampling (all randomness lives here)
def _sample_resize(stage: StageConfig, rng: np.random.Generator) -> dict:
    direction = str(rng.choice(["up", "down", "keep"], p=np.asarray(stage.resize_prob) / sum(stage.resize_prob)))
    lo, hi = stage.resize_range
    factor = {"up": lambda: rng.uniform(1, hi), "down": lambda: rng.uniform(lo, 1), "keep": lambda: 1.0}[direction]()
    return {"direction": direction, "factor": float(factor), "mode": str(rng.choice(stage.resize_modes))}


def _sample_stage_shared(stage: StageConfig, rng: np.random.Generator) -> dict:
    return {"blur": bool(rng.uniform() < stage.blur_prob), "resize": _sample_resize(stage, rng),
            "gaussian": bool(rng.uniform() < stage.gaussian_noise_prob),
            "gray_seed": int(rng.integers(0, SEED_MAX))}


def sample_shared_draws(cfg: DegradationConfig, rng: np.random.Generator) -> dict:
    """The draws the official script makes once per batch (see the module docstring); plain JSON."""
    return {
        "stage1": _sample_stage_shared(cfg.stage1, rng),
        "second_order": bool(rng.uniform() < cfg.second_order_prob),
        "stage2": _sample_stage_shared(cfg.stage2, rng),
        "final": {"jpeg_first": bool(rng.uniform() < 0.5), "mode": str(rng.choice(cfg.stage2.resize_modes))},
    }


def _sample_noise(stage: StageConfig, shared: dict, rng: np.random.Generator) -> dict:
    gray = bool(rng.uniform() < stage.gray_noise_prob)  # per image in the official code too
    if shared["gaussian"]:
        return {"kind": "gaussian", "sigma": float(rng.uniform(*stage.noise_range)), "gray": gray,
                "gray_seed": shared["gray_seed"]}
    return {"kind": "poisson", "scale": float(rng.uniform(*stage.poisson_scale_range)), "gray": gray}


def _sample_kernel(stage: StageConfig, rng: np.random.Generator, pad_to: int) -> dict:
    k = stage.kernel
    return sample_kernel(rng, k.sizes, k.sinc_prob, k.kinds, k.kind_probs, k.sigma, k.betag, k.betap, pad_to)


def _sample_jpeg(stage: StageConfig, rng: np.random.Generator) -> float | None:
    if rng.uniform() >= stage.jpeg_prob:
        return None
    return float(rng.uniform(*stage.jpeg_range))  # a float, as the official; OpenCV rounds it when applied


def _sample_stage(stage: StageConfig, shared: dict, rng: np.random.Generator, pad_to: int) -> dict:
    return {"blur": _sample_kernel(stage, rng, pad_to) if shared["blur"] else None,
            "resize": dict(shared["resize"]), "noise": _sample_noise(stage, shared, rng)}


def sample_degradation(cfg: DegradationConfig, rng: np.random.Generator, shared: dict | None = None) -> dict:
    """Draw all random choices of one degradation; the result is plain JSON.

    ``shared``: draws from :func:`sample_shared_draws` common to a group of pairs; None = this pair's own
    (drawn first from ``rng``).
    """
    shared = sample_shared_draws(cfg, rng) if shared is None else shared
    params: dict = {"stage1": _sample_stage(cfg.stage1, shared["stage1"], rng, cfg.kernel_pad_to)}
    params["stage1"]["jpeg"] = _sample_jpeg(cfg.stage1, rng)
    params["stage2"] = (_sample_stage(cfg.stage2, shared["stage2"], rng, cfg.kernel_pad_to)
                        if shared["second_order"] else None)
    sinc = None
    if rng.uniform() < cfg.final_sinc_prob:
        size = int(rng.choice(cfg.final_sinc_sizes))
        sinc = {"kind": "sinc", "size": size, "cutoff": float(rng.uniform(np.pi / 3, np.pi)),
                "pad_to": cfg.kernel_pad_to}
    params["final"] = {**shared["final"], "sinc": sinc, "jpeg": _sample_jpeg(cfg.stage2, rng)}
    params["noise_seed"] = int(rng.integers(0, SEED_MAX))
    params["jpeg_codec"] = cfg.jpeg_codec
    params["version"] = RECIPE_VERSION
    return params


# ---------------------------------------------------------------- deterministic operations
def filter2d(img: torch.Tensor, kernel: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convolve every channel with one kernel, reflect padding (odd kernel sizes).

    Images smaller than the padding (tiny crops after a strong down-resize) fall back to replicate padding.
    """
    k = torch.as_tensor(kernel, dtype=img.dtype, device=img.device)
    pad = k.shape[-1] // 2
    b, c, h, w = img.shape
    mode = "reflect" if pad < min(h, w) else "replicate"
    x = F.pad(img.reshape(b * c, 1, h, w), (pad, pad, pad, pad), mode=mode)
    return F.conv2d(x, k[None, None]).reshape(b, c, h, w)


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize to an explicit size (the official second stage and final step)."""
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img, size=(max(1, size[0]), max(1, size[1])), mode=mode, **kwargs)


def resize_by_factor(img: torch.Tensor, factor: float, mode: str) -> torch.Tensor:
    """Resize by a factor, as the official first stage (``F.interpolate(scale_factor=...)``).

    Output floor(H * factor); bilinear/bicubic map output to input coordinates with the factor itself
    ((y + 0.5) / factor - 0.5), not with out/in as an explicit size would; 'area' only uses the size.
    """
    h, w = img.shape[-2:]
    if int(h * factor) < 1 or int(w * factor) < 1:  # only tiny test crops: no official counterpart
        return resize(img, (int(h * factor), int(w * factor)), mode)
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img, scale_factor=factor, mode=mode, **kwargs)


def gray_field(shape: tuple[int, int], seed: int, like: torch.Tensor) -> torch.Tensor:
    """A (1, 1, H, W) standard normal field from its own seed: the official grey noise is one field per batch."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn((1, 1, *shape), generator=g, device=like.device, dtype=like.dtype)


def add_gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator,
                       gray_seed: int | None = None) -> torch.Tensor:
    """img + N(0, sigma/255) per pixel and channel, or (gray) one field for all channels; clamped to [0, 1]."""
    b, c, h, w = img.shape
    if gray and gray_seed is not None:
        noise = gray_field((h, w), gray_seed, img).expand(b, c, h, w)
    elif gray:
        noise = torch.randn((b, 1, h, w), generator=generator, device=img.device, dtype=img.dtype).expand(b, c, h, w)
    else:
        noise = torch.randn((b, c, h, w), generator=generator, device=img.device, dtype=img.dtype)
    return (img + noise * (sigma / 255.0)).clamp(0, 1)


def _quantised(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255) / 255


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Shot noise as BasicSR's ``generate_poisson_noise_pt``; grey = noise of the luma (torchvision weights)."""
    src = img
    if gray:  # luma of the unclamped image, then quantised, as the official
        src = 0.2989 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
    src = _quantised(src)
    # photon count per image: the number of distinct levels, rounded up to a power of two
    levels = torch.tensor([2.0 ** np.ceil(np.log2(len(torch.unique(x)))) for x in src],
                          device=img.device, dtype=img.dtype).view(-1, 1, 1, 1)
    noise = torch.poisson(src * levels, generator=generator) / levels - src
    return (img + noise.expand_as(img) * scale).clamp(0, 1)


def _noise(img: torch.Tensor, noise: dict, generator: torch.Generator) -> torch.Tensor:
    if noise["kind"] == "gaussian":
        return add_gaussian_noise(img, noise["sigma"], noise["gray"], generator, noise.get("gray_seed"))
    return add_poisson_noise(img, noise["scale"], noise["gray"], generator)


def _stage(img: torch.Tensor, stage: dict, size: tuple[int, int] | None, generator: torch.Generator) -> torch.Tensor:
    """Blur, resize (by factor when ``size`` is None, else to ``size``), noise."""
    if stage["blur"] is not None:
        img = filter2d(img, build_kernel(stage["blur"]))
    r = stage["resize"]
    img = resize_by_factor(img, r["factor"], r["mode"]) if size is None else resize(img, size, r["mode"])
    return _noise(img, stage["noise"], generator)


def second_stage_size(h: int, w: int, scale: int, factor: float) -> tuple[int, int]:
    """The official second-stage size, int(H / scale * factor): from the HR size, not from H // scale."""
    return int(h / scale * factor), int(w / scale * factor)


def degrade(img: torch.Tensor, params: dict, scale: int) -> torch.Tensor:
    """Apply a sampled degradation to ``img`` (B, 3, H, W) in [0, 1]; returns LR of size (H/scale, W/scale).

    Sizes as the official: stage 1 resizes by its factor (floor(H*f)), stage 2 to int(H/scale*f), the final
    step to H//scale. The result is quantised to 8 bits (it is saved as a PNG at LR size).
    """
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(img.shape)}")
    if params.get("version") != RECIPE_VERSION:
        raise ValueError(f"degradation record of recipe version {params.get('version', 1)}: this code applies "
                         f"version {RECIPE_VERSION} records only (regenerate the pairs with `xpsr prepare`)")
    h, w = img.shape[-2:]
    codec = params["jpeg_codec"]
    generator = torch.Generator(device=img.device).manual_seed(params["noise_seed"])
    x = _stage(img, params["stage1"], None, generator)
    if params["stage1"]["jpeg"] is not None:
        x = jpeg(x.clamp(0, 1), params["stage1"]["jpeg"], codec)
    if params.get("stage2") is not None:
        x = _stage(x, params["stage2"], second_stage_size(h, w, scale, params["stage2"]["resize"]["factor"]),
                   generator)
    final = params["final"]

    def resize_and_sinc(y: torch.Tensor) -> torch.Tensor:
        y = resize(y, (h // scale, w // scale), final["mode"])
        return filter2d(y, build_kernel(final["sinc"])) if final["sinc"] is not None else y

    def final_jpeg(y: torch.Tensor) -> torch.Tensor:
        return jpeg(y.clamp(0, 1), final["jpeg"], codec) if final["jpeg"] is not None else y

    x = resize_and_sinc(final_jpeg(x)) if final["jpeg_first"] else final_jpeg(resize_and_sinc(x))
    return _quantised(x.clamp(0, 1)).to(img.dtype)


def usm_sharpen(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
    """Unsharp masking of an HWC float32 RGB image in [0, 1] (BasicSR's ``USMSharp``/``usm_sharp``)."""
    if radius % 2 == 0:
        radius += 1
    blur = cv2.GaussianBlur(img, (radius, radius), 0)
    residual = img - blur
    mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft_mask = cv2.GaussianBlur(mask, (radius, radius), 0)
    sharp = np.clip(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img
