"""`xpsr infer` on video: a clip, a folder of clips, or a folder of frames (``video.image_sequence=true``).

Per clip: index it (:mod:`xpsr.video.source`), refuse it early if a frame is over the size limits, super-resolve
its chunks (:mod:`xpsr.video.chunks`; each claimed, so several processes share a clip and a rerun after a kill
continues), then encode the output once every chunk is there (:mod:`xpsr.video.encode`) and write
``NAME.video_report.json``. A clip's problems (:class:`VideoError`, size limits) are recorded in
``video_report.json`` and the run goes on with the next clip.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from xpsr.config import InferConfig, to_dict
from xpsr.config.video import VIDEO_SUFFIXES
from xpsr.errors import shown
from xpsr.video.source import Clip, ClipInfo, VideoError, probe, probe_sequence

SAMPLER_KEYS = ("mode", "scheduler", "num_inference_steps", "guidance_scale", "start_from", "added_noise_level",
                "upscale", "process_size", "color_fix", "dtype", "weights")


def is_video_input(cfg: InferConfig) -> bool:
    """Whether `xpsr infer` should hand ``cfg.input`` to the video path."""
    src = Path(cfg.input)
    if cfg.video.image_sequence:
        return True
    if src.is_file():
        return src.suffix.lower() in VIDEO_SUFFIXES
    return src.is_dir() and any(p.suffix.lower() in VIDEO_SUFFIXES for p in src.rglob("*") if p.is_file())


def list_clips(cfg: InferConfig) -> tuple[list[Path], Path]:
    """(clips, their root): the input clip, every video file under the input folder, or the frame folder."""
    src = Path(cfg.input)
    if not src.exists():
        raise FileNotFoundError(f"input {shown(src)} does not exist")
    if cfg.video.image_sequence:
        if not src.is_dir():
            raise ValueError(f"input {shown(src)}: video.image_sequence=true needs a folder of frames")
        return [src], src.parent
    if src.is_file():
        return [src], src.parent
    clips = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                   and not p.name.startswith(".tmp-"))
    return clips, src


def clip_prompts(cfg: InferConfig, first_frame) -> tuple[str, str]:
    """One prompt pair for the whole clip (per-frame captions would change and add flicker): the fixed prompts,
    or the heuristic quality description of the first frame with an empty content prompt."""
    from xpsr.inference.run import clean_prompt

    if cfg.prompts == "fixed":
        return clean_prompt(cfg.prompt), clean_prompt(cfg.quality_prompt)
    from xpsr.captions.heuristic import describe, measure

    return "", describe(measure(first_frame))


def output_of(clip: Path, root: Path, out: Path, cfg: InferConfig) -> Path:
    from xpsr.video.encode import output_suffix

    rel = clip.relative_to(root)
    suffix = output_suffix(clip.suffix if clip.is_file() else ".mp4", cfg.video)
    return out / rel.with_name(rel.name + suffix if clip.is_dir() else rel.stem + suffix)


def check_clip(info: ClipInfo, cfg: InferConfig) -> None:
    """The per-frame size limits of `xpsr infer`, on the clip's frame size, before any frame is decoded."""
    from xpsr.inference.run import check_size

    check_size(shown(info.path), info.height, info.width, cfg)


def load_ready_modules(cfg: InferConfig, device):
    from xpsr.inference.run import check_mode, load_modules
    from xpsr.models.build import DTYPES

    modules = load_modules(cfg)
    check_mode(modules, cfg)
    for m in (modules.unet, modules.controlnet, modules.vae, modules.text_encoder):
        m.to(device).eval()
        if cfg.dtype != "fp32":
            m.to(dtype=DTYPES[cfg.dtype])
    return modules


def run_video(cfg: InferConfig, modules=None) -> dict:
    """Super-resolve every clip of ``cfg.input`` into ``cfg.output_dir``; returns the run's report."""
    from xpsr.video.encode import check_encoder

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if cfg.upscale < 1:
        raise ValueError(f"upscale={cfg.upscale}: must be at least 1")
    clips, root = list_clips(cfg)
    out = Path(cfg.output_dir)
    if Path(cfg.input).is_dir() and out.resolve().is_relative_to(Path(cfg.input).resolve()):
        raise ValueError(f"output_dir={shown(out)} is inside input={shown(cfg.input)}; choose a folder outside it")
    out.mkdir(parents=True, exist_ok=True)
    check_encoder(cfg.video, "video.codec")
    start, results, errors = time.perf_counter(), [], []
    for clip in clips:
        try:
            target = output_of(clip, root, out, cfg)
            if modules is None and not _finished(target, cfg):
                modules = load_ready_modules(cfg, device)
            results.append(super_resolve_clip(modules, clip, target, cfg, device))
        except VideoError as e:
            errors.append({"input": shown(clip), "error": str(e)})
            print(f"infer: {e}")
        except Exception as e:
            from xpsr.inference.run import SizeRefused

            if not isinstance(e, SizeRefused):
                raise
            errors.append({"input": shown(clip), "error": str(e)})
            print(f"infer: {e}")
    finished = [r for r in results if not (r.get("waiting_for_other_processes") or r.get("finishing_elsewhere"))]
    report = {"clips": len(clips), "done": len(finished), "left_to_other_processes": len(results) - len(finished),
              "failed": len(errors), "errors": errors, "seconds": round(time.perf_counter() - start, 2),
              "outputs": [r["output"] for r in finished]}
    _write_json(out / "video_report.json", report)
    print(f"infer: {len(finished)} of {len(clips)} clips super-resolved, {len(errors)} failed, "
          f"{report['left_to_other_processes']} being finished by other processes "
          f"(see {shown(out / 'video_report.json')})")
    return report


def _finished(target: Path, cfg: InferConfig) -> bool:
    return (target.with_name(target.stem + "_frames") if cfg.video.codec == "png" else target).exists()


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=True))
    os.replace(tmp, path)


def index_clip(clip: Path, work: Path, cfg: InferConfig) -> ClipInfo:
    """The clip's index, read from the work folder when an earlier run made it (the input must be unchanged)."""
    stored = work / "info.json"
    if stored.is_file():
        return ClipInfo.from_json(stored.read_text())
    v = cfg.video
    info = probe_sequence(clip, v.sequence_fps, v.max_frames) if v.image_sequence else probe(clip, v.max_frames)
    check_clip(info, cfg)
    work.mkdir(parents=True, exist_ok=True)
    _write_json(stored, json.loads(info.to_json()))
    return info


def super_resolve_clip(modules, clip: Path, target: Path, cfg: InferConfig, device, bar: bool = True) -> dict:
    """One clip: its chunks (those not done and not claimed), then the output when all are done."""
    from xpsr.inference.claims import release_claim, try_claim
    from xpsr.video import chunks as ch
    from xpsr.video.sampler import FrameSampler

    if _finished(target, cfg):
        return {"output": shown(target), "skipped_existing": True}
    target.parent.mkdir(parents=True, exist_ok=True)
    work = ch.work_folder(target.parent, target.name)
    info = index_clip(clip, work, cfg)
    v = cfg.video
    overlap = v.chunk_overlap if v.stability in ("flow", "carry") else 0
    chunks = ch.plan(info.frames, v.chunk_frames, overlap)
    start = time.perf_counter()
    progress = tqdm(total=info.frames, unit="frame", desc=f"video {clip.name}", disable=not bar)
    progress.update(sum(c.stop - c.start for c in chunks if ch.done(work, c)))
    made = 0
    prompts = clip_prompts(cfg, next(Clip(info).frames(0, 1)))
    for chunk in chunks:
        if ch.done(work, chunk):
            continue
        claim = try_claim(work / chunk.name)
        if claim is None:  # another process is on it
            continue
        try:
            if not ch.done(work, chunk):
                sampler = FrameSampler(modules, cfg, device, *prompts)
                frames = _chunk_frames(sampler, info, chunk, ch.saved_state(work, chunk), progress)
                ch.save_chunk(work, chunk, frames, sampler.state)
                made += chunk.stop - chunk.start
        finally:
            release_claim(claim, work / chunk.name)
    seconds = time.perf_counter() - start
    if not all(ch.done(work, c) for c in chunks):
        progress.close()
        return {"output": shown(target), "frames_made": made, "waiting_for_other_processes": True}
    return _finish(info, chunks, work, target, cfg, {"frames_made": made, "seconds": seconds, "prompts": prompts},
                   progress)


def _chunk_frames(sampler, info: ClipInfo, chunk, state: dict | None, progress):
    """The chunk's SR frames: continuing from ``state`` (its predecessor's), or after a warm-up."""
    first = chunk.warmup
    if state is not None:
        sampler.restore(state)
        first = chunk.start
    for index, lr in enumerate(Clip(info).frames(first, chunk.stop), first):
        sr = sampler(index, lr)
        if index >= chunk.start:
            progress.update(1)
            yield index, sr


def _finish(info: ClipInfo, chunks, work: Path, target: Path, cfg: InferConfig, stats: dict, progress) -> dict:
    """Encode (or move the PNG frames) once, under a claim on the output, then the report; removes the work."""
    from xpsr.inference.claims import release_claim, try_claim
    from xpsr.video import chunks as ch
    from xpsr.video.encode import encode_clip

    progress.close()
    claim = try_claim(target)
    if claim is None:
        return {"output": shown(target), "finishing_elsewhere": True}
    try:
        if _finished(target, cfg):
            return {"output": shown(target), "skipped_existing": True}
        start = time.perf_counter()
        kept = {"codec": "png"}
        if cfg.video.codec != "png":
            with tqdm(total=info.frames, unit="frame", desc=f"encode {target.name}") as bar:
                kept = encode_clip(info, ch.read_frames(work, chunks), target, cfg.video,
                                   (info.width * cfg.upscale, info.height * cfg.upscale), cfg.video.copy_audio,
                                   lambda: bar.update(1))
        if cfg.video.frames or cfg.video.codec == "png":
            ch.move_frames(work, chunks, target.with_name(target.stem + "_frames"))
        report = {"input": shown(info.path), "output": shown(target), "frames": info.frames, "chunks": len(chunks),
                  "size_in": [info.width, info.height], "frame_rate": f"{info.rate[0]}/{info.rate[1]}",
                  "variable_frame_rate": len({b - a for a, b in zip(info.pts, info.pts[1:])}) > 1,
                  "seed": cfg.seed, "prompts": stats["prompts"], "kept": kept,
                  "frames_made_this_run": stats["frames_made"], "seconds_sr": round(stats["seconds"], 2),
                  "seconds_per_frame": round(stats["seconds"] / stats["frames_made"], 3) if stats["frames_made"]
                  else None, "seconds_encode": round(time.perf_counter() - start, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "settings": {"video": to_dict(cfg.video), **{k: getattr(cfg, k) for k in SAMPLER_KEYS}}}
        _write_json(target.with_name(target.stem + ".video_report.json"), report)
        shutil.rmtree(work, ignore_errors=True)
        return report
    finally:
        release_claim(claim, target)
