"""Hostile and odd image inputs, one kind per test: each gives an RGB uint8 array (with a note where something
was converted) or our one-line ImageError naming the file -- never another exception, a hang or a blow-up.

Tests may run as root, where chmod 000 does not stop reads and a read-only folder can still be written: there
the permission errors are simulated (the real call raising the errno the kernel gives), so the same assertions
run either way.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xpsr.data import images
from xpsr.data.images import MAX_IMAGE_PIXELS, ImageError, list_images, load_rgb, save_png_atomic
from xpsr.errors import OutputError


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with a few bytes of data: what a decompression bomb looks
    like before decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


def refused(path, *says: str, **kw) -> str:
    start = time.perf_counter()
    with pytest.raises(ImageError) as e:
        load_rgb(path, **kw)
    message = str(e.value)
    assert time.perf_counter() - start < 5 and len(message.splitlines()) == 1, message
    for s in says:
        assert s in message, message
    return message


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    for w, h in ((100_000, 100_000), (MAX_IMAGE_PIXELS, 2), (0x7FFFFFFF, 0x7FFFFFFF)):
        path = tmp_path / f"bomb-{w}x{h}.png"
        path.write_bytes(png_header_only(w, h))
        refused(path, path.name, f"{w * h:,}" if w * h <= 2 * MAX_IMAGE_PIXELS else f"{w * h}",
                "decompression-bomb guard")  # over twice the limit Pillow refuses in open(): our message too
    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(ok)
    refused(ok, "1,600 pixels is over the limit of 1,000", max_pixels=1000)  # a caller's lower limit
    # a caller's higher limit still stops at Pillow's own (2x MAX_IMAGE_PIXELS), with our message
    bomb = tmp_path / "pillow-bomb.png"
    bomb.write_bytes(png_header_only(20_000, 20_000))
    refused(bomb, "pillow-bomb.png", "400000000 pixels", "decompression-bomb guard", max_pixels=10**12)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP", "GIF", "BMP"])
def test_one_pixel_wide_and_tall_images(tmp_path, fmt):
    for h, w in ((1, 1), (1, 37), (37, 1)):
        path = tmp_path / f"strip-{h}x{w}.{fmt.lower()}"
        Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(path, format=fmt)
        arr, _ = load_rgb(path)
        assert arr.shape == (h, w, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])  # JPEG stops at 65,535 px and WebP at 16,383 px per side
def test_100k_pixel_wide_strips_load_quickly(tmp_path, fmt):
    for h, w in ((1, 100_000), (100_000, 1), (2, 100_000)):
        path = tmp_path / f"strip.{fmt.lower()}"
        Image.fromarray(np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3).astype(np.uint8)).save(path, fmt)
        start = time.perf_counter()
        arr, _ = load_rgb(path)
        assert arr.shape == (h, w, 3) and time.perf_counter() - start < 5


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "PNG", "WEBP"])
def test_multi_frame_files_give_the_first_frame_with_a_note(tmp_path, fmt):
    frames = [Image.fromarray(np.full((8, 12, 3), v, np.uint8)) for v in (10, 120, 240)]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if
                                                                                  fmt == "WEBP" else {}))
    arr, notes = load_rgb(path)
    assert arr.shape == (8, 12, 3) and abs(int(arr.mean()) - 10) <= 2
    assert any("first frame" in n for n in notes), notes


def _jpeg_with_app1(payload: bytes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


@pytest.mark.parametrize("payload", [
    b"Exif\x00\x00" + b"\xde\xad" * 20,  # no TIFF header
    b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far past the end
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01\x12\x00\x03" * 4,  # 65535 entries claimed
    b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00",  # orient. 9
])
def test_broken_exif_costs_at_most_the_orientation(tmp_path, payload):
    path = tmp_path / "broken-exif.jpg"
    path.write_bytes(_jpeg_with_app1(payload))
    arr, notes = load_rgb(path)
    assert arr.shape == (16, 24, 3) and not any("rotated" in n for n in notes)


def test_16_bit_and_float_tiffs_are_scaled_to_8_bit(tmp_path):
    deep = np.array([[0, 32768, 65535]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    arr, notes = load_rgb(tmp_path / "deep.tif")
    assert arr[0, :, 0].tolist() == [0, 128, 255] and any("16-bit" in n for n in notes)
    floats = np.array([[-1.0, 0.0, 3.0, np.nan, np.inf, -np.inf]], np.float32)
    Image.fromarray(floats).save(tmp_path / "float.tif")
    arr, notes = load_rgb(tmp_path / "float.tif")
    assert arr[0, :, 0].tolist() == [0, 64, 255, 0, 255, 0]
    assert any("NaN/infinite" in n for n in notes) and any("float" in n for n in notes)
    Image.fromarray(np.full((2, 2), np.nan, np.float32)).save(tmp_path / "all-nan.tif")
    assert load_rgb(tmp_path / "all-nan.tif")[0].max() == 0


def test_non_utf8_and_very_long_file_names(tmp_path):
    good = Image.fromarray(np.full((4, 4, 3), 7, np.uint8))
    folder = os.fsencode(tmp_path)
    latin1 = os.fsdecode(folder + b"/caf\xe9-\n.png")  # not UTF-8, and a newline in the name
    good.save(latin1, format="PNG")
    assert load_rgb(latin1)[0].shape == (4, 4, 3)
    assert list_images([tmp_path]) == [Path(latin1)]
    Path(latin1).write_bytes(b"not an image")
    message = refused(latin1, "caf\\xe9-\\n.png")  # escaped: printable on any terminal, one line
    message.encode("utf-8")
    longest = tmp_path / ("x" * 251 + ".png")  # 255 bytes: the usual limit of a name
    good.save(longest)
    assert load_rgb(longest)[0].shape == (4, 4, 3)
    refused(tmp_path / ("y" * 300 + ".png"), "cannot read (File name too long)")
    refused(tmp_path / ("deep/" * 1000 + "z.png"), "cannot read")


def test_symlink_loops_end_the_walk_and_are_reported(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "sub" / "a.png")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # data/sub/loop -> data
    (root / "self.png").symlink_to(root / "self.png")  # a file link to itself
    (root / "dangling.png").symlink_to(root / "gone.png")
    skipped: list = []
    start = time.perf_counter()
    found = list_images([root], skipped)
    assert found == [root / "sub" / "a.png"] and time.perf_counter() - start < 5
    reasons = dict(skipped)
    assert "symlink loop" in reasons[str(root / "sub" / "loop")]
    assert "Too many levels of symbolic links" in reasons[str(root / "self.png")]
    assert "No such file" in reasons[str(root / "dangling.png")]
    refused(root / "self.png", "self.png", "cannot read (Too many levels of symbolic links)")


def test_fifos_and_folders_are_refused_without_opening(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening a FIFO for reading blocks until a writer comes: it must never be opened
    refused(fifo, "pipe.png", "not a regular file")
    (tmp_path / "dir.png").mkdir()
    refused(tmp_path / "dir.png", "is a folder")
    skipped: list = []
    assert list_images([tmp_path], skipped) == [] and dict(skipped)[str(fifo)] == "not a regular file"


def _deny(monkeypatch, target: Path, function: str, module=builtins) -> None:
    """Simulate a permission error on ``target`` (tests running as root read and write through chmod)."""
    real = getattr(module, function)

    def denied(*args, **kwargs):
        path = args[0] if args else kwargs.get("dir", "")
        if str(target) in os.fsdecode(str(path) if isinstance(path, Path) else path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function, denied)


def test_unreadable_files_and_folders(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    folder = tmp_path / "closed"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "inside.png")
    path.chmod(0)
    folder.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root: chmod does not stop reads, so the kernel's answer is simulated
            _deny(monkeypatch, path, "open")
            _deny(monkeypatch, folder, "scandir", os)
        refused(path, "secret.png", "cannot read (Permission denied)")
        with pytest.raises(ImageError, match="secret.png: cannot read"):
            images.file_hash(path)
        skipped: list = []
        assert list_images([tmp_path], skipped) == [path]
        assert "cannot list this folder (Permission denied)" in dict(skipped)[str(folder)]
    finally:
        folder.chmod(0o755)


def test_read_only_or_blocked_output_folders_raise_output_error_and_leave_nothing(tmp_path, monkeypatch):
    image = np.zeros((4, 4, 3), np.uint8)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(OutputError, match="cannot write into output folder .*file"):
        save_png_atomic(image, tmp_path / "file" / "out.png")  # a file where the folder should be
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):  # root writes into read-only folders: simulate the kernel's answer
            _deny(monkeypatch, out, "mkstemp", tempfile)
        with pytest.raises(OutputError, match="cannot write into output folder .*readonly .Permission denied") as e:
            save_png_atomic(image, out / "a.png")
        assert isinstance(e.value, OSError) and e.value.errno == errno.EACCES
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 50, np.uint8)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    sos = data.index(b"\xff\xda")
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"  # header of a one-component scan, no data
    path = tmp_path / "scans.jpg"
    path.write_bytes(data[:sos] + empty_scan * 2000 + data[sos:])
    refused(path, "scans.jpg", "more than 64 scans")
