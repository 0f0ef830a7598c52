"""Real-ESRGAN second-order degradation in torch, split into a sampler and a deterministic applier.

``sample_degradation(cfg, rng)`` draws every random choice of one pair (kernels, resize factors and
modes, noise kind and level, JPEG qualities, order of the final step, a noise seed) into a JSON-able
record; ``degrade(hr, params, scale)`` applies that record to a ``(B, 3, H, W)`` batch in [0, 1] on any
device. The record goes into the manifest, so every LR image can be regenerated and audited.

Differences from Real-ESRGAN's training-time code, on purpose: resize factors are drawn per pair (not
per batch) so a pair never depends on its batch-mates; JPEG is a real codec (OpenCV, on the CPU)
instead of the differentiable approximation, since pairs are generated offline.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from xpsr.config import DegradationConfig, StageConfig
from xpsr.data.kernels import build_kernel, sample_kernel


# ---------------------------------------------------------------- sampling (all randomness lives here)
def _sample_resize(stage: StageConfig, rng: np.random.Generator) -> dict:
    direction = str(rng.choice(["up", "down", "keep"], p=np.asarray(stage.resize_prob) / sum(stage.resize_prob)))
    lo, hi = stage.resize_range
    factor = {"up": lambda: rng.uniform(1, hi), "down": lambda: rng.uniform(lo, 1), "keep": lambda: 1.0}[direction]()
    return {"direction": direction, "factor": float(factor), "mode": str(rng.choice(stage.resize_modes))}


def _sample_noise(stage: StageConfig, rng: np.random.Generator) -> dict:
    gray = bool(rng.uniform() < stage.gray_noise_prob)
    if rng.uniform() < stage.gaussian_noise_prob:
        return {"kind": "gaussian", "sigma": float(rng.uniform(*stage.noise_range)), "gray": gray}
    return {"kind": "poisson", "scale": float(rng.uniform(*stage.poisson_scale_range)), "gray": gray}


def _sample_kernel(stage: StageConfig, rng: np.random.Generator, pad_to: int) -> dict:
    k = stage.kernel
    return sample_kernel(rng, k.sizes, k.sinc_prob, k.kinds, k.kind_probs, k.sigma, k.betag, k.betap, pad_to)


def _sample_jpeg(stage: StageConfig, rng: np.random.Generator) -> int | None:
    if rng.uniform() >= stage.jpeg_prob:
        return None
    return int(round(rng.uniform(*stage.jpeg_range)))


def sample_degradation(cfg: DegradationConfig, rng: np.random.Generator) -> dict:
    """Draw all random choices of one degradation; the result is plain JSON."""
    s1, s2 = cfg.stage1, cfg.stage2
    params: dict = {"stage1": {
        "blur": _sample_kernel(s1, rng, cfg.kernel_pad_to) if rng.uniform() < s1.blur_prob else None,
        "resize": _sample_resize(s1, rng),
        "noise": _sample_noise(s1, rng),
        "jpeg": _sample_jpeg(s1, rng),
    }}
    if rng.uniform() < cfg.second_order_prob:
        params["stage2"] = {
            "blur": _sample_kernel(s2, rng, cfg.kernel_pad_to) if rng.uniform() < s2.blur_prob else None,
            "resize": _sample_resize(s2, rng),
            "noise": _sample_noise(s2, rng),
        }
    else:
        params["stage2"] = None
    sinc = None
    if rng.uniform() < cfg.final_sinc_prob:
        size = int(rng.choice(cfg.final_sinc_sizes))
        sinc = {"kind": "sinc", "size": size, "cutoff": float(rng.uniform(np.pi / 3, np.pi)),
                "pad_to": cfg.kernel_pad_to}
    params["final"] = {
        "jpeg_first": bool(rng.uniform() < 0.5),
        "mode": str(rng.choice(s2.resize_modes)),
        "sinc": sinc,
        "jpeg": _sample_jpeg(s2, rng),
    }
    params["noise_seed"] = int(rng.integers(0, 2**31 - 1))
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
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img, size=size, mode=mode, **kwargs)


def add_gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    b, c, h, w = img.shape
    noise = torch.randn((b, 1 if gray else c, h, w), generator=generator, device=img.device, dtype=img.dtype)
    return (img + noise.expand(b, c, h, w) * (sigma / 255.0)).clamp(0, 1)


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    src = img.clamp(0, 1)
    if gray:
        src = (0.299 * src[:, 0:1] + 0.587 * src[:, 1:2] + 0.114 * src[:, 2:3])
    src = (src * 255).round() / 255
    # photon count per image: the number of distinct levels, rounded up to a power of two
    levels = torch.tensor([2.0 ** np.ceil(np.log2(max(len(torch.unique(x)), 2))) for x in src],
                          device=img.device, dtype=img.dtype).view(-1, 1, 1, 1)
    noise = torch.poisson(src * levels, generator=generator) / levels - src
    return (img + noise.expand_as(img) * scale).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Real JPEG round trip (OpenCV) of every image in the batch."""
    out = []
    for x in img.clamp(0, 1):
        arr = (x.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", arr[..., ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0
        out.append(torch.from_numpy(np.ascontiguousarray(dec)).permute(2, 0, 1))
    return torch.stack(out).to(device=img.device, dtype=img.dtype)


def _noise(img: torch.Tensor, noise: dict, generator: torch.Generator) -> torch.Tensor:
    if noise["kind"] == "gaussian":
        return add_gaussian_noise(img, noise["sigma"], noise["gray"], generator)
    return add_poisson_noise(img, noise["scale"], noise["gray"], generator)


def _stage(img: torch.Tensor, stage: dict, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    if stage["blur"] is not None:
        img = filter2d(img, build_kernel(stage["blur"]))
    r = stage["resize"]
    img = resize(img, (max(1, int(size[0] * r["factor"])), max(1, int(size[1] * r["factor"]))), r["mode"])
    return _noise(img, stage["noise"], generator)


def degrade(hr: torch.Tensor, params: dict, scale: int) -> torch.Tensor:
    """Apply a sampled degradation to ``hr`` (B, 3, H, W) in [0, 1]; returns LR of size (H/scale, W/scale)."""
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    generator = torch.Generator(device=hr.device).manual_seed(params["noise_seed"])
    x = _stage(hr, params["stage1"], (h, w), generator)
    if params["stage1"]["jpeg"] is not None:
        x = jpeg(x, params["stage1"]["jpeg"])
    if params.get("stage2") is not None:
        x = _stage(x, params["stage2"], (h // scale, w // scale), generator)
    final = params["final"]
    target = (h // scale, w // scale)

    def resize_and_sinc(y: torch.Tensor) -> torch.Tensor:
        y = resize(y, target, final["mode"])
        return filter2d(y, build_kernel(final["sinc"])) if final["sinc"] is not None else y

    if final["jpeg_first"]:
        x = jpeg(x, final["jpeg"]) if final["jpeg"] is not None else x
        x = resize_and_sinc(x)
    else:
        x = resize_and_sinc(x)
        x = jpeg(x, final["jpeg"]) if final["jpeg"] is not None else x
    return ((x.clamp(0, 1) * 255).round() / 255).to(hr.dtype)


def usm_sharpen(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
    """Unsharp masking of an HWC float32 RGB image in [0, 1] (the sharpened GT of Real-ESRGAN data)."""
    if radius % 2 == 0:
        radius += 1
    blur = cv2.GaussianBlur(img, (radius, radius), 0)
    residual = img - blur
    mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft_mask = cv2.GaussianBlur(mask, (radius, radius), 0)
    sharp = np.clip(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img
