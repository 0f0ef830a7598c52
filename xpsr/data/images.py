"""Robust image I/O: odd inputs become RGB uint8 with a note saying what was done, or a clear error."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# Names of our own unfinished files (``save_png_atomic``'s temp files, claim files of `xpsr infer`): a kill can
# leave them behind, so every stage skips them when it lists images and the stage that owns them cleans them.
TEMP_PREFIX = ".tmp-"


class ImageError(ValueError):
    """An input that cannot be used as an image; the message says why."""


def list_images(folders: list[str | Path]) -> list[Path]:
    """Every image file under ``folders`` (recursive; an image file stands for itself), sorted, so the order
    is stable across runs. Our own temp files (names starting with ``TEMP_PREFIX``) are never listed."""
    found = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file() and folder.suffix.lower() in IMAGE_SUFFIXES:
            found.append(folder)
            continue
        if not folder.is_dir():
            raise FileNotFoundError(f"input folder {folder} does not exist")
        found += [p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(TEMP_PREFIX) and p.is_file()]
    return sorted(found)


def file_hash(path: str | Path) -> str:
    """sha256 of the file's bytes (hex, 16 chars): identifies content independently of its name."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_rgb(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read ``path`` as an RGB uint8 HWC array; returns ``(array, notes)`` on conversions done.

    Handles EXIF orientation, grayscale/palette (to RGB), alpha (composited on white), CMYK, and 16-bit
    or 32-bit integer data (scaled to 8 bits). Raises :class:`ImageError` for non-images and truncated files.
    """
    notes: list[str] = []
    try:
        with Image.open(path) as im:
            im.load()
            exif_orientation = im.getexif().get(0x0112, 1)
            if exif_orientation not in (1, None):
                im = ImageOps.exif_transpose(im)
                notes.append(f"rotated by EXIF orientation {exif_orientation}")
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0
                gray = np.clip(np.round(arr / top * 255), 0, 255).astype(np.uint8)
                notes.append(f"{'16' if top > 255 else '8'}-bit integer ({mode}) to 8-bit RGB")
                return np.repeat(gray[..., None], 3, axis=2), notes
            if mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                gray = np.round((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
                notes.append("float image rescaled to 8-bit RGB")
                return np.repeat(gray[..., None], 3, axis=2), notes
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba).convert("RGB")
                notes.append(f"alpha channel ({mode}) composited on white")
            elif mode != "RGB":
                im = im.convert("RGB")
                notes.append(f"{mode} converted to RGB")
            return np.array(im, dtype=np.uint8), notes
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not a readable image") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot decode ({e})") from e


def save_png_atomic(array: np.ndarray, path: str | Path) -> None:
    """Write an RGB uint8 array as PNG; readers never see a half-written file (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".png")
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
