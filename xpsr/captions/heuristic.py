"""An offline quality describer: measured image statistics turned into a sentence.

No weights needed, so it is the default quality captioner when no MLLM is available and a cheap
baseline otherwise. Each statistic is monotone in the degradation it names (tests check the order).
"""
from __future__ import annotations

import cv2
import numpy as np

_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def measure(rgb: np.ndarray) -> dict[str, float]:
    """Statistics of an RGB uint8 image: sharpness, noise sigma, JPEG blockiness, exposure, contrast, saturation."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
    h, w = gray.shape
    # noise: Immerkaer's estimator (a Laplacian-difference filter cancels smooth structure)
    conv = np.abs(cv2.filter2D(gray, cv2.CV_64F, _NOISE_KERNEL, borderType=cv2.BORDER_REFLECT)[1:-1, 1:-1])
    noise = float(np.sqrt(np.pi / 2) * conv.sum() / (6 * max(w - 2, 1) * max(h - 2, 1)))
    # sharpness: variance of the Laplacian on the 0-1 scale
    sharpness = float(cv2.Laplacian(gray / 255.0, cv2.CV_64F).var())
    # blockiness: horizontal+vertical steps on 8-pixel block boundaries vs inside blocks
    dx = np.abs(np.diff(gray, axis=1))
    dy = np.abs(np.diff(gray, axis=0))
    on_x, on_y = dx[:, 7::8], dy[7::8, :]
    off_x = np.delete(dx, np.s_[7::8], axis=1)
    off_y = np.delete(dy, np.s_[7::8], axis=0)
    blockiness = float((on_x.mean() + on_y.mean()) / (off_x.mean() + off_y.mean() + 1e-6)) if min(h, w) >= 16 else 1.0
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    return {"sharpness": sharpness, "noise": noise, "blockiness": blockiness, "exposure": float(gray.mean() / 255),
            "contrast": float(gray.std() / 255), "saturation": float(hsv[..., 1].mean() / 255)}


def _pick(value: float, bins: list[tuple[float, str]], last: str) -> str:
    for limit, word in bins:
        if value < limit:
            return word
    return last


def describe(stats: dict[str, float]) -> str:
    """One or two sentences in the style of an MLLM quality answer."""
    sharp = _pick(stats["sharpness"], [(0.0008, "very blurry"), (0.003, "blurry"), (0.008, "slightly soft")],
                  "sharp and clear")
    noise = _pick(stats["noise"], [(2.0, "no visible noise"), (5.0, "slight noise"), (10.0, "noticeable noise")],
                  "heavy noise")
    jpeg = _pick(stats["blockiness"], [(1.15, "no compression artifacts"), (1.4, "mild compression artifacts")],
                 "strong blocky compression artifacts")
    exposure = _pick(stats["exposure"], [(0.2, "dark and underexposed"), (0.35, "somewhat dim"),
                                         (0.75, "well balanced")], "bright, close to overexposed")
    contrast = _pick(stats["contrast"], [(0.1, "low"), (0.25, "moderate")], "high")
    colour = _pick(stats["saturation"], [(0.12, "muted"), (0.45, "natural")], "vivid")
    penalties = (sharp in ("very blurry", "blurry")) + (noise in ("noticeable noise", "heavy noise")) + \
        (jpeg.startswith("strong")) + (exposure.startswith(("dark", "bright")))
    overall = ["good", "fair", "poor", "very poor", "very poor"][penalties]
    return (f"This is a {overall} quality image. It looks {sharp}, with {noise} and {jpeg}. "
            f"The lighting is {exposure}, the contrast is {contrast} and the colours are {colour}.")
