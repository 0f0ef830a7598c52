"""Blur kernels of the Real-ESRGAN degradation model (the definitions BasicSR uses), deterministic.

All builders return float64 numpy arrays that sum to 1. ``theta`` is the rotation in radians and
``sig_x``/``sig_y`` the standard deviations along the rotated axes. Randomness lives in
:func:`sample_kernel`, which draws the kind and its parameters from a numpy ``Generator``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _grid(kernel_size: int) -> np.ndarray:
    """(k, k, 2) integer offsets from the centre, x along columns."""
    ax = np.arange(-(kernel_size // 2), kernel_size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)


def _quadratic_form(kernel_size: int, sig_x: float, sig_y: float, theta: float, isotropic: bool) -> np.ndarray:
    """x^T Sigma^-1 x on the kernel grid, Sigma = R diag(sx^2, sy^2) R^T."""
    if isotropic:
        sig_y, theta = sig_x, 0.0
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    sigma = rot @ np.diag([sig_x**2, sig_y**2]) @ rot.T
    grid = _grid(kernel_size)
    return np.sum((grid @ np.linalg.inv(sigma)) * grid, axis=-1)


def _normalised(kernel: np.ndarray) -> np.ndarray:
    return kernel / kernel.sum()


def gaussian_kernel(kernel_size: int, sig_x: float, sig_y: float, theta: float, isotropic: bool = False):
    return _normalised(np.exp(-0.5 * _quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic)))


def generalized_gaussian_kernel(kernel_size: int, sig_x: float, sig_y: float, theta: float, beta: float,
                                isotropic: bool = False):
    q = _quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic)
    return _normalised(np.exp(-0.5 * np.power(q, beta)))


def plateau_kernel(kernel_size: int, sig_x: float, sig_y: float, theta: float, beta: float,
                   isotropic: bool = False):
    q = _quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic)
    return _normalised(1.0 / (np.power(q, beta) + 1.0))


def sinc_kernel(cutoff: float, kernel_size: int, pad_to: int = 0) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel with cut-off frequency ``cutoff`` (radians), zero-padded to ``pad_to``."""
    c = (kernel_size - 1) / 2
    y, x = np.mgrid[0:kernel_size, 0:kernel_size].astype(np.float64)
    r = np.hypot(x - c, y - c)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    kernel[kernel_size // 2, kernel_size // 2] = cutoff**2 / (4 * np.pi)  # the limit at r = 0
    kernel = _normalised(kernel)
    return pad_kernel(kernel, pad_to)


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    if size <= kernel.shape[0]:
        return kernel
    p = (size - kernel.shape[0]) // 2
    return np.pad(kernel, ((p, p), (p, p)))


def build_kernel(params: dict) -> np.ndarray:
    """A kernel from a parameter record written by :func:`sample_kernel` (or by hand)."""
    kind = params["kind"]
    k = params["size"]
    if kind == "sinc":
        out = sinc_kernel(params["cutoff"], k)
    elif kind == "identity":
        out = np.zeros((k, k))
        out[k // 2, k // 2] = 1.0
    else:
        iso = kind.endswith("iso") and not kind.endswith("aniso")
        args = (k, params["sig_x"], params["sig_y"], params["theta"])
        if kind in ("iso", "aniso"):
            out = gaussian_kernel(*args, isotropic=iso)
        elif kind.startswith("generalized"):
            out = generalized_gaussian_kernel(*args, params["beta"], isotropic=iso)
        elif kind.startswith("plateau"):
            out = plateau_kernel(*args, params["beta"], isotropic=iso)
        else:
            raise ValueError(f"unknown kernel kind {kind!r}")
    return pad_kernel(out, params.get("pad_to", 0))


def _beta(rng: np.random.Generator, lo: float, hi: float) -> float:
    # half of the draws below 1 and half above, as Real-ESRGAN does
    return float(rng.uniform(lo, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, hi))


def sample_kernel(rng: np.random.Generator, sizes: Sequence[int], sinc_prob: float, kinds: Sequence[str],
                  kind_probs: Sequence[float], sigma: Sequence[float], betag: Sequence[float],
                  betap: Sequence[float], pad_to: int) -> dict:
    """Draw one blur kernel's parameters (Real-ESRGAN's first/second-stage kernel)."""
    size = int(rng.choice(list(sizes)))
    if rng.uniform() < sinc_prob:
        hi_cutoff_floor = np.pi / 3 if size < 13 else np.pi / 5  # small kernels: keep the cut-off high
        return {"kind": "sinc", "size": size, "cutoff": float(rng.uniform(hi_cutoff_floor, np.pi)), "pad_to": pad_to}
    probs = np.asarray(kind_probs, dtype=np.float64)
    kind = str(rng.choice(list(kinds), p=probs / probs.sum()))
    sig_x = float(rng.uniform(*sigma))
    aniso = kind.endswith("aniso")
    params = {"kind": kind, "size": size, "sig_x": sig_x, "sig_y": float(rng.uniform(*sigma)) if aniso else sig_x,
              "theta": float(rng.uniform(-np.pi, np.pi)) if aniso else 0.0, "pad_to": pad_to}
    if kind.startswith("generalized"):
        params["beta"] = _beta(rng, *betag)
    elif kind.startswith("plateau"):
        params["beta"] = _beta(rng, *betap)
    return params
