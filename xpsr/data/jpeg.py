"""JPEG round trips for the degradation: BasicSR's torch JPEG (the official one) and a real codec (OpenCV).

``jpeg_torch`` follows the algorithm of BasicSR's ``DiffJPEG(differentiable=False)`` (basicsr/utils/
diffjpeg.py), which the official ``utils_data/make_train.py`` and Real-ESRGAN use: it is not a codec but
its arithmetic, in float, with hard rounding of the DCT coefficients only:

1. zero-pad to a multiple of 16 (bottom/right; black pixels, which bleed into the edge blocks);
2. RGB -> YCbCr on the 0-255 scale (JFIF matrix, no rounding);
3. Cb and Cr averaged over 2x2 (4:2:0);
4. 8x8 orthonormal DCT of (value - 128) per block;
5. divide by the quantisation table times a float factor of the quality (``5000 / q`` below 50,
   ``200 - 2 q`` from 50, then / 100; no integer tables and no clamping to [1, 255] as libjpeg does),
   round, multiply back;
6. inverse DCT + 128, chroma upsampled by repetition (not libjpeg's smooth upsampling), YCbCr -> RGB,
   clamp to [0, 255], / 255, crop. The pixels are never rounded to 8 bits.

The tables are the standard JPEG ones (Annex K), applied the way DiffJPEG applies them: transposed, so the
coefficient at (row frequency i, column frequency j) is divided by the standard table's entry (j, i).
The quality is a float (the official draws it uniformly in the range and never rounds it).

``jpeg_opencv`` is a real codec: 8-bit input and output, integer quality (the float draw is rounded).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# the standard tables in natural order: row = vertical frequency, column = horizontal frequency
LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float64)
CHROMA_TABLE = np.full((8, 8), 99.0)
CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])


def quality_factor(quality: float) -> float:
    """DiffJPEG's scale of the quantisation tables for a (float) quality in (0, 100)."""
    if not 0 < quality < 100:
        raise ValueError(f"JPEG quality {quality} is outside (0, 100): the torch JPEG's table factor would be "
                         "zero or negative (DiffJPEG divides by it)")
    return (5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality) / 100.0


def dct_matrix(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """C with C[u, x] = a(u)/2 cos((2x+1) u pi / 16), a(0) = 1/sqrt(2), else 1: coefficients = C @ block @ C^T."""
    u = torch.arange(8, dtype=torch.float64)[:, None]
    x = torch.arange(8, dtype=torch.float64)[None, :]
    c = torch.cos((2 * x + 1) * u * math.pi / 16) / 2
    c[0] /= math.sqrt(2)
    return c.to(dtype=dtype, device=device)


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    b, h, w = plane.shape
    return plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    b, nh, nw = blocks.shape[:3]
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, nh * 8, nw * 8)


def _quantise_round_trip(plane: torch.Tensor, table: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """plane (B, H, W) on the 0-255 scale, table (B, 8, 8) already times the factor."""
    coeffs = c @ (_blocks(plane) - 128) @ c.T
    step = table[:, None, None]
    coeffs = torch.round(coeffs / step) * step
    return _unblocks(c.T @ coeffs @ c + 128)


def jpeg_torch(img: torch.Tensor, quality: float | list[float] | torch.Tensor) -> torch.Tensor:
    """BasicSR DiffJPEG's round trip (hard rounding) of (B, 3, H, W) images in [0, 1]; one quality per image."""
    b, _, h, w = img.shape
    q = torch.as_tensor(quality, dtype=torch.float64).reshape(-1).expand(b)
    factor = torch.tensor([quality_factor(float(v)) for v in q], dtype=img.dtype, device=img.device)
    dev, dt = img.device, img.dtype
    x = F.pad(img, (0, (-w) % 16, 0, (-h) % 16), value=0.0) * 255
    ycc = torch.einsum("ij,bjhw->bihw", torch.as_tensor(RGB_TO_YCBCR, dtype=dt, device=dev), x)
    offset = torch.tensor([0.0, 128.0, 128.0], dtype=dt, device=dev).view(1, 3, 1, 1)
    ycc = ycc + offset
    chroma = F.avg_pool2d(ycc[:, 1:], kernel_size=2, stride=2)
    c = dct_matrix(dt, dev)
    luma_table = torch.as_tensor(LUMA_TABLE.T, dtype=dt, device=dev)[None] * factor.view(b, 1, 1)
    chroma_table = torch.as_tensor(CHROMA_TABLE.T, dtype=dt, device=dev)[None] * factor.view(b, 1, 1)
    y = _quantise_round_trip(ycc[:, 0], luma_table, c)
    cb = _quantise_round_trip(chroma[:, 0], chroma_table, c)
    cr = _quantise_round_trip(chroma[:, 1], chroma_table, c)
    chroma_up = torch.stack([cb, cr], 1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    ycc = torch.cat([y[:, None], chroma_up], 1) - offset
    rgb = torch.einsum("ij,bjhw->bihw", torch.as_tensor(YCBCR_TO_RGB, dtype=dt, device=dev), ycc)
    return (rgb.clamp(0, 255) / 255)[:, :, :h, :w]


def jpeg_opencv(img: torch.Tensor, quality: float) -> torch.Tensor:
    """A real JPEG round trip (OpenCV, 8-bit, 4:2:0) of every image in the batch; quality rounded to an integer."""
    out = []
    for x in img.clamp(0, 1):
        arr = (x.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", arr[..., ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), int(round(quality))])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0
        out.append(torch.from_numpy(np.ascontiguousarray(dec)).permute(2, 0, 1))
    return torch.stack(out).to(device=img.device, dtype=img.dtype)


JPEG_CODECS = {"torch": jpeg_torch, "opencv": jpeg_opencv}


def jpeg(img: torch.Tensor, quality: float, codec: str) -> torch.Tensor:
    """JPEG round trip with the named codec ('torch': BasicSR DiffJPEG's arithmetic; 'opencv': a real codec)."""
    if codec not in JPEG_CODECS:
        raise ValueError(f"unknown JPEG codec {codec!r}; choose one of {sorted(JPEG_CODECS)}")
    return JPEG_CODECS[codec](img, quality)
