"""Reading cached VAE posterior moments of HR images (written by ``xpsr.training.latent_cache``).

A cache folder holds ``cache.json`` (which VAE made it: the sha256 of its weights) and one
``<hr_hash>.safetensors`` per HR image with ``moments`` (mean and log-variance, 2C x h x w, float32) of the
image and ``moments_flipped`` of its mirror image (the dataset's horizontal flip). Entries are written to a
temporary name and renamed, so a crash leaves either a whole entry or none.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from xpsr.errors import XPSRError

INFO = "cache.json"


class LatentCacheError(XPSRError):
    """The latent cache is missing an image, was made by another VAE, or does not suit the crop."""


def entry_path(folder: str | Path, hr_hash: str) -> Path:
    return Path(folder) / f"{hr_hash}.safetensors"


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO
    if not path.is_file():
        raise LatentCacheError(f"data.latent_cache={folder}: no {INFO} there; make the cache first with "
                               "`python scripts/cache_latents.py`")
    return json.loads(path.read_text())


class LatentCache:
    """Moments by HR image hash; ``flipped`` selects those of the mirrored image."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.info = read_info(folder)

    def moments(self, hr_hash: str, flipped: bool) -> torch.Tensor:
        path = entry_path(self.folder, hr_hash)
        if not path.is_file():
            raise LatentCacheError(f"data.latent_cache={self.folder}: no entry for HR image {hr_hash}; rerun "
                                   "`python scripts/cache_latents.py` over these pairs (it adds what is missing)")
        return load_file(path)["moments_flipped" if flipped else "moments"]
