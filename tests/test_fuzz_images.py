"""Fuzzing the image decoder: random and mutated PNG/JPEG/TIFF/WebP/GIF/BMP bytes give an RGB uint8 array or
our ImageError, never another exception, a hang or a memory blow-up.

The hypothesis runs are derandomised (the same examples on every run) and bounded, so CI stays fast and
deterministic. A larger campaign, each input in a child process under a memory and time limit:
``python tests/test_fuzz_images.py --count 30000`` (counts by input kind and outcome on stdout).
"""
from __future__ import annotations

import io
import struct
import sys
import time
import zlib
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xpsr.data.images import ImageError, load_rgb

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOWEST_S = 10.0  # far above any example (the slowest took 0.3 s on the 2-core CI machine)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@cache
def seed_images() -> dict[str, bytes]:
    """Small valid files of every format and mode the loader handles (the starting points of mutation)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    deep = Image.fromarray((rng.random((12, 20)) * 65535).astype(np.uint16))
    floats = Image.fromarray(rng.standard_normal((12, 20)).astype(np.float32))
    seeds = {
        "png_rgb": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "png_palette": _encode(rgb.convert("P"), "PNG"),
        "png_gray16": _encode(deep, "PNG"),
        "png_1bit": _encode(rgb.convert("1"), "PNG"),
        "png_apng": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "jpeg_baseline": _encode(rgb, "JPEG", quality=80),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg_cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg_exif_rotated": _encode(rgb, "JPEG", exif=_exif_with_orientation(6)),
        "tiff_rgb_lzw": _encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff_raw": _encode(rgb, "TIFF"),
        "tiff_gray16": _encode(deep, "TIFF"),
        "tiff_float": _encode(floats, "TIFF"),
        "tiff_multipage": _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "webp_lossy": _encode(rgb, "WEBP", quality=50),
        "webp_lossless_alpha": _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "webp_animated": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "gif_animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp": _encode(rgb, "BMP"),
        "bmp_rle8": _rle8_bmp(16, 12),
    }
    return seeds


def _rle8_bmp(width: int, height: int) -> bytes:
    """An RLE8-compressed palette BMP (Pillow can read but not write them)."""
    data = b"".join(bytes([width, y * 9 % 256]) + b"\x00\x00" for y in range(height)) + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return header + info + palette + data


MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
          b"GIF89a", b"BM", b""]
INTERESTING_U32 = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 30000, 100_000]


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC of a (mutated) PNG, so the mutation reaches the decoder past the CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        body = data[pos + 4:end]
        out += data[pos:end] + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        pos = end + 4
    return bytes(out + data[pos:])


def mutate(data: bytes, ops: list[tuple[int, int, int]], fix_crc: bool) -> bytes:
    """Apply (kind, position, value) mutations: bit flip, byte set, 32-bit int set, insert, delete, truncate,
    duplicate a slice."""
    buf = bytearray(data)
    for kind, position, value in ops:
        if not buf:
            break
        i = position % len(buf)
        if kind == 0:
            buf[i] ^= 1 << (value % 8)
        elif kind == 1:
            buf[i] = value % 256
        elif kind == 2:
            buf[i:i + 4] = INTERESTING_U32[value % len(INTERESTING_U32)].to_bytes(4, "big" if value & 16 else "little")
        elif kind == 3:
            buf[i:i] = bytes((value * (k + 7)) % 256 for k in range(1 + value % 16))
        elif kind == 4:
            del buf[i:i + 1 + value % 64]
        elif kind == 5:
            del buf[i:]
        else:
            buf[i:i] = buf[(value % len(buf)):(value % len(buf)) + 1 + value % 256]
    return fix_png_crcs(bytes(buf)) if fix_crc else bytes(buf)


def check_one(path: Path) -> str:
    """The loader's contract on one file: 'ok' (an HxWx3 uint8 array and string notes) or 'refused'
    (ImageError naming the file). Anything else raises."""
    start = time.perf_counter()
    try:
        arr, notes = load_rgb(path)
    except ImageError as e:
        assert path.name in str(e), str(e)
        assert "\n" not in str(e)
        outcome = "refused"
    else:
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape) > 0
        assert all(isinstance(n, str) for n in notes)
        outcome = "ok"
    assert time.perf_counter() - start < SLOWEST_S
    return outcome


def test_every_seed_decodes(tmp_path):
    """The unmutated seeds are valid: each decodes (so mutations start from files that reach the decoder)."""
    for name, data in seed_images().items():
        (tmp_path / f"{name}.img").write_bytes(data)
        assert check_one(tmp_path / f"{name}.img") == "ok", name


OPS = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1 << 20), st.integers(0, 1 << 16)), min_size=1,
               max_size=4)


@FUZZ
@given(name=st.sampled_from(sorted(seed_images())), ops=OPS, fix_crc=st.booleans())
def test_mutated_images_decode_or_raise_image_error(tmp_path_factory, name, ops, fix_crc):
    path = tmp_path_factory.mktemp("fuzz") / f"{name}.png"
    path.write_bytes(mutate(seed_images()[name], ops, fix_crc))
    check_one(path)


@FUZZ
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=512))
def test_random_bytes_raise_image_error(tmp_path_factory, magic, tail):
    path = tmp_path_factory.mktemp("fuzz") / "random.jpg"
    path.write_bytes(magic + tail)
    check_one(path)


# ---------------------------------------------------------------- the larger campaign (not run by pytest)

def _campaign_worker(job: tuple[str, bytes, str]) -> tuple[str, str]:
    import resource
    import signal
    import tempfile

    kind, data, suffix = job
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    signal.alarm(20)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(data)
        try:
            return kind, check_one(path)
        except BaseException as e:  # noqa: BLE001 - every other outcome is a finding to count and report
            return kind, f"FOUND {type(e).__name__}: {str(e)[:200]}"
        finally:
            signal.alarm(0)


def _campaign_jobs(count: int, seed: int):
    rng = np.random.default_rng(seed)
    seeds = seed_images()
    names = sorted(seeds)
    for i in range(count):
        if i % 10 == 0:
            magic = MAGICS[rng.integers(len(MAGICS))]
            yield "random_bytes", magic + rng.bytes(int(rng.integers(0, 2048))), ".png"
            continue
        name = names[rng.integers(len(names))]
        ops = [(int(rng.integers(7)), int(rng.integers(1 << 20)), int(rng.integers(1 << 16)))
               for _ in range(int(rng.integers(1, 9)))]
        yield name, mutate(seeds[name], ops, bool(rng.integers(2))), ".png"


def campaign(count: int, seed: int, workers: int) -> dict:
    """Mutated inputs through load_rgb in child processes (3 GiB address space, 20 s alarm each); a child that
    dies (a crash in a C decoder) shows up as a broken pool. Returns counts by kind and outcome."""
    import collections
    import multiprocessing

    counts: dict = collections.defaultdict(collections.Counter)
    findings: list = []
    with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=200) as pool:
        for kind, outcome in pool.imap_unordered(_campaign_worker, _campaign_jobs(count, seed), chunksize=16):
            counts[kind][outcome.split(":")[0]] += 1
            if outcome.startswith("FOUND"):
                findings.append((kind, outcome))
    return {"counts": {k: dict(v) for k, v in sorted(counts.items())}, "findings": findings[:50]}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    result = campaign(args.count, args.seed, args.workers)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))
    sys.exit(1 if result["findings"] else 0)
