"""Processing-size limits: the one check shared by `xpsr infer`, ``XPSRPipeline`` and `xpsr serve`.

An input is refused when its output (input x upscale) or its processing size (the output with its short side
raised to ``process_size``) is over ``max_output_pixels`` / ``max_process_pixels``. A 1x3000 strip at x4 would
otherwise be processed at 512 x 1,536,000 px: minutes of work and gigabytes of memory for a useless result.
Every face calls :func:`check_size` (or :func:`header_check` before decoding a file), so the limits and the
message are the same wherever the image comes from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from xpsr.errors import XPSRError, shown
from xpsr.inference.pipeline import output_size


class SizeRefused(XPSRError):
    """An input over ``max_output_pixels`` / ``max_process_pixels``; the message names the limit and its key."""


def check_size(name: str, height: int, width: int, cfg: Any) -> None:
    """Refuse an input whose output or processing size is over the configured limits (before any allocation).

    ``cfg`` is an InferConfig (or anything with ``upscale``, ``process_size``, ``max_output_pixels`` and
    ``max_process_pixels``); a limit of 0 means none."""
    (th, tw), (ph, pw) = output_size(height, width, cfg)
    if cfg.max_output_pixels and th * tw > cfg.max_output_pixels:
        raise SizeRefused(f"{name}: {width}x{height} px at x{cfg.upscale} gives a {tw}x{th} output ({th * tw:,} px), "
                          f"above max_output_pixels={cfg.max_output_pixels:,}; lower upscale, split the image, or "
                          "raise max_output_pixels (memory grows with it)")
    if cfg.max_process_pixels and ph * pw > cfg.max_process_pixels:
        raise SizeRefused(f"{name}: {width}x{height} px would be processed at {pw}x{ph} px ({ph * pw:,} px, its short "
                          f"side raised to process_size={cfg.process_size}), above max_process_pixels="
                          f"{cfg.max_process_pixels:,}; crop or pad the image, or raise max_process_pixels")


def header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file header alone; None when the header cannot be read (left to the decoder,
    which names the problem). Pillow's DecompressionBombError goes to the caller."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise
    except (OSError, SyntaxError, ValueError):
        return None
    return height, width


def processing_sizes(paths: list[Path], cfg: Any, multiple: int) -> list[tuple[int, int]]:
    """The (h, w) each image is processed at, from the file headers (no decoding; unreadable ones and bombs left
    out: they fail on their turn with their own message)."""
    sizes = []
    for path in paths:
        try:
            size = header_size(path)
        except Image.DecompressionBombError:
            continue
        if size is not None:
            sizes.append(output_size(*size, cfg, multiple)[1])
    return sizes


def header_check(path: Path, cfg: Any, name: str | None = None) -> None:
    """The size limits from the file header alone, so a huge image is refused before it is decoded (an
    unreadable header is left to the decoder, which names the problem)."""
    name = name or shown(path)
    try:
        size = header_size(path)
    except Image.DecompressionBombError as e:
        raise SizeRefused(f"{name}: refused before decoding, over Pillow's decompression-bomb limit ({e})") from e
    if size is not None:
        check_size(name, *size, cfg)  # EXIF rotation swaps the sides: pixel counts are the same


def checked(image, source: Any, cfg: Any):
    """``image`` (RGB uint8 HWC, decoded from ``source``) once it passes :func:`check_size`; the message names
    ``source`` when it is a path (``XPSRPipeline`` inputs)."""
    name = shown(source) if isinstance(source, (str, Path)) else "the input image"
    check_size(name, image.shape[0], image.shape[1], cfg)
    return image
