"""What `xpsr serve` does for an uploaded clip (issue 19): its first ``max_video_frames`` frames super-resolved by
the video code of `xpsr infer` (:func:`xpsr.video.api.super_resolve_clip_for_app`) with the page's controls, and a
few before/after frames to look at. Kept apart from the Gradio page, like :mod:`xpsr.apps.serve.engine`.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xpsr.apps.serve.engine import Controls, PeakRSS, RequestError, _safe_stem, infer_config, size_limits
from xpsr.errors import shown
from xpsr.inference.limits import SizeRefused, check_size


@dataclass
class VideoResult:
    output: Path              # the SR clip (mp4, H.264: plays in the browser)
    previews: list[tuple[int, np.ndarray, np.ndarray]]  # (frame index, LR enlarged to the SR size, SR frame)
    frames: int               # frames super-resolved
    total_frames: int         # frames of the upload
    prompts: dict[str, str]
    seconds: float
    peak_rss_mb: float
    cuda_peak_mb: float | None
    notes: list[str]
    mode: str = ""


def _one_line(error: Exception, paths: tuple[Path, ...], name: str) -> RequestError:
    """The video code's message with the server-side copy's path replaced by the upload's name."""
    text = str(error)
    for path in paths:
        text = text.replace(shown(path), name).replace(str(path), name)
    return RequestError(text.splitlines()[0] if text else f"{name}: the clip could not be read")


def _copy_upload(path: str | Path, name: str, work: Path) -> Path:
    """The upload copied under a safe name into ``work`` (its file name names the output); refuses an empty file
    and names that are no video container the video code reads."""
    from xpsr.config.video import VIDEO_SUFFIXES

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise RequestError(f"{name}: the file is empty")
    suffix = Path(name).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise RequestError(f"{name}: not a video this app can read ({', '.join(VIDEO_SUFFIXES)})")
    work.mkdir(parents=True, exist_ok=True)
    clip = work / f"{_safe_stem(name)}{suffix}"
    shutil.copyfile(path, clip)
    return clip


def run_video(engine, path: str | Path, name: str, content: str, quality: str, controls: Controls) -> VideoResult:
    """Super-resolve the first ``max_video_frames`` frames of one uploaded clip into a new folder under the
    engine's output folder; an empty quality prompt is the heuristic's description of the first frame. Bad clips
    and sizes over the limits raise :class:`RequestError` (one line, naming the upload)."""
    from xpsr.captions.heuristic import describe, measure
    from xpsr.video.api import super_resolve_clip_for_app
    from xpsr.video.source import Clip, VideoError, probe

    cfg = engine.cfg
    out = engine.output_dir / f"{_safe_stem(name)}_xpsr_video_x{controls.upscale}_{next(engine._counter):04d}"
    clip = _copy_upload(path, name, out / "upload")
    try:
        info = probe(clip)
        check_size(name, info.height, info.width, size_limits(cfg, controls.upscale))
        icfg, notes = infer_config(cfg, controls, info.height, info.width, engine.settings)
        if not quality.strip():
            quality = describe(measure(next(Clip(info).frames(0, 1))))
            notes.append("empty quality prompt: filled by the heuristic (first frame)")
        if info.frames > cfg.max_video_frames:
            notes.append(f"only the first {cfg.max_video_frames} of {info.frames} frames (max_video_frames); "
                         "longer clips: `xpsr infer input=CLIP`")
        icfg = dataclasses.replace(icfg, prompt=content, quality_prompt=quality, device=engine.device.type,
                                   video=dataclasses.replace(icfg.video, container="mp4", codec="libx264"))
        cuda = engine.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(engine.device)
        start = time.perf_counter()
        with PeakRSS() as rss:
            made = super_resolve_clip_for_app(engine.modules, clip, out, icfg, max_frames=cfg.max_video_frames)
        seconds = time.perf_counter() - start
    except (VideoError, SizeRefused) as e:
        raise _one_line(e, (clip, out), name) from None
    finally:
        clip.unlink(missing_ok=True)
    previews = [(i, before, after) for i, (before, after) in zip(made["preview_frames"], made["previews"])]
    prompts = {"content": f"{content.strip()} {icfg.added_prompt}".strip(), "quality": quality}
    return VideoResult(output=Path(made["output"]), previews=previews, frames=made["frames"],
                       total_frames=info.frames, prompts=prompts, seconds=seconds, peak_rss_mb=rss.peak / 2**20,
                       cuda_peak_mb=torch.cuda.max_memory_allocated(engine.device) / 2**20 if cuda else None,
                       notes=notes, mode=engine.settings.describe())
