"""A clip's work folder: its index, and its frames in chunks, each finished chunk a folder of PNGs.

``OUTPUT_DIR/.tmp-video-NAME/`` holds ``info.json`` (the clip's index) and one ``chunk-NNNNN/`` folder per
finished chunk, written as ``chunk-NNNNN.partial/`` and renamed when its last frame is saved, so a kill costs at
most the chunks in flight. Chunks are claimed with the image claims of `xpsr infer` (a lock the kernel drops
when its process dies), so several processes share one clip. A chunk's frames depend only on its index, never
on when it was made: a chunk continues from the state its predecessor saved (the noise fields, the last LR
frame and, for ``carry``, the last SR frame), so a resumed run gives the frames of an uninterrupted one, which
are those of a run without chunks. A chunk whose predecessor is not finished yet (another process is on it)
starts ``overlap`` frames early from fresh noise and drops those warm-up frames: several processes get a seam
in time there (measured in docs/video.md).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

WORK_PREFIX = ".tmp-video-"
STATE = "state.safetensors"


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # first frame kept
    stop: int  # one past the last frame kept
    warmup: int  # first frame processed (start - overlap, at least 0)

    @property
    def name(self) -> str:
        return f"chunk-{self.index:05d}"


def plan(frames: int, size: int, overlap: int) -> list[Chunk]:
    """The chunks of a clip of ``frames`` frames."""
    return [Chunk(i, s, min(s + size, frames), max(0, s - overlap)) for i, s in enumerate(range(0, frames, size))]


def work_folder(out: Path, name: str) -> Path:
    return out / f"{WORK_PREFIX}{name}"


def done(work: Path, chunk: Chunk) -> bool:
    return (work / chunk.name).is_dir()


def saved_state(work: Path, chunk: Chunk) -> dict | None:
    """The state the chunk before ``chunk`` ended with, if that chunk is finished."""
    if chunk.index == 0 or not (work / f"chunk-{chunk.index - 1:05d}" / STATE).is_file():
        return None
    from safetensors.torch import load_file

    return load_file(work / f"chunk-{chunk.index - 1:05d}" / STATE)


def frame_name(index: int) -> str:
    return f"{index:06d}.png"


def save_chunk(work: Path, chunk: Chunk, frames: Iterator[tuple[int, np.ndarray]], state=None) -> None:
    """Write the chunk's kept frames to ``chunk.partial/`` (and ``state()``, what the next chunk continues from,
    as ``state.safetensors``), then rename it to the chunk's final folder."""
    partial = work / f"{chunk.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a killed run's half chunk
    partial.mkdir()
    for index, rgb in frames:
        Image.fromarray(rgb).save(partial / frame_name(index), compress_level=1)
    if state is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state().items()}, partial / STATE)
    fd = os.open(partial, os.O_RDONLY)  # the frames reach the disk before the folder gets its final name
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, work / chunk.name)


def read_frames(work: Path, chunks: list[Chunk]) -> Iterator[np.ndarray]:
    """Every kept frame, in order (one in memory at a time)."""
    for chunk in chunks:
        for index in range(chunk.start, chunk.stop):
            with Image.open(work / chunk.name / frame_name(index)) as im:
                yield np.asarray(im.convert("RGB"))


def move_frames(work: Path, chunks: list[Chunk], target: Path) -> None:
    """The PNG frames into ``target`` (a final folder name, filled under a temp name first)."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for chunk in chunks:
        for index in range(chunk.start, chunk.stop):
            os.replace(work / chunk.name / frame_name(index), tmp / frame_name(index))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
