"""The inputs of `prepare`'s video training data: video files found under ``inputs``, and (with
``video.image_sequences=true``) folders of frames, each folder that directly holds images being one video."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from xpsr.config import PrepareConfig
from xpsr.config.video import VIDEO_SUFFIXES
from xpsr.data.images import IMAGE_SUFFIXES, TEMP_PREFIX
from xpsr.video.source import ClipInfo, VideoError


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


def find_videos(cfg: PrepareConfig, entries: list[dict],
                skip: Callable[[list[dict], Path, str], None]) -> list[tuple[Path, bool]]:
    """Every video (and frame folder) under ``cfg.inputs``, sorted so the order is the same on every run. A file
    given directly that is no video is reported through ``skip``."""
    found: list[tuple[Path, bool]] = []
    for item in map(Path, cfg.inputs):
        if item.is_dir():
            found += _walk(item, cfg.video.image_sequences)
        elif _listed(item.name, VIDEO_SUFFIXES):
            found.append((item, False))
        else:
            skip(entries, item, f"{item}: not a video file (suffixes: {' '.join(VIDEO_SUFFIXES)})")
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
