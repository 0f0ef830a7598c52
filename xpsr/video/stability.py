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


def border_error(sr: list[np.ndarray], shift: int, chunk_frames: int) -> dict[str, float]:
    """Temporal MAD across chunk borders (pairs t, t+1 in different chunks) and inside chunks."""
    across = [t for t in range(len(sr) - 1) if (t + 1) % chunk_frames == 0]
    inside = [t for t in range(len(sr) - 1) if (t + 1) % chunk_frames != 0]
    return {"across": temporal_error(sr, shift, across)["mad"], "inside": temporal_error(sr, shift, inside)["mad"]}


def measure(modules, cfg: InferConfig, methods: list[str], frames: int, lr_size: int, step: int,
            chunk_frames: int, log=print) -> list[dict]:
    """The stability table: one row per method (and per one-step method), see the module docstring."""
    from xpsr.video.synthetic import panned_clip

    pan_lr, pan_hr = panned_clip("astronaut", frames, (lr_size, lr_size), step, cfg.upscale)
    zoom_lr, zoom_hr = zoom_clip("chelsea", frames, (lr_size, lr_size), cfg.upscale)
    shift = step * cfg.upscale
    rows = []
    runs = [("multistep", m) for m in methods] + [("onestep", m) for m in ("independent", "flow")]
    for mode, method in runs:
        run_cfg = dataclasses.replace(cfg, mode=mode)
        cpu = time.process_time()
        sr, wall = run_method(modules, run_cfg, pan_lr, method)
        row = {"mode": mode, "method": method, "temporal": temporal_error(sr, shift), "fidelity": fidelity(sr, pan_hr),
               "s_per_frame": round(wall, 3), "cpu_s_per_frame": round((time.process_time() - cpu) / frames, 3)}
        row["warping_error"] = warping_error(run_method(modules, run_cfg, zoom_lr, method)[0], zoom_hr)
        if chunk_frames and method in ("flow", "carry") and mode == "multistep":
            chunked, _ = run_method(modules, run_cfg, pan_lr, method, chunk_frames=chunk_frames)
            row["chunk_border"] = border_error(chunked, shift, chunk_frames)
        log(row)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (docs/video.md)."""
    lines = ["| mode | method | temporal MAD | temporal PSNR | PSNR | SSIM | warping error | s/frame (CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['method']} | {r['temporal']['mad']:.2f} | {r['temporal']['psnr']:.2f} | "
                     f"{r['fidelity']['psnr']:.2f} | {r['fidelity']['ssim']:.4f} | {r['warping_error']:.2f} | "
                     f"{r['cpu_s_per_frame']:.2f} |")
    borders = [r for r in rows if "chunk_border" in r]
    if borders:
        lines += ["", "| method | temporal MAD across chunk borders | inside chunks |", "| --- | --- | --- |"]
        lines += [f"| {r['method']} | {r['chunk_border']['across']:.2f} | {r['chunk_border']['inside']:.2f} |"
                  for r in borders]
    return "\n".join(lines)
