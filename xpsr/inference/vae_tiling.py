"""A tiled VAE encoder/decoder that gives the untiled result.

Running the VAE on tiles independently changes the image: every GroupNorm would normalise with its own
tile's statistics, the mid-block attention would only see its tile, and convolutions at a tile's border
would read zeros instead of the neighbouring pixels. Here the encoder/decoder runs as a list of *units*
(conv_in, each ResNet block, down/upsampler, the mid-block attention, the output head) over tiles whose
core regions partition the image and which are padded by the network's receptive field:

- every GroupNorm uses the statistics of the whole image: a sweep over all tiles first sums, per group,
  the values and squares of each tile's core region (the padding is cropped out so nothing counts twice),
  and only then do the tiles go past that norm;
- the attention (``attention="global"``) attends from each tile's queries to the keys/values of the whole
  image, gathered the same way, so it is exact too; ``"tile"`` attends within the padded tile only, as the
  official XPSR/DiffBIR tiled VAE does (approximate, needs no whole-image keys);
- padding >= the receptive field keeps the core of every tile equal to the untiled result.

Between sweeps a tile's state is the input of the unit it waits at. States are kept while they fit in
``cache_mb``; a tile without a kept state is recomputed from the input (all statistics before it are
known), so memory stays bounded by the cache, one tile's working set and the whole-image input/output.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn


class _Pending(Exception):
    """A tile reached a GroupNorm or attention whose whole-image statistics are not gathered yet."""


@dataclass
class _Unit:
    run: Callable[[torch.Tensor], torch.Tensor]
    reach: Fraction  # how far (in input units) the unit reads past an output position
    stride: Fraction  # input units per position after this unit


@dataclass
class _Tile:
    window: tuple[int, int, int, int]  # padded region (y0, y1, x0, x1) in input units
    core: tuple[int, int, int, int]  # the part of the output this tile owns, in input units
    state: torch.Tensor | None = None  # kept input of unit ``at`` (None: recompute from the input)
    at: int = 0


def _conv_reach(module: nn.Module) -> int:
    return sum((c.kernel_size[0] // 2) * c.dilation[0] for c in module.modules() if isinstance(c, nn.Conv2d))


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"tiled VAE: unsupported VAE structure ({what}); set vae_tile=0 / vae_decoder_tile=0 "
                         "to run it untiled")


class _Runner:
    """Runs a list of units over tiles with whole-image GroupNorm statistics (see the module docstring)."""

    def __init__(self, units: list[_Unit], norms: list[nn.GroupNorm], attention: str, cache_mb: float):
        self.units, self.norms, self.attention = units, norms, attention
        self.cache_bytes, self.cached = cache_mb * 2**20, 0
        self.stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # norm -> (mean, rstd), (B, G)
        self.sums: dict[nn.Module, list[torch.Tensor]] = {}  # norm -> [sum, sum of squares, count]
        self.keys_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # attention -> whole-image k, v
        self.grids: dict[nn.Module, list[torch.Tensor]] = {}  # attention -> k, v grids being filled
        self.tile: _Tile | None = None
        self.size, self.window_area = (0, 0), 0

    # --- where the current tile's core lies, at the resolution of a tensor inside the network ---------------
    def _crop(self, x: torch.Tensor) -> tuple[tuple[slice, slice], tuple[slice, slice], tuple[int, int]]:
        """(core slices within the tile tensor, core slices within the whole image, whole-image size)."""
        (wy0, wy1, wx0, wx1), (cy0, cy1, cx0, cx1) = self.tile.window, self.tile.core
        ry, rx = Fraction(x.shape[-2], wy1 - wy0), Fraction(x.shape[-1], wx1 - wx0)

        def at(v: int, r: Fraction) -> int:
            p = v * r
            assert p.denominator == 1, "tiles must be aligned to the VAE's scale factor"
            return int(p)

        local = (slice(at(cy0 - wy0, ry), at(cy1 - wy0, ry)), slice(at(cx0 - wx0, rx), at(cx1 - wx0, rx)))
        whole = (slice(at(cy0, ry), at(cy1, ry)), slice(at(cx0, rx), at(cx1, rx)))
        return local, whole, (at(self.size[0], ry), at(self.size[1], rx))

    def group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, g = x.shape[0], norm.num_groups
        if norm not in self.stats:
            (ys, xs), _, _ = self._crop(x)
            core = x[:, :, ys, xs].reshape(b, g, -1).double()
            sums = self.sums.setdefault(norm, [0.0, 0.0, 0])
            sums[0] = sums[0] + core.sum(-1)
            sums[1] = sums[1] + core.square().sum(-1)
            sums[2] += core.shape[-1]
            raise _Pending
        mean, rstd = self.stats[norm]
        y = (x.reshape(b, g, -1).float() - mean[..., None]) * rstd[..., None]
        y = y.reshape(x.shape).to(x.dtype)
        if norm.affine:
            y = y * norm.weight[:, None, None] + norm.bias[:, None, None]
        return y

    def attend(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """The VAE mid-block attention (diffusers' AttnProcessor2_0 computation) with whole-image keys/values."""
        residual, (b, c, h, w) = x, x.shape
        normed = attn.group_norm(x) if attn.group_norm is not None else x
        tokens = normed.flatten(2).transpose(1, 2)
        if self.attention == "tile":
            key, value = attn.to_k(tokens), attn.to_v(tokens)
        elif attn in self.keys_values:
            key, value = self.keys_values[attn]
        else:
            (ys, xs), (gy, gx), (gh, gw) = self._crop(normed)
            core = normed[:, :, ys, xs]
            core_tokens = core.flatten(2).transpose(1, 2)
            if attn not in self.grids:
                self.grids[attn] = [normed.new_zeros(b, p.out_features, gh, gw) for p in (attn.to_k, attn.to_v)]
            for grid, proj in zip(self.grids[attn], (attn.to_k, attn.to_v)):
                grid[:, :, gy, gx] = proj(core_tokens).transpose(1, 2).reshape(b, -1, *core.shape[-2:])
            raise _Pending
        query = attn.to_q(tokens)
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value), dropout_p=0.0)
        out = out.transpose(1, 2).reshape(b, -1, query.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _close_sweep(self) -> None:
        """Turn what the sweep gathered into whole-image statistics (or keys/values)."""
        for norm, (s1, s2, n) in self.sums.items():
            mean = s1 / n
            var = (s2 / n - mean.square()).clamp_min(0)
            self.stats[norm] = (mean.float(), (var + norm.eps).rsqrt().float())
        for attn, (k, v) in self.grids.items():
            self.keys_values[attn] = (k.flatten(2).transpose(1, 2), v.flatten(2).transpose(1, 2))
        self.sums, self.grids = {}, {}

    # --- the sweeps ------------------------------------------------------------------------------------------
    def _keep(self, tile: _Tile, at: int, state: torch.Tensor) -> None:
        """Keep ``state`` as the tile's restart point (instead of an older one) if the states of *every* tile at
        this unit would fit in the cache: all tiles then restart from the same, latest affordable unit."""
        y0, y1, x0, x1 = tile.window
        all_tiles = state.nbytes * self.window_area / ((y1 - y0) * (x1 - x0))
        old = tile.state.nbytes if tile.state is not None else 0
        if all_tiles <= self.cache_bytes and self.cached - old + state.nbytes <= self.cache_bytes:
            self.cached += state.nbytes - old
            tile.state, tile.at = state, at

    def _input_of(self, tile: _Tile, unit: int, source: torch.Tensor) -> torch.Tensor:
        """The input of ``unit`` for ``tile``, recomputed from its kept state or from the input."""
        if tile.state is None:
            y0, y1, x0, x1 = tile.window
            x, start = source[:, :, y0:y1, x0:x1], 0
        else:
            x, start = tile.state, tile.at
        for i in range(start, unit):
            x = self.units[i].run(x)
            self._keep(tile, i + 1, x)
        return x

    def run(self, source: torch.Tensor, tiles: list[_Tile]) -> torch.Tensor:
        self.size = tuple(source.shape[-2:])
        self.window_area = sum((t.window[1] - t.window[0]) * (t.window[3] - t.window[2]) for t in tiles)
        out = None
        try:
            for norm in self.norms:  # the units call their own GroupNorms: route them here
                norm.forward = lambda x, norm=norm: self.group_norm(norm, x)
            for u, unit in enumerate(self.units):
                pending = True
                while pending:
                    pending = False
                    for tile in tiles:
                        self.tile = tile
                        x = self._input_of(tile, u, source)
                        try:
                            y = unit.run(x)
                        except _Pending:
                            pending = True
                            continue
                        if u + 1 < len(self.units):
                            self._keep(tile, u + 1, y)
                            continue
                        (ys, xs), (gy, gx), (gh, gw) = self._crop(y)
                        if out is None:
                            out = y.new_zeros(y.shape[0], y.shape[1], gh, gw)
                        out[:, :, gy, gx] = y[:, :, ys, xs]
                    if pending:
                        self._close_sweep()
        finally:
            for norm in self.norms:
                del norm.forward  # back to the class's forward
        return out


# --- the units of diffusers' Encoder / Decoder ------------------------------------------------------------------
def _resnet(block: nn.Module) -> _Unit:
    _check(isinstance(block, ResnetBlock2D) and block.upsample is None and block.downsample is None,
           f"{type(block).__name__} where a plain ResnetBlock2D was expected")
    main = (block.conv1.kernel_size[0] // 2) + (block.conv2.kernel_size[0] // 2)
    short = _conv_reach(block.conv_shortcut) if block.conv_shortcut is not None else 0
    return _Unit(lambda x: block(x, None), Fraction(max(main, short)), Fraction(1))


def _unit_of(module: nn.Module, attend) -> _Unit:
    if isinstance(module, Downsample2D):
        _check(module.use_conv and module.norm is None and module.conv.stride[0] == 2, "a Downsample2D variant")
        # padding 0 pads one row/column at the bottom/right: an output reads up to k - 1 inputs ahead
        return _Unit(module, Fraction(module.conv.kernel_size[0] - 1), Fraction(2))
    if isinstance(module, Upsample2D):
        _check(module.interpolate and not module.use_conv_transpose and module.norm is None,
               "an Upsample2D variant")
        return _Unit(module, Fraction(_conv_reach(module), 2), Fraction(1, 2))
    if isinstance(module, Attention):
        _check(module.spatial_norm is None and module.norm_q is None and module.norm_k is None
               and not module.is_cross_attention, "an attention variant")
        return _Unit(lambda x: attend(module, x), Fraction(0), Fraction(1))
    return _resnet(module)


def _mid_modules(mid: nn.Module) -> list[nn.Module]:
    modules = [mid.resnets[0]]
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        modules += ([attn] if attn is not None else []) + [resnet]
    return modules


def _head(net: nn.Module) -> _Unit:
    _check(isinstance(net.conv_norm_out, nn.GroupNorm), "the output norm is not a GroupNorm")
    return _Unit(lambda x: net.conv_out(net.conv_act(net.conv_norm_out(x))), Fraction(_conv_reach(net.conv_out)),
                 Fraction(1))


def _conv(conv: nn.Module) -> _Unit:
    return _Unit(conv, Fraction(_conv_reach(conv)), Fraction(1))


def encoder_units(vae, attend) -> list[_Unit]:
    """conv_in, the down blocks' ResNets and downsamplers, the mid block, the head and quant_conv."""
    enc = vae.encoder
    modules = []
    for block in enc.down_blocks:
        modules += list(block.resnets) + list(block.downsamplers or [])
    modules += _mid_modules(enc.mid_block)
    units = [_conv(enc.conv_in)] + [_unit_of(m, attend) for m in modules] + [_head(enc)]
    return units + ([_conv(vae.quant_conv)] if vae.quant_conv is not None else [])


def decoder_units(vae, attend) -> list[_Unit]:
    """post_quant_conv, conv_in, the mid block, the up blocks' ResNets and upsamplers, the head."""
    dec = vae.decoder
    modules = _mid_modules(dec.mid_block)
    for block in dec.up_blocks:
        modules += list(block.resnets) + list(block.upsamplers or [])
    units = [_conv(vae.post_quant_conv)] if vae.post_quant_conv is not None else []
    return units + [_conv(dec.conv_in)] + [_unit_of(m, attend) for m in modules] + [_head(dec)]


def receptive_radius(units: list[_Unit]) -> Fraction:
    """How far (in input units) an output position can depend on inputs, the attention aside."""
    radius, step = Fraction(0), Fraction(1)
    for unit in units:
        radius += unit.reach * step
        step *= unit.stride
    return radius


def make_tiles(height: int, width: int, core: int, pad: int, align: int) -> list[_Tile]:
    """Tiles whose cores (``core`` rounded to ``align``, evened out) partition the grid, padded by ``pad``."""
    tiles = []
    cores = []
    for length in (height, width):
        n = math.ceil(length / core)
        size = math.ceil(length / n / align) * align  # the same number of tiles, evened out
        cores.append([(s, min(s + size, length)) for s in range(0, length, size)])
    for cy0, cy1 in cores[0]:
        for cx0, cx1 in cores[1]:
            window = (max(cy0 - pad, 0), min(cy1 + pad, height), max(cx0 - pad, 0), min(cx1 + pad, width))
            tiles.append(_Tile(window, (cy0, cy1, cx0, cx1)))
    return tiles


def _padding(units: list[_Unit], align: int) -> int:
    """The receptive field rounded up to the tile alignment (the scale factor when encoding)."""
    return math.ceil(receptive_radius(units) / align) * align


def untiled_limit(vae, tile: int, decoder: bool) -> int:
    """The longest side (px to encode / latents to decode) that goes through the VAE whole: one tile of
    ``tile`` plus the default padding on both sides."""
    units = (decoder_units if decoder else encoder_units)(vae, None)
    return tile + 2 * _padding(units, 1 if decoder else 2 ** (len(vae.config.block_out_channels) - 1))


def run_tiled(vae, x: torch.Tensor, tile: int, decoder: bool, pad: int | None, attention: str,
              cache_mb: float) -> torch.Tensor | None:
    """The encoder's moments / the decoder's image, computed over tiles of ``tile`` input units padded by
    ``pad`` (None: the receptive field); None when one padded tile would cover the whole input (the caller
    then runs the VAE as usual)."""
    if attention not in ("global", "tile"):
        raise ValueError(f"vae_tile_attention must be 'global' or 'tile', got {attention!r}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    runner = _Runner([], [], attention, cache_mb)
    units = (decoder_units if decoder else encoder_units)(vae, runner.attend)
    align = 1 if decoder else factor  # encoder tiles start on the latent grid
    pad = _padding(units, align) if pad is None else pad
    if pad % align:
        raise ValueError(f"tiled VAE encode: padding {pad} px is not a multiple of the scale factor {align}")
    height, width = x.shape[-2:]
    if max(height, width) <= tile + 2 * pad:
        return None
    if height % align or width % align:
        raise ValueError(f"tiled VAE encode needs sides that are multiples of {factor}, got {height}x{width}")
    part = vae.decoder if decoder else vae.encoder
    runner.units = units
    runner.norms = [m for m in part.modules() if isinstance(m, nn.GroupNorm)]
    return runner.run(x, make_tiles(height, width, max(tile // align * align, align), pad, align))
