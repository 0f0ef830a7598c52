"""The torch JPEG (BasicSR DiffJPEG's arithmetic, hard rounding) against an independent numpy computation."""
import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from xpsr.data.jpeg import CHROMA_TABLE, LUMA_TABLE, jpeg, jpeg_opencv, jpeg_torch, quality_factor


def _reference(img: np.ndarray, quality: float) -> np.ndarray:
    """One HWC float64 image in [0, 1], written from DiffJPEG's description with scipy's orthonormal DCT."""
    h, w, _ = img.shape
    x = np.zeros((h + (-h) % 16, w + (-w) % 16, 3))
    x[:h, :w] = img * 255
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    planes = [0.299 * r + 0.587 * g + 0.114 * b,
              -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
              0.5 * r - 0.418688 * g - 0.081312 * b + 128]
    hh, ww = x.shape[:2]
    planes[1:] = [p.reshape(hh // 2, 2, ww // 2, 2).mean((1, 3)) for p in planes[1:]]
    factor = (5000 / quality if quality < 50 else 200 - 2 * quality) / 100
    out = []
    for plane, table in zip(planes, (LUMA_TABLE, CHROMA_TABLE, CHROMA_TABLE)):
        step = table.T * factor  # DiffJPEG applies the standard table transposed
        rec = np.empty_like(plane)
        for i in range(0, plane.shape[0], 8):
            for j in range(0, plane.shape[1], 8):
                coeffs = dctn(plane[i:i + 8, j:j + 8] - 128, norm="ortho")
                rec[i:i + 8, j:j + 8] = idctn(np.round(coeffs / step) * step, norm="ortho") + 128
        out.append(rec)
    y, cb, cr = out[0], out[1].repeat(2, 0).repeat(2, 1) - 128, out[2].repeat(2, 0).repeat(2, 1) - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    return (np.clip(rgb, 0, 255) / 255)[:h, :w]


def test_quality_factor_is_diffjpeg_s():
    assert quality_factor(25) == 2.0 and quality_factor(50) == 1.0 and quality_factor(75) == 0.5
    assert quality_factor(37.5) == pytest.approx(5000 / 37.5 / 100)
    with pytest.raises(ValueError, match="outside"):
        quality_factor(100)


def test_torch_jpeg_matches_an_independent_computation_with_float_qualities():
    rng = np.random.default_rng(0)
    smooth = rng.uniform(0, 1, (3, 5, 3)).repeat(8, 0).repeat(7, 1)[:21, :30]  # blocky content + texture
    imgs = np.stack([np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1), rng.uniform(0, 1, smooth.shape)])
    qualities = [37.3, 80.6]  # floats, one per image, as the official draws them
    out = jpeg_torch(torch.from_numpy(imgs).permute(0, 3, 1, 2), qualities).permute(0, 2, 3, 1).numpy()
    for got, img, q in zip(out, imgs, qualities):
        expected = _reference(img, q)
        assert got.shape == img.shape
        assert np.abs(got - expected).max() < 1e-9
        assert np.abs(got - img).mean() > 1e-3  # it did compress
    # quality 37.3 is not quality 37: the float is used as is
    assert not torch.equal(jpeg_torch(torch.from_numpy(imgs[:1]).permute(0, 3, 1, 2), 37.0),
                           jpeg_torch(torch.from_numpy(imgs[:1]).permute(0, 3, 1, 2), 37.3))


def test_opencv_jpeg_rounds_the_quality_and_unknown_codecs_fail():
    img = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(jpeg_opencv(img, 49.6), jpeg_opencv(img, 50))
    assert torch.equal(jpeg(img, 49.6, "opencv"), jpeg_opencv(img, 50))
    with pytest.raises(ValueError, match="codec"):
        jpeg(img, 50, "pillow")
