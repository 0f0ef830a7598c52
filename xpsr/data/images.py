"""Robust image I/O: odd inputs become RGB uint8 with a note saying what was done, or a clear error.

Hostile inputs are bounded before any pixel is decoded, so one file can neither exhaust memory nor hang a
batch: the size in the header must stay within ``MAX_IMAGE_PIXELS``, only the formats in ``FORMATS`` are
opened (no external decoders such as Ghostscript), a JPEG may hold at most ``MAX_JPEG_SCANS`` scans (each
scan of a progressive JPEG is a pass over the whole image: a 150 KB file with 2000 scans took 83 s), and a
format that Pillow decodes in Python (RLE-compressed BMP, about 1 s per megapixel) stays within
``MAX_PYTHON_DECODED_PIXELS``. What remains is decoding time proportional to the pixels and the file's bytes.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from xpsr.errors import OutputError, XPSRError, shown

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# Names of our own unfinished files (``save_png_atomic``'s temp files, claim files of `xpsr infer`): a kill can
# leave them behind, so every stage skips them when it lists images and the stage that owns them cleans them.
TEMP_PREFIX = ".tmp-"
# What the content may be, whatever the suffix says (JPEG includes MPO, the multi-picture JPEG of cameras).
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Pillow's own default limit (Image.MAX_IMAGE_PIXELS, 89,478,485 px, e.g. 9459 x 9459): 268 MB as RGB uint8.
MAX_IMAGE_PIXELS = 89_478_485
MAX_JPEG_SCANS = 64  # a progressive JPEG from libjpeg has 10; mozjpeg's optimised scripts stay well below 64
MAX_PYTHON_DECODED_PIXELS = 4_194_304  # 2048 x 2048: about 5 s in Pillow's pure-Python RLE BMP decoder

# load_rgb refuses these sizes itself, naming the file; Pillow's warning (same limit) would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(XPSRError, ValueError):
    """An input that cannot be used as an image; the message names the file and says why."""


def list_images(folders: list[str | Path], skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Every image file under ``folders`` (recursive; an image file stands for itself), sorted, so the order
    is stable across runs. Our own temp files (names starting with ``TEMP_PREFIX``) are never listed.

    Symlinked folders are followed, each real folder once, so a symlink loop ends the walk there. What
    cannot be listed (a loop, an unreadable folder, a broken link) is appended to ``skipped`` as
    ``(path, reason)`` when a list is given."""
    found, problems = [], []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file() and folder.suffix.lower() in IMAGE_SUFFIXES:
            found.append(folder)
            continue
        if not folder.is_dir():
            what = "is neither a folder nor an image file" if os.path.lexists(folder) else "does not exist"
            raise FileNotFoundError(f"input folder {shown(folder)} {what}")
        found += _walk_images(folder, problems)
    if skipped is not None:
        skipped += problems
    elif problems:
        warnings.warn(f"{len(problems)} entries not listed, e.g. {problems[0][0]}: {problems[0][1]}", stacklevel=2)
    return sorted(found)


def _walk_images(root: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    def unreadable(err: OSError) -> None:
        skipped.append((shown(err.filename or root), f"cannot list this folder ({err.strerror or err})"))

    seen: set[tuple[int, int]] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a symlink: a loop or a second link
            skipped.append((shown(dirpath), "folder already listed (symlink loop or duplicate link)"))
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES or name.startswith(TEMP_PREFIX):
                continue  # our own unfinished files are never inputs
            try:
                regular = stat.S_ISREG(path.stat().st_mode)
            except OSError as e:  # a broken link or a link loop
                skipped.append((shown(path), f"cannot read ({e.strerror or e})"))
                continue
            if regular:  # FIFOs and devices are never opened: reading them can block forever
                found.append(path)
            else:
                skipped.append((shown(path), "not a regular file"))
    return found


def file_hash(path: str | Path) -> str:
    """sha256 of the file's bytes (hex, 16 chars): identifies content independently of its name."""
    h = hashlib.sha256()
    try:
        with open(_regular_file(path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise ImageError(f"{shown(path)}: cannot read ({e.strerror or e})") from e
    return h.hexdigest()[:16]


def _all_bytes(source: str | Path | BinaryIO) -> bytes:
    if not isinstance(source, (str, os.PathLike)):  # a stream (bytes already in memory): read, then rewind
        position = source.tell()
        source.seek(0)
        data = source.read()
        source.seek(position)
        return data
    with open(source, "rb") as f:
        return f.read()


def _regular_file(path: str | Path | BinaryIO) -> str | Path | BinaryIO:
    """``path`` when it is a regular file (opening a FIFO blocks forever) or an open stream; raises ImageError
    otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ImageError(f"{shown(path)}: cannot read ({e.strerror or e})") from e
    if stat.S_ISDIR(mode):
        raise ImageError(f"{shown(path)}: is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise ImageError(f"{shown(path)}: not a regular file (a pipe, socket or device)")
    return path


_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")  # a marker: not stuffed 0xFF00 nor a restart marker
MAX_JPEG_MARKERS = 4096  # a camera JPEG has a few dozen; walking a flood of empty segments in Python takes long


def jpeg_scan_count(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """Start-of-scan segments of a JPEG stream (all images of an MPO); counting stops above ``stop_after``,
    and a stream with more than MAX_JPEG_MARKERS markers counts as ``stop_after + 1``."""
    scans, pos = 0, 2
    for _ in range(MAX_JPEG_MARKERS):
        m = _JPEG_MARKER.search(data, pos)
        if m is None or scans > stop_after:
            return scans
        marker, pos = m.group(1)[0], m.end()
        if marker in (0xD8, 0xD9, 0x01):  # SOI, EOI, TEM: no length field
            continue
        scans += marker == 0xDA
        pos += max(int.from_bytes(data[pos:pos + 2], "big"), 2)  # entropy-coded data: skipped by the search
    return stop_after + 1


def _check_bounds(im: Image.Image, path: str | Path | BinaryIO, max_pixels: int) -> None:
    """Refuse, from the header alone, what would take too much memory or time to decode."""
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(f"{shown(path)}: {width}x{height} = {width * height:,} pixels is over the limit of "
                         f"{max_pixels:,} (decompression-bomb guard, MAX_IMAGE_PIXELS); downscale or crop it first")
    if any(tile[0] in Image.DECODERS for tile in im.tile) and width * height > MAX_PYTHON_DECODED_PIXELS:
        raise ImageError(f"{shown(path)}: {width}x{height} {im.format} with {im.tile[0][0]} compression is decoded "
                         f"in Python (about 1 s per megapixel), refused above {MAX_PYTHON_DECODED_PIXELS:,} "
                         "pixels; convert it to PNG")
    if im.format in ("JPEG", "MPO"):
        if jpeg_scan_count(_all_bytes(path)) > MAX_JPEG_SCANS:
            raise ImageError(f"{shown(path)}: a JPEG with more than {MAX_JPEG_SCANS} scans or "
                             f"{MAX_JPEG_MARKERS} markers (each scan is a pass over the whole image: decoding "
                             "could take minutes); re-encode it")


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose, which also
# rewrites the EXIF block and can fail on a broken one; only the pixels are kept here)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _exif_orientation(im: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001 - broken EXIF is common and only costs the orientation
        notes.append(f"EXIF unreadable ({type(e).__name__}), orientation ignored")
        return im
    if orientation not in _ORIENTATION:
        return im
    notes.append(f"rotated by EXIF orientation {orientation}")
    return im.transpose(_ORIENTATION[orientation])


def _gray_to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    """Single-channel integer or float data (16-bit, 32-bit, float TIFF) as 8-bit grey RGB."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        finite = np.isfinite(arr)
        if not finite.all():
            notes.append("NaN/infinite values set to the nearest finite extreme")
            lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
            arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
        lo, hi = float(arr.min()), float(arr.max())
        gray = np.round((arr - lo) / max(hi - lo, 1e-12) * 255)
        notes.append("float image rescaled to 8-bit RGB")
    else:
        top = 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0
        gray = np.round(arr / top * 255)
        notes.append(f"{'16' if top > 255 else '8'}-bit integer ({im.mode}) to 8-bit RGB")
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _gray_to_rgb(im, notes)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba).convert("RGB")
        notes.append(f"alpha channel ({mode}) composited on white")
    elif mode != "RGB":
        im = im.convert("RGB")
        notes.append(f"{mode} converted to RGB")
    return np.array(im, dtype=np.uint8)


def load_rgb(path: str | Path | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Read ``path`` (a file, or an open binary stream whose str() names it) as an RGB uint8 HWC array; returns
    ``(array, notes)`` on conversions done.

    Handles EXIF orientation (ignored with a note when the EXIF is broken), grayscale/palette (to RGB), alpha
    (composited on white), CMYK, 16-bit or 32-bit integer and float data (scaled to 8 bits) and multi-frame
    files (the first frame, with a note). Raises :class:`ImageError`, and nothing else, for anything that is
    not a usable image: not a regular file, unreadable, an unsupported format, too large (``max_pixels``, read
    from the header before decoding), truncated or corrupt."""
    notes: list[str] = []
    try:
        with Image.open(_regular_file(path), formats=FORMATS) as im:
            _check_bounds(im, path, max_pixels)
            if getattr(im, "is_animated", False):
                notes.append(f"first frame of a multi-frame {im.format} used")
            im.load()
            return _to_rgb(_exif_orientation(im, notes), notes), notes
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{shown(path)}: not a readable image (formats read: {', '.join(FORMATS)})") from e
    except Image.DecompressionBombError as e:  # only when a caller's max_pixels is above Pillow's own limit
        raise ImageError(f"{shown(path)}: {e} (decompression-bomb guard, Pillow's MAX_IMAGE_PIXELS); downscale "
                         "or crop it first") from e
    except OSError as e:  # with an errno: the file system's answer (permission denied...); else Pillow's
        raise ImageError(f"{shown(path)}: cannot {'read' if e.errno else 'decode'} ({e.strerror or e})") from e
    except Exception as e:  # noqa: BLE001 - a corrupt file makes Pillow raise nearly anything (fuzzing found
        # SyntaxError, ValueError, struct.error, EOFError, IndexError, ...): for the caller it is one bad file
        raise ImageError(f"{shown(path)}: cannot decode ({type(e).__name__}: {e})") from e


def save_png_atomic(array: np.ndarray, path: str | Path) -> None:
    """Write an RGB uint8 array as PNG; readers never see a half-written file (temp file + rename).

    A folder that cannot be written (read-only, a file in the way, disk full) raises :class:`OutputError`
    naming it; nothing is left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".png")
    except OSError as e:
        raise OutputError.of(f"cannot write into output folder {shown(path.parent)} ({e.strerror or e})", e) from e
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError.of(f"cannot write {shown(path)} ({e.strerror or e})", e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
