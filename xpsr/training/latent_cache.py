"""Make the latent cache: the VAE posterior moments of every HR image of prepared pair folders, once, so the
training step runs no VAE encoder (``data.latent_cache``). The posterior *sample* is still drawn every step.

Keyed by the VAE (sha256 of its weights, in ``cache.json``) and by image (the manifest's ``hr_hash``). Crash
safe like the prompt cache: entries are written to a temporary file and renamed, a rerun skips finished
entries and removes temporaries a killed run left. A cache made by another VAE is refused, never mixed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from xpsr.data.latent_cache import INFO, LatentCacheError, entry_path


def vae_hash(vae) -> str:
    """sha256 of the VAE's weights (names, dtypes, bytes): the cache is valid for exactly these weights."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_cache(folder: str | Path, vae) -> None:
    """Refuse a cache made by another VAE (the moments would silently be wrong)."""
    from xpsr.data.latent_cache import read_info

    made_by, ours = read_info(folder).get("vae"), vae_hash(vae)
    if made_by != ours:
        raise LatentCacheError(f"data.latent_cache={folder} was made by VAE {made_by}, but this run's VAE is {ours}: "
                               "make a new cache with this VAE")


@torch.no_grad()
def _moments(vae, image: np.ndarray, device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255) * 2 - 1
    dist = vae.encode(x.to(device, next(vae.parameters()).dtype)).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1)[0].float().cpu()


def make_latent_cache(pairs: list[str | Path], vae, out: str | Path, device="cpu") -> dict:
    """Moments of every HR image in ``pairs`` (folders with manifest.jsonl) into ``out``; returns counts."""
    from xpsr.data.images import file_hash, load_rgb

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ours = vae_hash(vae)
    info = out / INFO
    if info.is_file() and json.loads(info.read_text()).get("vae") != ours:
        raise LatentCacheError(f"{out} holds moments of another VAE; choose an empty folder")
    tmp = out / f"{INFO}.tmp"
    tmp.write_text(json.dumps({"vae": ours, "scaling_factor": vae.config.scaling_factor}))
    os.replace(tmp, info)
    for stale in out.glob("*.tmp*"):  # a killed run's half-written entry
        stale.unlink()
    made = kept = 0
    for folder in map(Path, pairs):
        for line in (folder / "manifest.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            hr_hash = record.get("hr_hash") or file_hash(folder / record["hr"])
            target = entry_path(out, hr_hash)
            if target.is_file():
                kept += 1
                continue
            image = load_rgb(folder / record["hr"])[0]
            tensors = {"moments": _moments(vae, image, device), "moments_flipped": _moments(vae, image[:, ::-1],
                                                                                             device)}
            part = target.with_name(target.name + ".tmp")
            save_file(tensors, str(part))
            os.replace(part, target)
            made += 1
    return {"made": made, "kept": kept, "vae": ours}


def load_vae(cfg):
    """The VAE of ``cfg.model.base`` (the tiny preset's for ``tiny``) in fp32: the moments are stored in fp32."""
    if cfg.model.base == "tiny":
        from xpsr.models.tiny import build_tiny_base

        return build_tiny_base(seed=cfg.seed)["vae"]  # as the loop builds it (model seed = run seed)
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(cfg.model.base, subfolder="vae", revision=cfg.model.revision)


def main(argv: list[str]) -> int:
    """`python scripts/cache_latents.py [--config TRAIN.yaml] key=value ...` (TrainConfig keys)."""
    from xpsr.config import ConfigError, TrainConfig, load_config
    from xpsr.errors import XPSRError

    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    overrides = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
    try:
        cfg = load_config(TrainConfig, config, overrides, allow_missing=True)
        if not cfg.data.latent_cache or not cfg.data.pairs:
            raise ConfigError("give data.pairs=[DIR,...] and data.latent_cache=DIR")
        device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
        vae = load_vae(cfg).to(device).eval()
        counts = make_latent_cache(cfg.data.pairs, vae, cfg.data.latent_cache, device)
    except (XPSRError, FileNotFoundError, ValueError) as e:
        print(f"cache_latents: {e}", file=sys.stderr)
        return 1
    print(f"cache_latents: {counts['made']} new, {counts['kept']} kept, VAE {counts['vae']} -> {cfg.data.latent_cache}")
    return 0
