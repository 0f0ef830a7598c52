"""A tiled VAE encoder/decoder that gives the untiled result.

Running the VAE on tiles independently changes the image: every GroupNorm would normalise with its own
tile's statistics, the mid-block attention would only see its tile, and convolutions at a tile's border
would read zeros instead of the neighbouring pixels. Here the encoder/decoder runs as a list of *units*
(conv_in, each ResNet block, down/upsampler, the mid-block attention, the output head) over tiles whose
core regions partition the image and which are padded by the network's receptive field:

- every GroupNorm uses the statistics of the whole image: a sweep over all tiles first takes, per group,
  the mean and variance of each tile's core region (the padding is cropped out so nothing counts twice)
  and pools them exactly; only then do the tiles go past that norm;
- the attention (``attention="global"``) attends from each tile's queries to the keys/values of the whole
  image, gathered the same way, so it is exact too; ``"tile"`` attends within the padded tile only, as the
  official XPSR/DiffBIR tiled VAE does (approximate, needs no whole-image keys);
- padding >= the receptive field keeps the core of every tile equal to the untiled result; after each unit
  a tile is narrowed to the receptive field of the units still ahead, so the high-resolution end of the
  decoder runs with a margin of a few pixels only.

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
    core: tuple[int, int, int, int]  # (y0, y1, x0, x1) of the output it owns, in input units
    state: torch.Tensor | None = None  # kept input of unit ``at`` (None: recompute from the input)
    at: int = 0


def _conv_reach(module: nn.Module) -> int:
    return sum((c.kernel_size[0] // 2) * c.dilation[0] for c in module.modules() if isinstance(c, nn.Conv2d))


def _index(v, per_unit: Fraction) -> int:
    """Position ``v`` (input units) as an index of a tensor with ``per_unit`` positions per input unit."""
    p = v * per_unit
    assert p.denominator == 1, "tile windows must lie on the grid of every resolution they pass"
    return int(p)


def _span(start, stop, per_unit: Fraction) -> slice:
    return slice(_index(start, per_unit), _index(stop, per_unit))


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"tiled VAE: unsupported VAE structure ({what}); set vae_tile=0 / vae_decoder_tile=0 "
                         "to run it untiled")


class _Runner:
    """Runs a list of units over tiles with whole-image GroupNorm statistics (see the module docstring).

    A tile's tensor at the input of unit u covers its core plus a margin of the receptive field still ahead
    (``margins[u]``), so the padding shrinks as the network goes on and little is computed twice."""

    def __init__(self, attention: str, cache_mb: float):
        self.attention, self.cache_bytes, self.cached = attention, cache_mb * 2**20, 0
        self.units: list[_Unit] = []
        self.norms: list[nn.GroupNorm] = []
        self.margins: list[Fraction] = []
        self.stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # norm -> (mean, rstd), (B, G)
        self.sums: dict[nn.Module, list[tuple]] = {}  # norm -> per tile (count, mean, sum of squared deviations)
        self.keys_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # attention -> whole-image k, v
        self.grids: dict[nn.Module, list[torch.Tensor]] = {}  # attention -> k, v grids being filled
        self.tile: _Tile | None = None
        self.window: tuple[Fraction, ...] = ()  # what the tensor being processed covers, in input units
        self.size = (0, 0)
        self.areas: list[Fraction] = []  # all tiles' window area at each unit's input

    def plan(self, units: list[_Unit], pad: int) -> None:
        """Margins per unit: the receptive field ahead, on the grid of the coarsest resolution still ahead
        (so that downsamplers stay aligned with the untiled run), at most ``pad``."""
        steps = [Fraction(1)]
        for unit in units:
            steps.append(steps[-1] * unit.stride)
        self.units, self.margins = units, []
        for u in range(len(units) + 1):
            ahead = sum((units[j].reach * steps[j] for j in range(u, len(units))), Fraction(0))
            align = max(steps[u:])
            self.margins.append(min(Fraction(pad), math.ceil(ahead / align) * align))

    def window_at(self, tile: _Tile, u: int) -> tuple[Fraction, ...]:
        m, (cy0, cy1, cx0, cx1), (h, w) = self.margins[u], tile.core, self.size
        return (max(cy0 - m, 0), min(cy1 + m, h), max(cx0 - m, 0), min(cx1 + m, w))

    # --- where the current tile's core lies, at the resolution of a tensor inside the network ---------------
    def _crop(self, x: torch.Tensor) -> tuple[tuple[slice, slice], tuple[slice, slice], tuple[int, int]]:
        """(core slices within the tile tensor, core slices within the whole image, whole-image size)."""
        (wy0, wy1, wx0, wx1), (cy0, cy1, cx0, cx1) = self.window, self.tile.core
        ry, rx = x.shape[-2] / Fraction(wy1 - wy0), x.shape[-1] / Fraction(wx1 - wx0)
        local = (_span(cy0 - wy0, cy1 - wy0, ry), _span(cx0 - wx0, cx1 - wx0, rx))
        whole = (_span(cy0, cy1, ry), _span(cx0, cx1, rx))
        return local, whole, (_index(self.size[0], ry), _index(self.size[1], rx))

    def group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, g = x.shape[0], norm.num_groups
        if norm not in self.stats:
            (ys, xs), _, _ = self._crop(x)
            core = x[:, :, ys, xs].reshape(b, g, -1).float()
            var, mean = torch.var_mean(core, dim=-1, correction=0)
            n = core.shape[-1]
            self.sums.setdefault(norm, []).append((n, mean.double(), var.double() * n))
            raise _Pending
        mean, rstd = self.stats[norm]  # (B, G), float64
        per_channel = x.shape[1] // g
        scale = rstd.repeat_interleave(per_channel, dim=1)
        shift = -mean.repeat_interleave(per_channel, dim=1) * scale
        if norm.affine:
            scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
        # one fused pass: x * (rstd * weight) + (bias - mean * rstd * weight)
        return torch.addcmul(shift.to(x.dtype)[:, :, None, None], x, scale.to(x.dtype)[:, :, None, None])

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
        for norm, parts in self.sums.items():
            # per-tile means and sums of squared deviations, pooled exactly (Chan et al.'s parallel variance)
            count = sum(n for n, _, _ in parts)
            mean = sum(n * m for n, m, _ in parts) / count
            m2 = sum(m2 + n * (m - mean).square() for n, m, m2 in parts)
            self.stats[norm] = (mean, (m2 / count + norm.eps).rsqrt())
        for attn, (k, v) in self.grids.items():
            # contiguous (B, N, C) as to_k/to_v give them: a strided key makes SDPA fall back to the kernel that
            # materialises the (queries x keys) matrix
            self.keys_values[attn] = tuple(t.flatten(2).transpose(1, 2).contiguous() for t in (k, v))
        self.sums, self.grids = {}, {}

    # --- the sweeps ------------------------------------------------------------------------------------------
    def _step(self, tile: _Tile, u: int, x: torch.Tensor) -> torch.Tensor:
        """Unit ``u`` on the tile's tensor, narrowed to the margin the units after it still need."""
        self.tile, self.window = tile, self.window_at(tile, u)
        y = self.units[u].run(x)
        new = self.window_at(tile, u + 1)
        if new == self.window:
            return y
        (wy0, wy1, wx0, wx1), (ny0, ny1, nx0, nx1) = self.window, new
        ry, rx = y.shape[-2] / Fraction(wy1 - wy0), y.shape[-1] / Fraction(wx1 - wx0)
        ys, xs = _span(ny0 - wy0, ny1 - wy0, ry), _span(nx0 - wx0, nx1 - wx0, rx)
        return y[:, :, ys, xs].contiguous()  # a copy: a kept view would keep the whole tensor alive

    def _keep(self, tile: _Tile, at: int, state: torch.Tensor) -> None:
        """Keep ``state`` as the tile's restart point (instead of an older one) if the states of *every* tile at
        this unit would fit in the cache: all tiles then restart from the same, latest affordable unit."""
        y0, y1, x0, x1 = self.window_at(tile, at)
        all_tiles = state.nbytes * self.areas[at] / ((y1 - y0) * (x1 - x0))
        old = tile.state.nbytes if tile.state is not None else 0
        if all_tiles <= self.cache_bytes and self.cached - old + state.nbytes <= self.cache_bytes:
            self.cached += state.nbytes - old
            tile.state, tile.at = state, at

    def _input_of(self, tile: _Tile, unit: int, source: torch.Tensor) -> torch.Tensor:
        """The input of ``unit`` for ``tile``, recomputed from its kept state or from the input."""
        if tile.state is None:
            y0, y1, x0, x1 = (int(v) for v in self.window_at(tile, 0))
            x, start = source[:, :, y0:y1, x0:x1], 0
        else:
            x, start = tile.state, tile.at
        for i in range(start, unit):
            x = self._step(tile, i, x)
            self._keep(tile, i + 1, x)
        return x

    def run(self, source: torch.Tensor, tiles: list[_Tile]) -> torch.Tensor:
        self.size = tuple(source.shape[-2:])
        self.areas = []
        for u in range(len(self.units) + 1):
            windows = [self.window_at(t, u) for t in tiles]
            self.areas.append(sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in windows))
        out = None
        try:
            for norm in self.norms:  # the units call their own GroupNorms: route them here
                norm.forward = lambda x, norm=norm: self.group_norm(norm, x)
            for u in range(len(self.units)):
                pending = True
                while pending:
                    pending = False
                    for tile in tiles:
                        x = self._input_of(tile, u, source)
                        try:
                            y = self._step(tile, u, x)
                        except _Pending:
                            pending = True
                            continue
                        if u + 1 < len(self.units):
                            self._keep(tile, u + 1, y)
                            continue
                        self.window = self.window_at(tile, u + 1)  # the core
                        _, (gy, gx), (gh, gw) = self._crop(y)
                        if out is None:
                            out = y.new_zeros(y.shape[0], y.shape[1], gh, gw)
                        out[:, :, gy, gx] = y
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


def make_tiles(height: int, width: int, core: int, align: int) -> list[_Tile]:
    """Tiles whose cores partition the grid: as few per side as cores of ``core`` allow, evened out and
    rounded to ``align``."""
    cores = []
    for length in (height, width):
        n = math.ceil(length / core)
        size = math.ceil(length / n / align) * align
        cores.append([(s, min(s + size, length)) for s in range(0, length, size)])
    return [_Tile((cy0, cy1, cx0, cx1)) for cy0, cy1 in cores[0] for cx0, cx1 in cores[1]]


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
    runner = _Runner(attention, cache_mb)
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
    runner.plan(units, pad)
    runner.norms = [m for m in (vae.decoder if decoder else vae.encoder).modules() if isinstance(m, nn.GroupNorm)]
    return runner.run(x, make_tiles(height, width, max(tile // align * align, align), align))
