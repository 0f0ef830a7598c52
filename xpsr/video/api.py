"""Video for the other faces: ``XPSRPipeline.super_resolve_video`` and the web app (`xpsr serve`).

Both go through :func:`xpsr.video.run.run_video`, the code path of `xpsr infer input=clip.mp4`: same chunks,
stability methods, timestamps, audio and report; only the model comes from the caller.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from xpsr.config import InferConfig
from xpsr.video.run import output_of, run_video


def super_resolve_video(modules, input: str | Path, output_dir: str | Path, device: str = "cpu",
                        **options: Any) -> dict:
    """Super-resolve a clip, a folder of clips or (``video={"image_sequence": True}``) a folder of frames with
    an in-memory model (an ``XPSRPipeline`` or :class:`~xpsr.models.build.XPSRModules`). ``options`` are
    `xpsr infer` keys, checked like the CLI's; ``video`` is a dict of ``video.*`` keys. Returns the run report
    (``outputs``: the files written)."""
    from xpsr.inference.diffusers_pipeline import infer_config

    cfg = dataclasses.replace(infer_config(**options), input=str(input), output_dir=str(output_dir), device=device)
    return run_video(cfg, modules=modules)


def super_resolve_clip_for_app(modules, clip: str | Path, output_dir: str | Path, cfg: InferConfig,
                               max_frames: int = 48, previews: int = 3) -> dict:
    """What the web app shows for an uploaded clip: the first ``max_frames`` frames super-resolved (``cfg``'s
    sampler and video settings), the output file, and ``previews`` (LR frame enlarged to the SR size, SR frame)
    pairs at evenly spaced frames for a before/after view. Bad clips raise :class:`VideoError` (one line)."""
    from xpsr.errors import shown
    from xpsr.video.source import VideoError

    clip, out = Path(clip), Path(output_dir)
    video = dataclasses.replace(cfg.video, max_frames=max_frames, image_sequence=False)
    cfg = dataclasses.replace(cfg, input=str(clip), output_dir=str(out), video=video)
    report = run_video(cfg, modules=modules)
    if report["errors"]:
        raise VideoError(report["errors"][0]["error"])
    target = output_of(clip, clip.parent, out, cfg)
    if not target.is_file():
        raise VideoError(f"{shown(clip)}: no output was written")
    lr, sr = _decode(clip, max_frames), _decode(target, max_frames)
    picks = np.linspace(0, len(sr) - 1, min(previews, len(sr))).round().astype(int)
    pairs = [(_enlarged(lr[i], sr[i].shape[:2]), sr[i]) for i in picks]
    return {"output": str(target), "frames": len(sr), "preview_frames": [int(i) for i in picks],
            "previews": pairs, "report": str(target.with_name(target.stem + ".video_report.json"))}


def _decode(path: Path, limit: int) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == limit:
                break
    return frames


def _enlarged(lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The LR frame at the SR size (nearest neighbour: shows the input's pixels as they are)."""
    from PIL import Image

    return np.asarray(Image.fromarray(lr).resize((size[1], size[0]), Image.NEAREST))
