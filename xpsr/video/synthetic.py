"""Clips made in code, for tests, the stability measurement and the fault campaign.

:func:`panned_clip` pans a window over a large photo by whole LR pixels per frame. The photo is degraded *once*
(one Real-ESRGAN degradation of our pipeline, noise fields and JPEG blocks included) and the LR frames are
windows of that one degraded image, so the degradation is consistent over time and moves with the content:
where a region is visible in frames t and t+1, LR(t+1) shifted back by ``step`` px equals LR(t) exactly, and an
ideal temporally stable SR gives SR(t+1) shifted back by ``step x upscale`` px equal to SR(t).
"""
from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_clip(path: Path, frames: Iterable[np.ndarray], pts: list[int] | None = None,
               time_base: Fraction = Fraction(1, 25), rate: Fraction = Fraction(25), codec: str = "libx264",
               audio_seconds: float = 0.0, colour: dict | None = None, options: dict | None = None,
               faststart: bool = False) -> Path:
    """Encode RGB uint8 frames (even sizes) to ``path``; ``pts`` gives variable frame timing, ``audio_seconds``
    adds an AAC sine tone, ``colour`` sets colour metadata (e.g. ``{"color_primaries": 1}``), ``faststart``
    puts an MP4's index first (as streaming services do)."""
    import av

    out = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else None)
    stream, tone = None, None
    if audio_seconds:
        tone = out.add_stream("aac", rate=8000, layout="mono")
    for i, rgb in enumerate(frames):
        if stream is None:
            stream = out.add_stream(codec, rate=rate, options=options or {"crf": "10", "preset": "ultrafast"})
            stream.width, stream.height = rgb.shape[1], rgb.shape[0]
            stream.pix_fmt = "yuv420p" if codec != "ffv1" else "bgr0"
            stream.codec_context.time_base = time_base
            for key, value in (colour or {}).items():
                setattr(stream.codec_context, key, value)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = (pts[i] if pts else i), time_base
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    if tone is not None:
        _write_tone(out, tone, audio_seconds)
    out.close()
    return path


def _write_tone(out, stream, seconds: float) -> None:
    import av

    rate, n = 8000, stream.codec_context.frame_size or 1024
    t = np.arange(int(rate * seconds)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, len(samples) - n + 1, n):
        frame = av.AudioFrame.from_ndarray(samples[None, start:start + n], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def photo(name: str, width: int, height: int) -> np.ndarray:
    """A bundled scikit-image photo as RGB uint8, resized to ``width`` x ``height``."""
    import skimage.data
    from PIL import Image

    img = np.asarray(getattr(skimage.data, name)())
    img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3]
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


def degrade_once(hr: np.ndarray, scale: int, seed: int) -> np.ndarray:
    """One degradation of our training pipeline (configs/data/xpsr.yaml's settings, drawn with ``seed``)."""
    import torch

    from xpsr.config import DegradationConfig
    from xpsr.data.degradations import degrade, sample_degradation

    params = sample_degradation(DegradationConfig(), np.random.default_rng(seed))
    x = torch.from_numpy(np.array(hr)).permute(2, 0, 1)[None].float() / 255  # a writable copy
    lr = degrade(x, params, scale)[0].permute(1, 2, 0).numpy()
    return (lr * 255).round().clip(0, 255).astype(np.uint8)


def panned_clip(name: str, frames: int, lr_size: tuple[int, int], step: int, scale: int = 4,
                seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(LR frames, HR frames) of a pan to the right by ``step`` LR px (``step x scale`` HR px) per frame."""
    h, w = lr_size
    pano_w = w + step * (frames - 1)
    hr = photo(name, pano_w * scale, h * scale)
    lr = degrade_once(hr, scale, seed)
    lr_frames = [np.ascontiguousarray(lr[:, i * step:i * step + w]) for i in range(frames)]
    hr_frames = [np.ascontiguousarray(hr[:, i * step * scale:(i * step + w) * scale]) for i in range(frames)]
    return lr_frames, hr_frames
