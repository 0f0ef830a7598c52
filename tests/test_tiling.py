"""Tiled VAE equals the untiled one (whole-image GroupNorm statistics, receptive-field padding, global
attention); the official latent-tiling rule; the VAE's scale factor comes from its config."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from diffusers import AutoencoderKL

from xpsr.config import InferConfig, load_config
from xpsr.inference.pipeline import condition_image, super_resolve
from xpsr.inference.tiling import blend_latent_tiles, vae_decode, vae_encode
from xpsr.inference.vae_tiling import decoder_units, encoder_units, receptive_radius, untiled_limit
from xpsr.models.build import build_xpsr, vae_scale_factor
from xpsr.models.tiny import TINY_VAE, build_tiny_base

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _vae(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**{**TINY_VAE, **overrides}).eval()


def _smooth_image(h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, h // 16 + 1, w // 16 + 1, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * 2 - 1


def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10((ref.max() - ref.min()) ** 2 / (a - ref).pow(2).mean()))


class _Calls:
    """Counts whole forwards of a module (the tiled path never runs vae.encoder / vae.decoder as a whole)."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


@torch.no_grad()
def test_tiled_encode_equals_untiled_and_needs_the_padding():
    vae = _vae()
    image = _smooth_image(96, 280)  # tile 96 + 2 x 88 px padding < 280: three tiles side by side
    untiled = vae_encode(vae, image, None)
    calls = _Calls(vae.encoder)
    tiled = vae_encode(vae, image, 96, cache_mb=64)
    assert calls.n == 0 and tiled.shape == untiled.shape == (1, 4, 12, 35)
    assert _psnr(tiled, untiled) > 100, _psnr(tiled, untiled)  # equal up to float rounding
    # the two approximations it replaces are far from it: too little padding, per-tile attention
    assert _psnr(vae_encode(vae, image, 96, pad=8, cache_mb=64), untiled) < 60
    assert _psnr(vae_encode(vae, image, 96, attention="tile", cache_mb=64), untiled) < 80


@torch.no_grad()
def test_tiled_decode_equals_untiled_with_a_full_or_a_small_state_cache():
    vae = _vae()
    z = torch.randn(1, 4, 12, 48, generator=torch.Generator().manual_seed(1))  # tile 12 + 2 x 14 < 48
    untiled = vae_decode(vae, z, None)
    calls = _Calls(vae.decoder)
    cached = vae_decode(vae, z, 12, cache_mb=64)
    assert calls.n == 0 and cached.shape == untiled.shape == (1, 3, 96, 384)
    assert _psnr(cached, untiled) > 100, _psnr(cached, untiled)
    # a cache too small for the later, larger states: tiles restart from the last unit whose states fitted
    z = z[:, :, :4]
    assert torch.equal(vae_decode(vae, z, 12, cache_mb=0.2), vae_decode(vae, z, 12, cache_mb=64))


@torch.no_grad()
def test_one_padded_tile_covering_the_image_runs_the_vae_whole():
    vae = _vae()
    image = _smooth_image(64, 264)  # 264 <= 88 + 2 x 88: one padded tile would cover it
    calls = _Calls(vae.encoder)
    assert torch.equal(vae_encode(vae, image, 88), vae_encode(vae, image, None)) and calls.n == 2
    assert untiled_limit(vae, 88, decoder=False) == 88 + 2 * 88


def test_padding_is_the_receptive_field_and_defaults_never_tile_where_the_official_code_does_not():
    # hand count for SD's VAE encoder, in px: conv_in 1; per level 2 ResNets x 2 convs x (1, 2, 4, 8) px;
    # downsamplers 2 x (1, 2, 4) px; mid block 2 ResNets x 2 convs x 8; head 8 -> 115, padded to 120
    sd = AutoencoderKL(**SD_VAE)
    assert receptive_radius(encoder_units(sd, None)) == 1 + 4 * (1 + 2 + 4 + 8) + 2 * (1 + 2 + 4) + 32 + 8
    # decoder, in latents: conv_in 1, mid 4, then 3 ResNets x 2 convs per level at 1, 1/2, 1/4, 1/8 latent and
    # the upsamplers' convs at 1/2, 1/4, 1/8; head 1/8 -> 17.25, padded to 18
    assert receptive_radius(decoder_units(sd, None)) == 1 + 4 + 6 * (1 + 0.5 + 0.25 + 0.125) + 0.875 + 0.125
    cfg = InferConfig(input="-", output_dir="-")
    # the official tiles above max side 1024 + 2 x 32 px (encoder) and 224 + 2 x 11 latents (decoder)
    assert untiled_limit(sd, cfg.vae_tile, decoder=False) == 1264 >= 1024 + 64
    assert untiled_limit(sd, cfg.vae_decoder_tile, decoder=True) == 260 >= 224 + 22


def test_bad_tiling_options_are_rejected():
    vae = _vae()
    with pytest.raises(ValueError, match="vae_tile_attention"):
        vae_encode(vae, _smooth_image(96, 280), 96, attention="local")
    with pytest.raises(ValueError, match="multiples of 8"):
        vae_encode(vae, _smooth_image(92, 300), 96)
    with pytest.raises(ValueError, match="latent_tiling"):
        blend_latent_tiles(lambda *a: None, 9, 9, 8, 2, "theirs")


def _official_blend(fn, h, w, tile_size, tile_overlap):
    """The official pipeline_xpsr.py tiling loop, transcribed (grid sizes, offsets, weights, sum order)."""
    tile_size = min(tile_size, min(h, w))
    var = 0.01
    x_mid, y_mid = (tile_size - 1) / 2, tile_size / 2
    x_probs = [np.exp(-(x - x_mid) * (x - x_mid) / (tile_size * tile_size) / (2 * var)) / np.sqrt(2 * np.pi * var)
               for x in range(tile_size)]
    y_probs = [np.exp(-(y - y_mid) * (y - y_mid) / (tile_size * tile_size) / (2 * var)) / np.sqrt(2 * np.pi * var)
               for y in range(tile_size)]
    tile_weights = torch.tile(torch.tensor(np.outer(y_probs, x_probs)), (1, 4, 1, 1))
    grid_rows, cur_x = 0, 0
    while cur_x < w:
        cur_x = max(grid_rows * tile_size - tile_overlap * grid_rows, 0) + tile_size
        grid_rows += 1
    grid_cols, cur_y = 0, 0
    while cur_y < h:
        cur_y = max(grid_cols * tile_size - tile_overlap * grid_cols, 0) + tile_size
        grid_cols += 1
    noise_pred = contributors = None
    for row in range(grid_rows):
        for col in range(grid_cols):
            if col < grid_cols - 1 or row < grid_rows - 1:
                ofs_x = max(row * tile_size - tile_overlap * row, 0)
                ofs_y = max(col * tile_size - tile_overlap * col, 0)
            if row == grid_rows - 1:
                ofs_x = w - tile_size
            if col == grid_cols - 1:
                ofs_y = h - tile_size
            out = fn(ofs_y, ofs_x, tile_size, tile_size)
            if noise_pred is None:
                noise_pred = torch.zeros(out.shape[0], 4, h, w)
                contributors = torch.zeros(out.shape[0], 4, h, w)
            noise_pred[:, :, ofs_y:ofs_y + tile_size, ofs_x:ofs_x + tile_size] += out * tile_weights
            contributors[:, :, ofs_y:ofs_y + tile_size, ofs_x:ofs_x + tile_size] += tile_weights
    noise_pred /= contributors
    return noise_pred


def test_official_latent_tiling_rule_and_blend():
    field = torch.randn(2, 4, 40, 40, generator=torch.Generator().manual_seed(0))
    calls = []

    def fn(y, x, h, w):  # a position-dependent prediction, so offsets, weights and order all matter
        calls.append((y, x, h, w))
        return field[:, :, y:y + h, x:x + w] * (1 + 0.1 * y + 0.01 * x)

    # h*w <= tile^2 runs whole even when a side exceeds the tile (ours would tile 6 x 10 at tile 8)
    for h, w in [(8, 8), (6, 10)]:
        calls.clear()
        assert blend_latent_tiles(fn, h, w, 8, 2, "official").shape[-2:] == (h, w) and calls == [(0, 0, h, w)]
    calls.clear()
    blend_latent_tiles(fn, 6, 10, 8, 2, "ours")
    assert len(calls) == 2
    for h, w, tile, overlap in [(9, 8, 8, 2), (23, 31, 8, 3), (40, 13, 16, 4)]:
        calls.clear()
        ours = blend_latent_tiles(fn, h, w, tile, overlap, "official")
        theirs = _official_blend(fn, h, w, tile, overlap)
        assert len(calls) > 2 and torch.equal(ours, theirs), (h, w)


def _cfg(**kw):
    base = {"input": "x", "output_dir": "y", "num_inference_steps": 2, "process_size": 32, "device": "cpu"}
    return load_config(InferConfig, None, [f"{k}={v}" for k, v in {**base, **kw}.items()])


@torch.no_grad()
def test_scale_factor_comes_from_the_vae_config(tmp_path):
    vae4 = _vae(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3)
    assert vae_scale_factor(vae4) == 4 and vae_scale_factor(_vae()) == 8
    image = _smooth_image(40, 136)  # tile 40 + 2 x 44 px padding (the 4x encoder's field) < 136
    tiled, untiled = vae_encode(vae4, image, 40, cache_mb=64), vae_encode(vae4, image, None)
    assert tiled.shape == untiled.shape == (1, 4, 10, 34) and _psnr(tiled, untiled) > 100
    # the whole pipeline with a 4x VAE (and a ControlNet condition embedding that downsamples 4x)
    # (a base folder, as build_xpsr checks the conditioning widths against the VAE it loads)
    parts = build_tiny_base(seed=0)
    for name, part in dict(parts, vae=vae4).items():
        if name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            part.save_pretrained(tmp_path / name)
    modules = build_xpsr(tiny_config(base=str(tmp_path), conditioning_channels=[8, 16, 32]))
    lr = np.random.default_rng(0).integers(0, 255, (9, 13, 3), dtype=np.uint8)
    cfg = _cfg(latent_tile=6, latent_overlap=2)  # 36 x 52 px -> 9 x 13 latents: tiled latents, 4 px per latent
    assert condition_image(lr, cfg, "cpu", vae_scale_factor(vae4)).shape[-2:] == (36, 52)
    assert super_resolve(modules, lr, "", "noisy", cfg, torch.device("cpu")).shape == (36, 52, 3)
