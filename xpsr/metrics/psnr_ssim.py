"""PSNR and SSIM on the Y channel of BT.601 YCbCr, computed here so the core install needs no pyiqa.

The conventions are those of the official XPSR `test.py`, which computes this Y itself and passes it to pyiqa's
default `psnr`/`ssim` (the same as pyiqa with `test_y_channel=True, color_space="ycbcr"`);
`tests/test_psnr_ssim.py` pins our values to both routes:

- Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for 8-bit R, G, B, i.e. the [16, 235] range of SR papers
  (not pyiqa's default `yiq`, which is ~1.3 dB away).
- PSNR uses the unrounded Y, on a [0, 1] scale with pyiqa's guard of 1e-8 on the MSE (so two identical
  images score 80 dB instead of infinity).
- SSIM uses Y rounded to an integer (as MATLAB's `rgb2ycbcr` on uint8 does), an 11x11 Gaussian window with
  sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255, population (not sample) variances, only the positions
  where the window fits inside the image, and the contrast-structure term clipped at 0 (as pyiqa does).
- ``crop_border`` pixels are removed from every side before anything else.

Y is computed in exact integer arithmetic (×255000). pyiqa converts in float32, which rounds 143 of the 16.7M
8-bit colours the other way (measured here; all within 1.2e-5 of a half-integer, 84 of them exactly on one), so the two
agree within a tolerance, not bit for bit.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# BT.601 luma coefficients for 8-bit RGB (×1000) and the offset, on a common denominator of 255 * 1000
_Y_WEIGHTS = (65481, 128553, 24966)
_Y_SCALE = 255_000
_Y_OFFSET = 16 * _Y_SCALE
PSNR_EPS = 1e-8  # added to the MSE of [0, 1] images, as pyiqa does
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2, SSIM_DATA_RANGE = 11, 1.5, 0.01, 0.03, 255.0


def y_channel(rgb: np.ndarray, rounded: bool) -> np.ndarray:
    """BT.601 Y in [16, 235] of an HxWx3 uint8 RGB image, as float64 (rounded: nearest integer, halves up)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.dtype} of shape {rgb.shape}")
    channels = rgb.astype(np.int64)
    scaled = (channels[..., 0] * _Y_WEIGHTS[0] + channels[..., 1] * _Y_WEIGHTS[1]
              + channels[..., 2] * _Y_WEIGHTS[2] + _Y_OFFSET)  # exact: Y * 255000
    if rounded:
        return ((scaled + _Y_SCALE // 2) // _Y_SCALE).astype(np.float64)
    return scaled / _Y_SCALE


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return img
    if min(img.shape[:2]) <= 2 * border:
        raise ValueError(f"crop_border={border} leaves nothing of a {img.shape[1]}x{img.shape[0]} image")
    return img[border:-border, border:-border]


def _check_pair(sr: np.ndarray, hr: np.ndarray) -> None:
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR differ in size: {sr.shape} vs {hr.shape}")


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int = 0) -> float:
    """PSNR in dB between two HxWx3 uint8 RGB images, on the unrounded Y channel."""
    _check_pair(sr, hr)
    y_sr = y_channel(_crop(sr, crop_border), rounded=False) / 255.0
    y_hr = y_channel(_crop(hr, crop_border), rounded=False) / 255.0
    mse = float(np.mean((y_sr - y_hr) ** 2))
    return float(10.0 * np.log10(1.0 / (mse + PSNR_EPS)))


def gaussian_taps(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D Gaussian taps summing to 1; the 2-D window is their outer product (a normalised 2-D Gaussian)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def _window_mean(planes: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local means of (N, H, W) planes where the whole window fits: (N, H-k+1, W-k+1).

    The window is separable, so two 1-D passes over sliding views (exact to ~1e-13 of a 2-D pass, and
    ~50x faster than a float64 2-D convolution on the CPU).
    """
    rows = sliding_window_view(planes, len(taps), axis=1) @ taps
    return sliding_window_view(rows, len(taps), axis=2) @ taps


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int = 0) -> float:
    """Mean SSIM between two HxWx3 uint8 RGB images, on the rounded Y channel."""
    _check_pair(sr, hr)
    x = y_channel(_crop(sr, crop_border), rounded=True)
    y = y_channel(_crop(hr, crop_border), rounded=True)
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after crop_border={crop_border}, "
                         f"got {x.shape[1]}x{x.shape[0]}")
    return ssim_of_planes(x, y)


def ssim_of_planes(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two single-channel float64 images on a 0-255 scale (at least 11x11)."""
    mu_x, mu_y, xx, yy, xy = _window_mean(np.stack([x, y, x * x, y * y, x * y]), gaussian_taps())
    var_x, var_y, cov_xy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y  # population (not sample) moments
    c1, c2 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2, (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = np.maximum((2 * cov_xy + c2) / (var_x + var_y + c2), 0.0)
    return float(np.mean(luminance * contrast_structure))
