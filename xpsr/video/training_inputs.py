"""The inputs of `prepare`'s video training data: video files found under ``inputs``, and (with
``video.image_sequences=true``) folders of frames, each folder that directly holds images being one video."""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from xpsr.config import PrepareConfig
from xpsr.config.video import VIDEO_SUFFIXES
from xpsr.data.images import IMAGE_SUFFIXES, TEMP_PREFIX, file_hash
from xpsr.video.source import ClipInfo, VideoError, probe


@dataclass
class ClipJob:
    """One clip to make: which frames of which video, and the indices its draws are keyed by."""

    source: Path
    source_hash: str
    info: ClipInfo
    window: int  # k-th clip of the video
    crop: int
    variant: int
    frames: list[int]  # frame indices in the video
    clip_id: str


def clip_id(source: Path, source_hash: str, window: int, crop: int, variant: int, test_set: bool) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.stem)[:64]
    base = f"{stem}-{source_hash[:8]}-k{window}"
    return base if test_set else f"{base}-c{crop}-v{variant}"


def frame_id(clip: str, index: int) -> str:
    return f"{clip}-f{index:04d}"


def skip_input(entries: list[dict], source: Path | str, reason: str) -> None:
    """One line naming the file on stderr, and its entry in report.json; the run goes on."""
    print(f"prepare: skipped {reason}", file=sys.stderr)
    entries.append({"source": str(source), "decision": "skipped", "reason": reason})


def _listed(name: str, suffixes) -> bool:
    return not name.startswith(TEMP_PREFIX) and Path(name).suffix.lower() in suffixes


def _walk(root: Path, sequences: bool) -> list[tuple[Path, bool]]:
    """(path, is a frame folder) under ``root``; symlinked folders followed once (a loop ends there)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
        found += [(Path(dirpath) / f, False) for f in filenames if _listed(f, VIDEO_SUFFIXES)]
        if sequences and any(_listed(f, IMAGE_SUFFIXES) for f in filenames):
            found.append((Path(dirpath), True))
    return found


def find_videos(cfg: PrepareConfig, entries: list[dict]) -> list[tuple[Path, bool]]:
    """Every video (and frame folder) under ``cfg.inputs``, sorted so the order is the same on every run. A file
    given directly that is no video is reported (:func:`skip_input`)."""
    found: list[tuple[Path, bool]] = []
    for item in map(Path, cfg.inputs):
        if item.is_dir():
            found += _walk(item, cfg.video.image_sequences)
        elif _listed(item.name, VIDEO_SUFFIXES):
            found.append((item, False))
        else:
            skip_input(entries, item, f"{item}: not a video file (suffixes: {' '.join(VIDEO_SUFFIXES)})")
    return sorted(set(found))


def probe_frame_folder(folder: Path) -> ClipInfo:
    """A folder's images (directly inside, sorted by name) as a clip; its size is that of the first frame."""
    from PIL import Image

    files = sorted(folder / f for f in os.listdir(folder) if _listed(f, IMAGE_SUFFIXES))
    try:
        with Image.open(files[0]) as im:
            width, height = im.size
    except (OSError, ValueError) as e:
        raise VideoError(f"{folder}: frame {files[0].name} is not a readable image ({e})") from e
    return ClipInfo(str(folder), width, height, list(range(len(files))), (1, 25), (25, 1), "images",
                    sequence=[str(f) for f in files])


def _windows(info: ClipInfo, cfg: PrepareConfig) -> list[list[int]]:
    """Frame indices of every clip the video holds: back to back from frame 0, whole clips only."""
    v = cfg.video
    span, stride = (v.clip_frames - 1) * v.frame_step + 1, v.clip_frames * v.frame_step
    count = 0 if info.frames < span else (info.frames - span) // stride + 1
    if v.clips_per_video:
        count = min(count, v.clips_per_video)
    return [list(range(k * stride, k * stride + span, v.frame_step)) for k in range(count)]


def _problem(info: ClipInfo, cfg: PrepareConfig) -> str | None:
    """Why a video gives no clip, or None."""
    v, c = cfg.video, cfg.crop_size
    if min(info.width, info.height) < c:
        return f"{info.path}: its {info.width}x{info.height} frames are smaller than the {c}px crop (crop_size)"
    span = (v.clip_frames - 1) * v.frame_step + 1
    if info.frames < span:
        return (f"{info.path}: {info.frames} frames, shorter than one clip ({span} frames: "
                f"video.clip_frames={v.clip_frames}, video.frame_step={v.frame_step})")
    return None


def plan_clips(cfg: PrepareConfig, done: set[str], entries: list[dict]) -> tuple[list[ClipJob], int]:
    """The clips still to make (and the count of those already done), videos in sorted order."""
    crops, variants = (1, 1) if cfg.test_set else (cfg.crops_per_image, cfg.variants)
    jobs, finished, first_of = [], 0, {}
    for source, is_folder in find_videos(cfg, entries):
        try:
            info = probe_frame_folder(source) if is_folder else probe(source)
            digest = info_hash(info) if is_folder else file_hash(source)
        except (VideoError, OSError) as e:
            skip_input(entries, source, str(e) if isinstance(e, VideoError) else f"{source}: cannot read ({e})")
            continue
        problem = _problem(info, cfg)
        if problem:
            skip_input(entries, source, problem)
            continue
        if clip_id(source, digest, 0, 0, 0, False) in first_of:  # a copy would make the very same clips
            skip_input(entries, source, f"{source}: duplicate of {first_of[clip_id(source, digest, 0, 0, 0, False)]}")
            continue
        first_of[clip_id(source, digest, 0, 0, 0, False)] = source
        for k, frames in enumerate(_windows(info, cfg)):
            for c in range(crops):
                for v in range(variants):
                    cid = clip_id(source, digest, k, c, v, cfg.test_set)
                    if all(frame_id(cid, i) in done for i in range(len(frames))):
                        finished += 1
                        continue
                    jobs.append(ClipJob(source, digest, info, k, c, v, frames, cid))
    return jobs, finished


def info_hash(info: ClipInfo) -> str:
    """Content hash of a frame folder: of its frames' hashes in order."""
    return hashlib.sha256("|".join(file_hash(f) for f in info.sequence).encode()).hexdigest()
