#!/usr/bin/env python
"""How far a tiled VAE encode -> decode is from the untiled one: PSNR, latent error, time, peak RSS.

A smooth photo (scikit-image's astronaut, bicubic to SIZE) goes through a VAE with random weights (the
tiny preset's or Stable Diffusion's shapes). One process per run, so peak RSS is that run's:

    python scripts/vae_tiling_psnr.py --vae tiny --size 1024 --untiled --save /tmp/ref.pt
    python scripts/vae_tiling_psnr.py --vae tiny --size 1024 --reference /tmp/ref.pt \\
        --encoder-tile 512 --decoder-tile 64 [--impl exact|before] [--attention global|tile] [--cache-mb 2048]

``--impl before`` is the tiling of commit a7bbcaa: independent tiles (each with its own GroupNorm
statistics and attention) blended with Gaussian weights (overlap 64 px / 8 latents). Prints one JSON line;
``psnr_*`` compare images mapped to [0, 1] and clamped (what inference saves), ``latent_rel_err`` is
||z - z_ref|| / ||z_ref||, ``psnr_decode_only`` decodes the reference latents.
"""
import argparse
import json
import threading
import time

import numpy as np
import psutil
import torch
from diffusers import AutoencoderKL
from PIL import Image

from xpsr.inference.tiling import gaussian_weight, tile_starts, vae_decode, vae_encode
from xpsr.models.tiny import TINY_VAE

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def smooth_image(size: int) -> torch.Tensor:
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def blend_before(fn, height: int, width: int, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """Commit a7bbcaa's tiled_apply: Gaussian-weighted independent tiles, outputs ``scale`` x the grid."""
    out = weights = None
    for y in tile_starts(height, tile, overlap):
        for x in tile_starts(width, tile, overlap):
            h, w = min(tile, height), min(tile, width)
            piece = fn(y, x, h, w).float()
            if out is None:
                out = piece.new_zeros(piece.shape[0], piece.shape[1], height * scale, width * scale)
                weights = piece.new_zeros(1, 1, height * scale, width * scale)
            g = gaussian_weight(h * scale, w * scale)
            out[:, :, y * scale:(y + h) * scale, x * scale:(x + w) * scale] += piece * g
            weights[:, :, y * scale:(y + h) * scale, x * scale:(x + w) * scale] += g
    return out / weights


def encode_before(vae, image, tile):
    h, w = image.shape[-2] // 8, image.shape[-1] // 8
    if max(image.shape[-2:]) <= tile:
        return vae_encode(vae, image, None)
    mean = blend_before(lambda y, x, th, tw: vae.encode(image[:, :, y * 8:(y + th) * 8, x * 8:(x + tw) * 8])
                        .latent_dist.mean, h, w, tile // 8, 8, 1)
    return mean * vae.config.scaling_factor


def decode_before(vae, latents, tile):
    z = latents / vae.config.scaling_factor
    if max(z.shape[-2:]) <= tile:
        return vae_decode(vae, latents, None)
    return blend_before(lambda y, x, th, tw: vae.decode(z[:, :, y:y + th, x:x + tw]).sample, *z.shape[-2:],
                        tile, 8, 8)


def measured(fn):
    """(result, seconds, peak RSS added while it ran in MB), RSS polled every millisecond."""
    proc, done = psutil.Process(), threading.Event()
    base = proc.memory_info().rss
    peak = [base]

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    watcher = threading.Thread(target=poll)
    watcher.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        done.set()
        watcher.join()
    return result, time.perf_counter() - start, (peak[0] - base) / 2**20


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = ((a + 1) / 2).clamp(0, 1), ((ref + 1) / 2).clamp(0, 1)
    mse = (a - ref).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", choices=["tiny", "sd"], default="tiny")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--untiled", action="store_true", help="the reference run (no tiles)")
    parser.add_argument("--save", help="write the latents and image here (.pt)")
    parser.add_argument("--reference", help="an --untiled run's --save file to compare with")
    parser.add_argument("--impl", choices=["exact", "before"], default="exact")
    parser.add_argument("--encoder-tile", type=int, default=512, help="px")
    parser.add_argument("--decoder-tile", type=int, default=64, help="latents")
    parser.add_argument("--attention", choices=["global", "tile"], default="global")
    parser.add_argument("--cache-mb", type=float, default=2048)
    parser.add_argument("--pad", type=int, default=None, help="tile padding (default: the receptive field)")
    args = parser.parse_args()

    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY_VAE if args.vae == "tiny" else SD_VAE)).eval()
    image = smooth_image(args.size)
    options = {"pad": args.pad, "attention": args.attention, "cache_mb": args.cache_mb}
    if args.untiled:
        encode, decode = (lambda: vae_encode(vae, image, None)), (lambda z: vae_decode(vae, z, None))
    elif args.impl == "before":
        encode = lambda: encode_before(vae, image, args.encoder_tile)  # noqa: E731
        decode = lambda z: decode_before(vae, z, args.decoder_tile)  # noqa: E731
    else:
        encode = lambda: vae_encode(vae, image, args.encoder_tile, **options)  # noqa: E731
        decode = lambda z: vae_decode(vae, z, args.decoder_tile, **options)  # noqa: E731
    latents, t_enc, rss_enc = measured(encode)
    decoded, t_dec, rss_dec = measured(lambda: decode(latents))
    result = {"vae": args.vae, "size": args.size, "mode": "untiled" if args.untiled else args.impl,
              "encoder_tile": args.encoder_tile, "decoder_tile": args.decoder_tile, "attention": args.attention,
              "cache_mb": args.cache_mb, "encode_s": round(t_enc, 2), "decode_s": round(t_dec, 2),
              "encode_peak_rss_mb": round(rss_enc), "decode_peak_rss_mb": round(rss_dec)}
    if args.save:
        torch.save({"latents": latents, "image": decoded}, args.save)
    if args.reference:
        ref = torch.load(args.reference, weights_only=True)
        result["psnr_encode_decode"] = round(psnr(decoded, ref["image"]), 2)
        result["latent_rel_err"] = float((latents - ref["latents"]).norm() / ref["latents"].norm())
        result["psnr_decode_only"] = round(psnr(decode(ref["latents"]), ref["image"]), 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
