"""`xpsr prepare` with ``video.clips=true``: LR/HR *clips* from videos, for fine-tuning on video-like degradations.

A clip is ``clip_frames`` frames of one video (every ``frame_step``-th). It gets ONE crop position and ONE draw
of the Real-ESRGAN second-order degradation (kernels, resize factors and modes, noise kind and level, JPEG
qualities: the operations fixed over time, as a camera and a transcoding chain would be); each frame is degraded
with that draw (fresh noise samples per frame with ``noise_per_frame``, the level still the clip's), then the LR
frames go through a real video codec (:mod:`xpsr.video.roundtrip`) at a CRF drawn per clip, and the decoded
frames are the LR frames. Output: ``hr/<clip>/<frame>.png``, ``lr/<clip>/<frame>.png``, one manifest line per
frame that the image dataset reads as a pair (with ``clip_id``, ``frame_index``, ``codec``, ``quality``,
``draw_key`` for a temporal model to group them), and ``report.json``.

Every draw comes from (seed, source content hash, clip index, crop, variant): same inputs and seed, same bytes.
A clip is written into ``.tmp-<clip>`` folders renamed when whole; its manifest lines follow, so a rerun skips
every clip whose lines are all there and remakes (with the same bytes) one that was cut short.
"""
from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from xpsr.config import PrepareConfig, to_dict
from xpsr.data.degradations import SEED_MAX, degrade, sample_degradation, usm_sharpen
from xpsr.data.images import file_hash, save_png_atomic
from xpsr.data.manifest import (
    DiskFullError,
    ManifestWriter,
    NothingUsableError,
    read_manifest,
    recipe_name,
    remove_temp_files,
    reporting_disk_full,
    write_report,
)
from xpsr.data.pairs import check_inputs_apart, init_worker, output_folder
from xpsr.video.roundtrip import CodecError, codec_roundtrip
from xpsr.video.source import Clip, VideoError
from xpsr.video.training_inputs import ClipJob, frame_id, plan_clips, skip_input

TEMP = ".tmp-"


@dataclass
class ClipDraws:
    """Every random choice of one clip."""

    box: tuple[int, int]  # (y, x) of the HR crop
    params: dict  # the degradation draw shared by the clip's frames
    codec: str
    crf: int


def recipe(cfg: PrepareConfig) -> str:
    d = cfg.degradation
    return "video-" + recipe_name(d.usm_gt, d.degrade_sharpened)


def settings_hash(cfg: PrepareConfig) -> str:
    """Fingerprint of every setting that changes a clip's bytes (not the counts, which only add clips)."""
    keys = ("seed", "scale", "crop_size", "test_set", "test_crop")
    video = {k: v for k, v in to_dict(cfg.video).items() if k not in ("clips_per_video", "image_sequences")}
    settings = {k: getattr(cfg, k) for k in keys} | {"degradation": to_dict(cfg.degradation), "video": video}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def draw_clip(cfg: PrepareConfig, job: ClipJob) -> ClipDraws:
    """The clip's crop, degradation, codec and quality; the crop depends on the crop index only (as for images)."""
    key = int(job.source_hash, 16) % 2**63
    h, w, c = job.info.height, job.info.width, cfg.crop_size
    if cfg.test_set and cfg.test_crop == "centre":
        box = ((h - c) // 2, (w - c) // 2)
    else:
        rng = np.random.default_rng([cfg.seed, key, job.window, job.crop])
        box = (int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1)))
    params = sample_degradation(cfg.degradation, np.random.default_rng([cfg.seed, key, job.window, job.crop,
                                                                         job.variant]))
    rng = np.random.default_rng([cfg.seed, key, job.window, job.crop, job.variant, 2])
    codec = str(cfg.video.codecs[int(rng.integers(len(cfg.video.codecs)))])
    lo, hi = cfg.video.crf_range
    return ClipDraws(box, params, codec, int(rng.integers(lo, hi + 1)))


def frame_params(params: dict, index: int, noise_per_frame: bool) -> dict:
    """A frame's degradation record: the clip's, with fresh noise seeds per frame when ``noise_per_frame``
    (the noise kind, level and grey-or-colour choice stay the clip's)."""
    params = copy.deepcopy(params)
    if not noise_per_frame:
        return params
    rng = np.random.default_rng([params["noise_seed"], index])
    params["noise_seed"] = int(rng.integers(0, SEED_MAX))
    for stage in (params["stage1"], params["stage2"]):
        if stage is not None and "gray_seed" in stage["noise"]:
            stage["noise"]["gray_seed"] = int(rng.integers(0, SEED_MAX))
    return params


def draw_key(params: dict) -> str:
    """Hash of a degradation record without its noise seeds: equal for every frame of a clip."""
    shared = copy.deepcopy(params)
    shared.pop("noise_seed", None)
    for stage in (shared["stage1"], shared["stage2"]):
        if stage is not None:
            stage["noise"].pop("gray_seed", None)
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def degrade_frames(cfg: PrepareConfig, draws: ClipDraws, frames: list[np.ndarray]) -> tuple[list, list, list]:
    """(HR frames, LR frames before the codec, degradation record per frame), all uint8 HWC / plain JSON."""
    d, c = cfg.degradation, cfg.crop_size
    y, x = draws.box
    hrs, lrs, records = [], [], []
    for index, frame in enumerate(frames):
        gt = frame[y:y + c, x:x + c].astype(np.float32) / 255.0
        hr = usm_sharpen(gt, d.usm_weight, d.usm_radius, d.usm_threshold) if d.usm_gt else gt
        params = frame_params(draws.params, index, cfg.video.noise_per_frame)
        src = torch.from_numpy(np.ascontiguousarray(hr if d.degrade_sharpened else gt)).permute(2, 0, 1)[None]
        lr = degrade(src.to(torch.device(cfg.device)), params, cfg.scale)[0].permute(1, 2, 0).cpu().numpy()
        hrs.append((np.clip(hr, 0, 1) * 255).round().astype(np.uint8))
        lrs.append((lr * 255).round().astype(np.uint8))
        records.append(params)
    return hrs, lrs, records


def _write_clip(out: Path, clip: str, images: dict[str, list[np.ndarray]]) -> None:
    """Frames into ``.tmp-<clip>`` folders, then renamed to ``<clip>``: a final folder is always whole."""
    for folder, frames in images.items():
        tmp, final = out / folder / f"{TEMP}{clip}", out / folder / clip
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, img in enumerate(frames):
            with reporting_disk_full(tmp / f"{i:04d}.png"):
                save_png_atomic(img, tmp / f"{i:04d}.png")
        shutil.rmtree(final, ignore_errors=True)  # left by a run stopped before this clip's lines were written
        os.replace(tmp, final)


def make_clip(cfg: PrepareConfig, job: ClipJob, frames: list[np.ndarray]) -> list[dict]:
    """Degrade, encode and write one clip; returns its manifest records in frame order."""
    out = Path(cfg.output_dir)
    draws = draw_clip(cfg, job)
    hrs, pre_codec, params = degrade_frames(cfg, draws, frames)
    lrs, size = codec_roundtrip(pre_codec, draws.codec, draws.crf, cfg.video.frame_rate)
    _write_clip(out, job.clip_id, {"hr": hrs, "lr": lrs})
    y, x = draws.box
    records = []
    for i, p in enumerate(params):
        hr, lr = f"hr/{job.clip_id}/{i:04d}.png", f"lr/{job.clip_id}/{i:04d}.png"
        records.append({
            "id": frame_id(job.clip_id, i), "hr": hr, "lr": lr, "source": str(job.source),
            "hr_hash": file_hash(out / hr), "lr_hash": file_hash(out / lr), "source_hash": job.source_hash,
            "crop_box": [x, y, cfg.crop_size, cfg.crop_size], "scale": cfg.scale, "seed": cfg.seed,
            "crop_index": job.crop, "variant": job.variant, "usm": cfg.degradation.usm_gt, "recipe": recipe(cfg),
            "settings_hash": settings_hash(cfg), "degradation": p, "notes": [],
            "clip_id": job.clip_id, "frame_index": i, "clip_frames": len(params), "source_frame": job.frames[i],
            "codec": draws.codec, "quality": draws.crf, "quality_kind": "crf", "codec_bytes": size,
            "draw_key": draw_key(p),
        })
    return records


def _check(cfg: PrepareConfig) -> None:
    if cfg.paired_hr or cfg.paired_lr:
        raise ValueError("prepare: video.clips=true makes pairs from videos; paired_hr/paired_lr import images")
    if not cfg.inputs:
        raise ValueError("prepare: give inputs=[DIR_OR_VIDEO,...] (videos, searched recursively)")
    check_inputs_apart(cfg)


def remove_temp_clips(out: Path) -> int:
    """The ``.tmp-<clip>`` folders (and temp files) an interrupted run left; call while holding the lock."""
    removed = 0
    for folder in ("hr", "lr"):
        for tmp in (out / folder).glob(f"{TEMP}*"):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
                removed += 1
    return removed + remove_temp_files(out)


def prepare_clips(cfg: PrepareConfig) -> dict:
    """Run `prepare` on videos; returns the stats written to report.json. Raises if no clip exists at the end."""
    _check(cfg)
    out = Path(cfg.output_dir)
    with output_folder(out, recipe(cfg), {"settings_hash": settings_hash(cfg)}, remove_temp_clips,
                       "temp clips/files") as (writer, existing):
        done, entries = {r["id"] for r in existing}, []
        jobs, finished = plan_clips(cfg, done, entries)
        start = time.perf_counter()
        made, frames = _run(cfg, jobs, done, writer, entries)
        seconds = time.perf_counter() - start
    return _report(cfg, out, entries, {"clips_made": made, "frames_made": frames, "clips_skipped_as_done": finished,
                                       "seconds": round(seconds, 3)})


def process_clip(job: ClipJob, cfg: PrepareConfig) -> dict:
    """Decode, degrade, encode and write one clip: ``{"records": [...]}``, or ``{"problem": line}`` for a clip
    its video cannot give, or ``{"error": DiskFullError}`` (raised by the parent after the lines before it)."""
    try:
        decoded = list(Clip(job.info).frames(job.frames[0], job.frames[-1] + 1))[::cfg.video.frame_step]
        return {"records": make_clip(cfg, job, decoded)}
    except (VideoError, CodecError) as e:
        return {"problem": str(e)}
    except DiskFullError as e:
        return {"error": e}


def _worker(args: tuple[ClipJob, PrepareConfig]) -> dict:
    return process_clip(*args)


def _run(cfg: PrepareConfig, jobs: list[ClipJob], done: set[str], writer: ManifestWriter,
         entries: list[dict]) -> tuple[int, int]:
    """Make the clips of ``jobs``; manifest lines in job order whatever the worker count (same bytes)."""
    workers = 0 if cfg.device != "cpu" else min(cfg.workers, len(jobs))
    with tqdm(total=len(jobs), desc="prepare clips", unit="clip") as bar:
        if workers == 0:
            return _consume((process_clip(j, cfg) for j in jobs), jobs, done, writer, entries, bar)
        with mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(os.getpid(),)) as pool:
            return _consume(pool.imap(_worker, [(j, cfg) for j in jobs]), jobs, done, writer, entries, bar)


def _consume(results, jobs: list[ClipJob], done: set[str], writer: ManifestWriter, entries: list[dict],
             bar) -> tuple[int, int]:
    """Append each clip's lines; a clip its video cannot give is reported (one line per video) and skipped."""
    made, frames, reported = 0, 0, set()
    for job, result in zip(jobs, results):
        bar.update(1)
        if "problem" in result:
            if job.source not in reported:  # later clips of a damaged video fail alike: one line for the file
                skip_input(entries, job.source, result["problem"])
                reported.add(job.source)
            continue
        for record in result.get("records", []):
            if record["id"] not in done:  # lines of a clip cut short by a kill are already there
                writer.write(record)
                frames += 1
        if "error" in result:
            raise result["error"]
        made += 1
    return made, frames


def _report(cfg: PrepareConfig, out: Path, entries: list[dict], stats: dict) -> dict:
    records = read_manifest(out / "manifest.jsonl")
    clips = {r["clip_id"] for r in records if "clip_id" in r}
    codecs = {}
    for r in records:
        if r.get("frame_index") == 0:
            codecs[r["codec"]] = codecs.get(r["codec"], 0) + 1
    stats |= {"clips_total": len(clips), "frames_total": len(records), "codecs": codecs,
              "frames_per_s": round(stats["frames_made"] / stats["seconds"], 3) if stats["seconds"] > 0 else None,
              "inputs_skipped": sum(e["decision"] == "skipped" for e in entries)}
    write_report(out, entries, stats, to_dict(cfg))
    print(f"prepare: {stats['clips_made']} new clips ({stats['frames_made']} frames) in {stats['seconds']:.1f}s, "
          f"{len(clips)} clips in the manifest, {stats['inputs_skipped']} inputs skipped (see report.json)")
    if not records:
        raise NothingUsableError(f"prepare: no usable clip was produced in {out} (see report.json)")
    return stats
