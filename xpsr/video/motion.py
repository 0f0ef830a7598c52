"""Motion between consecutive frames (OpenCV's DIS optical flow, no weights) and warping along it.

Flow is estimated on the LR frames (enlarged so the short side is at least ``MIN_FLOW_SIDE`` px: DIS works on
8 px patches and finds little on a 32 px frame) and resampled to whatever grid needs it: the latent grid for
the noise, the processing size for a carried image. A pixel counts as *tracked* when the backward flow
(current -> previous) and the forward flow agree within ``flow_check`` LR px; elsewhere the content is new
(disocclusion, the frame border) and nothing is taken from the previous frame.

Noise stays Gaussian under warping by moving whole samples (:func:`warp_noise`): each latent takes the value of
the nearest latent its content came from, each previous sample is used at most once (a second taker gets fresh
noise), and untracked latents get fresh noise. Every value is then a distinct N(0, 1) draw, independent of the
others, so the field is exactly white Gaussian noise, as the sampler expects; bilinear warping would average
neighbours and shrink the variance (blurred noise reads to the model as image content).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

MIN_FLOW_SIDE = 128
PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
           "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


@dataclass
class Motion:
    """Where each pixel of the current frame was in the previous one, in LR px, and whether it was tracked."""

    flow: np.ndarray  # (h, w, 2) float32 at the flow grid; x, y displacement to the previous frame in LR px
    tracked: np.ndarray  # (h, w) bool at the flow grid
    lr_size: tuple[int, int]  # (h, w) of the LR frames


def _gray(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (size[1], size[0]), interpolation=cv2.INTER_CUBIC) if gray.shape != size else gray


def estimate(previous: np.ndarray, current: np.ndarray, preset: str, check: float) -> Motion:
    """Backward flow current -> previous between two LR RGB frames, with the forward-backward check."""
    h, w = current.shape[:2]
    k = max(1, int(np.ceil(MIN_FLOW_SIDE / min(h, w))))
    size = (h * k, w * k)
    prev_g, cur_g = _gray(previous, size), _gray(current, size)
    dis = cv2.DISOpticalFlow_create(PRESETS[preset])
    back = dis.calc(cur_g, prev_g, None)  # cur(x) ~ prev(x + back(x))
    fwd = dis.calc(prev_g, cur_g, None)  # prev(y) ~ cur(y + fwd(y))
    gy, gx = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    fwd_at = cv2.remap(fwd, gx + back[..., 0], gy + back[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    miss = np.linalg.norm(back + fwd_at, axis=-1) / k
    inside = ((gx + back[..., 0] >= 0) & (gx + back[..., 0] <= size[1] - 1)
              & (gy + back[..., 1] >= 0) & (gy + back[..., 1] <= size[0] - 1))
    return Motion(back / k, (miss <= check) & inside, (h, w))


def resampled(motion: Motion, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(flow in target px, tracked) on an (h, w) grid covering the same picture as the LR frame."""
    flow = cv2.resize(motion.flow, (w, h), interpolation=cv2.INTER_LINEAR)
    flow[..., 0] *= w / motion.lr_size[1]
    flow[..., 1] *= h / motion.lr_size[0]
    tracked = cv2.resize(motion.tracked.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return flow, tracked


def warp_noise(previous: torch.Tensor, motion: Motion | None, fresh: torch.Tensor) -> torch.Tensor:
    """``previous`` noise (1, C, h, w) moved along ``motion`` by whole latents; see the module docstring.
    ``fresh`` (same shape) supplies the values of untracked latents and of second takers."""
    if motion is None:
        return fresh.clone()
    _, _, h, w = previous.shape
    flow, tracked = resampled(motion, h, w)
    gy, gx = np.mgrid[0:h, 0:w]
    sx, sy = np.rint(gx + flow[..., 0]).astype(np.int64), np.rint(gy + flow[..., 1]).astype(np.int64)
    ok = tracked & (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    source = np.where(ok, sy * w + sx, -1).ravel()
    targets = np.flatnonzero(ok.ravel())
    _, first = np.unique(source[targets], return_index=True)  # each source sample goes to one target only
    keep = targets[first]
    out = fresh.reshape(fresh.shape[1], -1).clone()
    out[:, torch.from_numpy(keep)] = previous.reshape(previous.shape[1], -1)[:, torch.from_numpy(source[keep])]
    return out.reshape(fresh.shape)


def warp_image(previous: torch.Tensor, motion: Motion) -> tuple[torch.Tensor, torch.Tensor]:
    """``previous`` image (1, 3, H, W) warped to the current frame (bilinear), and where it is tracked (1, 1, H, W)."""
    _, _, h, w = previous.shape
    flow, tracked = resampled(motion, h, w)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    src = previous[0].permute(1, 2, 0).float().cpu().numpy()
    warped = cv2.remap(src, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    as_tensor = torch.from_numpy(warped).permute(2, 0, 1)[None].to(previous.device, previous.dtype)
    return as_tensor, torch.from_numpy(tracked)[None, None].to(previous.device, previous.dtype)
