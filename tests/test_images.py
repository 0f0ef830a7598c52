"""Robust image loading: each odd input is converted with a note, or refused with a clear error."""
import io

import numpy as np
import pytest
from PIL import Image

from xpsr.data.images import ImageError, file_hash, list_images, load_rgb, save_png_atomic


def _rgb(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_plain_rgb_round_trip(tmp_path):
    arr = _rgb()
    save_png_atomic(arr, tmp_path / "a.png")
    out, notes = load_rgb(tmp_path / "a.png")
    assert np.array_equal(out, arr) and notes == []
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


@pytest.mark.parametrize("mode, note", [("L", "L converted"), ("P", "P converted"), ("CMYK", "CMYK converted"),
                                        ("RGBA", "alpha"), ("LA", "alpha")])
def test_modes_become_rgb_with_a_note(tmp_path, mode, note):
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.fromarray(_rgb()).convert(mode).save(path)
    out, notes = load_rgb(path)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert any(note in n for n in notes), notes


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out, _ = load_rgb(tmp_path / "t.png")
    assert (out == 255).all()


def test_16_bit_is_scaled_to_8_bit(tmp_path):
    arr = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out, notes = load_rgb(tmp_path / "deep.png")
    assert out.max() == 255 and out.min() == 0 and any("16-bit" in n for n in notes)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(_rgb(20, 50))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    out, notes = load_rgb(tmp_path / "r.jpg")
    assert out.shape[:2] == (50, 20) and any("EXIF" in n for n in notes)


def test_truncated_and_non_images_are_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="cut.png"):
        load_rgb(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_rgb(tmp_path / "notes.png")


def test_listing_is_recursive_sorted_and_hash_is_content_based(tmp_path):
    (tmp_path / "b").mkdir()
    save_png_atomic(_rgb(), tmp_path / "b" / "z.png")
    save_png_atomic(_rgb(), tmp_path / "a.png")
    (tmp_path / "readme.txt").write_text("x")
    found = list_images([tmp_path])
    assert [p.name for p in found] == ["a.png", "z.png"]
    assert file_hash(found[0]) == file_hash(found[1])
    with pytest.raises(FileNotFoundError):
        list_images([tmp_path / "missing"])
