"""Writing the output clip: the SR frames of every chunk, in order, encoded once with the source's timestamps,
colour metadata and audio (packets copied, not re-encoded), into a temp file renamed to the final name."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from xpsr.config.video import VideoConfig
from xpsr.errors import shown
from xpsr.video.source import COLOUR_KEYS, ClipInfo

# containers that take each encoder (others fall back to Matroska, which takes them all)
FITS = {".mp4": ("libx264", "libx265", "libsvtav1", "libvpx-vp9"), ".mov": ("libx264", "libx265"),
        ".mkv": ("libx264", "libx265", "libsvtav1", "libvpx-vp9", "ffv1"), ".webm": ("libvpx-vp9", "libsvtav1")}
QUIET = {"libx265": {"x265-params": "log-level=error"}, "libsvtav1": {"svtav1-params": "log-level=1"}}


def output_suffix(input_suffix: str, cfg: VideoConfig) -> str:
    """The output container's suffix: the input's (or ``cfg.container``) when it takes the codec, else .mkv."""
    suffix = input_suffix.lower() if cfg.container == "same" else f".{cfg.container}"
    return suffix if cfg.codec in FITS.get(suffix, ()) else ".mkv"


def pixel_format(cfg: VideoConfig) -> str:
    if cfg.codec == "ffv1":
        return "yuv420p16le" if cfg.bit_depth == 10 else "bgr0"  # bgr0: lossless RGB
    return "yuv420p10le" if cfg.bit_depth == 10 else "yuv420p"


def _options(cfg: VideoConfig) -> dict[str, str]:
    if cfg.codec == "ffv1":
        return {}
    if cfg.codec == "libvpx-vp9":
        return {"crf": str(cfg.crf), "b": "0"}
    preset = {} if cfg.codec == "libsvtav1" and not cfg.preset.isdigit() else {"preset": cfg.preset}
    return {"crf": str(cfg.crf), **preset, **QUIET.get(cfg.codec, {})}


def _audio_packets(source, streams) -> Iterator:
    for packet in source.demux(streams):
        if packet.dts is not None:  # the demuxer's flush packets carry no data
            yield packet


def encode_clip(info: ClipInfo, frames: Iterator[np.ndarray], target: Path, cfg: VideoConfig, size: tuple[int, int],
                copy_audio: bool, on_frame: Callable[[], None] = lambda: None) -> dict:
    """Encode ``frames`` (RGB uint8 of ``size`` = (width, height), one per entry of ``info.pts``) to ``target``;
    returns what was kept."""
    import av

    tmp = target.with_name(f".tmp-{target.name}")
    kept = {"audio_streams": 0, "colour": dict(info.colour), "codec": cfg.codec, "pix_fmt": pixel_format(cfg)}
    out = av.open(str(tmp), "w")
    source = av.open(info.path) if copy_audio and info.audio and not info.sequence else None
    try:
        time_base = Fraction(*info.time_base)
        stream = _video_stream(out, info, cfg, size[0], size[1], time_base)
        audio = []
        if source is not None:
            for index in info.audio:
                try:
                    audio.append((source.streams[index], out.add_stream_from_template(source.streams[index])))
                except (ValueError, av.error.FFmpegError):
                    kept.setdefault("notes", []).append(f"audio stream {index} does not fit {target.suffix}; "
                                                        "left out")
        kept["audio_streams"] = len(audio)
        pending = _audio_packets(source, [a for a, _ in audio]) if audio else iter(())
        mapping = {a.index: o for a, o in audio}
        packet = next(pending, None)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = info.pts[i], time_base
            for p in stream.encode(frame):
                out.mux(p)
            now = info.pts[i] * time_base
            while packet is not None and packet.pts is not None and packet.pts * packet.time_base <= now:
                packet.stream = mapping[packet.stream.index]
                out.mux(packet)
                packet = next(pending, None)
            on_frame()
        for p in stream.encode():
            out.mux(p)
        while packet is not None:
            packet.stream = mapping[packet.stream.index]
            out.mux(packet)
            packet = next(pending, None)
        out.close()
        os.replace(tmp, target)
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if source is not None:
            source.close()
    return kept


def _video_stream(out, info: ClipInfo, cfg: VideoConfig, width: int, height: int, time_base: Fraction):
    stream = out.add_stream(cfg.codec, rate=Fraction(*info.rate), options=_options(cfg))
    stream.width, stream.height, stream.pix_fmt = width, height, pixel_format(cfg)
    stream.time_base = stream.codec_context.time_base = time_base
    for key in COLOUR_KEYS:
        if key in info.colour:
            setattr(stream.codec_context, key, info.colour[key])
    return stream


def check_encoder(cfg: VideoConfig, name: str) -> None:
    """Refuse a codec this FFmpeg build lacks before any frame is computed."""
    import av

    if cfg.codec != "png" and cfg.codec not in av.codecs_available:
        raise ValueError(f"{shown(name)}: video.codec={cfg.codec} is not in PyAV's FFmpeg build here")
