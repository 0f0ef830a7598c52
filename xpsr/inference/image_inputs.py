"""Images handed to ``XPSRPipeline`` -> RGB uint8 HWC arrays, the form ``xpsr infer`` reads files into.

Accepted forms, with the value ranges of diffusers' image processor (``VaeImageProcessor.preprocess``):

- a file path (read as ``xpsr infer`` reads files), a PIL image (transparency composited on white);
- numpy arrays, HWC or (H, W), NHWC for a batch; tensors CHW or (H, W), NCHW for a batch (torchvision's
  ``read_image`` layout); a list of any of these;
- uint8 (and other integer types with values in 0..255): 8-bit levels, taken as they are;
- float in [0, 1]: scaled by 255 and rounded;
- float with negative values, all within [-1, 1]: read as [-1, 1] and rescaled, with a warning (diffusers does the
  same: such data is taken to be normalised already);
- float with values above 1 that are all whole numbers within [0, 255] (``uint8_image.astype(float)``): 8-bit levels.

Anything else (values outside those ranges, NaN, float data above 1 with fractions, booleans) is refused with a
message naming the range found and the accepted ones: a guess would give a wrong picture without an error.
The range of float data is decided once for the whole call (a batch, or a list), as diffusers decides it for
the whole batch: images of one batch are never read in different ranges.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ACCEPTED = ("uint8 (or integer) levels 0..255; float in [0, 1]; float in [-1, 1] (rescaled, with a warning); "
            "whole-number float in [0, 255]")


class ImageRangeError(ValueError):
    """Numeric image data whose values fit none of the accepted ranges (or that could be read in several)."""


def to_uint8_images(image: Any) -> list[np.ndarray]:
    """Every image of ``image`` (one image, a list, or a 4-D batch) as RGB uint8 HWC."""
    items = _items(image)
    layouts = [_hwc(x) if isinstance(x, (np.ndarray, torch.Tensor)) else None for x in items]
    floats = [a for a in layouts if a is not None and np.issubdtype(a.dtype, np.floating)]
    float_range = _float_range(floats) if floats else None
    out = []
    for x, a in zip(items, layouts):
        out.append(_pixels(x) if a is None else _levels(a, float_range))
    return out


def to_uint8_rgb(image: Any) -> np.ndarray:
    """One image as RGB uint8 HWC (see the module doc for the accepted forms and ranges)."""
    images = to_uint8_images(image)
    if len(images) != 1:
        raise ValueError(f"expected one image, got a batch of {len(images)}")
    return images[0]


def _items(image: Any) -> list:
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list")
        return [y for x in image for y in (_items(x) if _is_batch(x) else [x])]
    return list(image) if _is_batch(image) else [image]


def _is_batch(x: Any) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 4


def _pixels(image: Any) -> np.ndarray:
    """A path or a PIL image, as ``xpsr infer`` reads files."""
    if isinstance(image, (str, Path)):
        from xpsr.data.images import load_rgb

        return load_rgb(image)[0]
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")  # composited on white, as xpsr infer does with files
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.array(image.convert("RGB"), dtype=np.uint8)
    raise TypeError(f"image must be a path, PIL image, numpy array or tensor, not {type(image).__name__}")


def _hwc(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A tensor (CHW, torchvision's layout) or an array (HWC, numpy's and PIL's) as an HWC numpy array, values
    untouched (bfloat16 and half tensors as float32)."""
    kind = "tensor" if isinstance(x, torch.Tensor) else "array"
    if isinstance(x, torch.Tensor):
        if x.ndim == 3 and x.shape[0] not in (1, 3):
            hint = " (an HWC tensor: permute(2, 0, 1) it)" if x.shape[-1] in (1, 3) else ""
            raise ValueError(f"a tensor image must be (C, H, W) with C = 1 or 3, got {tuple(x.shape)}{hint}")
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        a = t.numpy()
        a = np.moveaxis(a, 0, -1) if a.ndim == 3 else a
    else:
        a = x
        if a.ndim == 3 and a.shape[2] not in (1, 3):
            hint = " (a CHW array: transpose(1, 2, 0) it, or pass a tensor)" if a.shape[0] in (1, 3) else ""
            raise ValueError(f"an array image must be (H, W, 3), got {a.shape}{hint}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"a {kind} image must have 2 or 3 dimensions (4 for a batch), got shape {tuple(x.shape)}")
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageRangeError(f"a {kind} image of dtype {a.dtype}: accepted are {ACCEPTED}")
    return a


def _float_range(arrays: list[np.ndarray]) -> str:
    """"unit" ([0, 1]), "signed" ([-1, 1]) or "levels" ([0, 255], whole numbers), decided over all ``arrays``."""
    lo = min(float(np.min(a)) for a in arrays)
    hi = max(float(np.max(a)) for a in arrays)
    found = f"float image data with values in [{lo:.4g}, {hi:.4g}]"
    if not (np.isfinite(lo) and np.isfinite(hi)) or any(not np.isfinite(a).all() for a in arrays):
        raise ImageRangeError(f"{found} has NaN or infinite values; accepted are {ACCEPTED}")
    if lo >= 0 and hi <= 1:
        return "unit"
    if lo >= -1 and hi <= 1:
        warnings.warn(f"{found}: read as [-1, 1] and rescaled to [0, 1], as diffusers' image processor does; pass "
                      "images in [0, 1] (or uint8) to silence this", UserWarning, stacklevel=4)
        return "signed"
    if lo >= 0 and hi <= 255 and all(np.array_equal(a, np.round(a)) for a in arrays):
        return "levels"
    raise ImageRangeError(f"{found} fit no accepted range ({ACCEPTED}); for 8-bit data pass uint8 "
                          "(e.g. a.astype(np.uint8)) or divide by 255")


def _levels(a: np.ndarray, float_range: str | None) -> np.ndarray:
    """HWC numeric data (range already checked for floats) -> RGB uint8."""
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageRangeError(f"integer image data ({a.dtype}) with values in [{lo}, {hi}]: accepted are "
                                  f"{ACCEPTED}; scale 16-bit data to 8 bits or to float in [0, 1]")
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float64)
        if float_range == "signed":
            x = (x + 1) / 2
        if float_range in ("unit", "signed"):
            x = x * 255
        a = np.round(x)
    a = a.astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)
