"""Measuring temporal stability (docs/video.md, scripts/video_stability.py).

- Temporal error on a panned clip (:func:`xpsr.video.synthetic.panned_clip`): the motion is known exactly, so
  SR(t+1) shifted back by ``step x upscale`` px must equal SR(t) where both show the scene; we report the mean
  absolute difference (0-255) and the PSNR of that overlap, averaged over consecutive pairs.
- Fidelity: PSNR/SSIM on Y of each SR frame against its HR frame (the paper's convention, xpsr.metrics).
- Warping error on a real-looking clip (:func:`zoom_clip`: a photo under a slow sub-pixel zoom and pan, each
  frame degraded on its own): SR(t) against SR(t-1) warped along the flow DIS estimates on the HR frames,
  over pixels that pass the forward-backward check.
"""
from __future__ import annotations

import dataclasses
import time

import cv2
import numpy as np
import torch

from xpsr.config import InferConfig


def temporal_error(sr: list[np.ndarray], shift: int, pairs: list[int] | None = None) -> dict[str, float]:
    """Mean |SR(t)[:, shift:] - SR(t+1)[:, :-shift]| and the PSNR of the same overlap, over pairs t, t+1
    (``pairs``: the t to use; default all)."""
    pairs = range(len(sr) - 1) if pairs is None else pairs
    mad, mse = [], []
    for t in pairs:
        a = sr[t][:, shift:].astype(np.float64)
        b = sr[t + 1][:, :sr[t + 1].shape[1] - shift].astype(np.float64)
        mad.append(np.abs(a - b).mean())
        mse.append(((a - b) ** 2).mean())
    return {"mad": float(np.mean(mad)), "psnr": _psnr(float(np.mean(mse)))}


def _psnr(mse: float) -> float:
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def fidelity(sr: list[np.ndarray], hr: list[np.ndarray]) -> dict[str, float]:
    from xpsr.metrics.psnr_ssim import psnr_y, ssim_y

    return {"psnr": float(np.mean([psnr_y(s, h) for s, h in zip(sr, hr)])),
            "ssim": float(np.mean([ssim_y(s, h) for s, h in zip(sr, hr)]))}


def warping_error(sr: list[np.ndarray], hr: list[np.ndarray]) -> float:
    """Mean |SR(t) - warp(SR(t-1))| (0-255) over tracked pixels, flow from the HR frames."""
    from xpsr.video.motion import estimate, resampled

    errors = []
    for t in range(1, len(sr)):
        motion = estimate(hr[t - 1], hr[t], "medium", 1.0)
        h, w = sr[t].shape[:2]
        flow, tracked = resampled(motion, h, w)
        gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
        warped = cv2.remap(sr[t - 1].astype(np.float32), gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR)
        errors.append(np.abs(sr[t].astype(np.float32) - warped)[tracked].mean())
    return float(np.mean(errors))


def zoom_clip(name: str, frames: int, lr_size: tuple[int, int], scale: int = 4,
              seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(LR, HR) frames of a slow zoom-in with a diagonal sub-pixel pan over a photo; one degradation record,
    fresh noise draws per frame (as a camera's sensor noise)."""
    from xpsr.config import DegradationConfig
    from xpsr.data.degradations import degrade, sample_degradation
    from xpsr.video.synthetic import photo

    h, w = lr_size[0] * scale, lr_size[1] * scale
    big = photo(name, w * 2, h * 2)
    params = sample_degradation(DegradationConfig(), np.random.default_rng(seed))
    lr_frames, hr_frames = [], []
    for t in range(frames):
        zoom = 2.0 * (1 - 0.01 * t)  # source pixels per output pixel shrink: a zoom-in
        cx, cy = w + 1.3 * t * scale, h + 0.7 * t * scale
        m = np.float32([[zoom, 0, cx - zoom * w / 2], [0, zoom, cy - zoom * h / 2]])
        hr = cv2.warpAffine(big, m, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
        x = torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255
        lr = degrade(x, {**params, "noise_seed": params["noise_seed"] + t}, scale)[0].permute(1, 2, 0).numpy()
        lr_frames.append((lr * 255).round().clip(0, 255).astype(np.uint8))
        hr_frames.append(hr)
    return lr_frames, hr_frames


def run_method(modules, cfg: InferConfig, lr: list[np.ndarray], stability: str, device="cpu",
               chunk_frames: int = 0) -> tuple[list[np.ndarray], float]:
    """SR frames of ``lr`` with one stability method (the video path's sampler), and seconds per frame.
    ``chunk_frames`` > 0 splits the clip into chunks as `xpsr infer` does (warm-up overlap included)."""
    from xpsr.video.chunks import plan
    from xpsr.video.run import clip_prompts
    from xpsr.video.sampler import FrameSampler

    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, stability=stability))
    overlap = cfg.video.chunk_overlap if stability in ("flow", "carry") else 0
    chunks = plan(len(lr), chunk_frames or len(lr), overlap)
    prompts = clip_prompts(cfg, lr[0])
    out, start = [], time.perf_counter()
    for chunk in chunks:
        sampler = FrameSampler(modules, cfg, torch.device(device), *prompts)
        for i in range(chunk.warmup, chunk.stop):
            sr = sampler(i, lr[i])
            if i >= chunk.start:
                out.append(sr)
    return out, (time.perf_counter() - start) / len(lr)
