"""A real video codec on a short clip, in memory: RGB frames -> encoder (PyAV's FFmpeg) -> decoder -> RGB frames.

`prepare`'s video training data runs its degraded LR frames through this, so the LR frames carry what a codec
does to video: 4:2:0 chroma, block and ringing artefacts that differ between the key frame and the predicted
frames, and detail smeared or frozen along the motion. Only the decoded frames are kept (the bitstream is thrown
away), so the container's random ids do not matter; the encoders run single-threaded, which makes their output
the same bytes run after run (libx265 is left out: at small sizes its output changed between identical runs).
"""
from __future__ import annotations

import io
import os
from fractions import Fraction

import numpy as np

# single-threaded, quiet: the same output bytes on every run (multi-threaded encoders may decide differently)
ENCODER_OPTIONS = {
    "libx264": {"preset": "medium", "threads": "1"},
    "libvpx-vp9": {"b": "0", "threads": "1"},  # b=0: constant quality (CRF alone rules)
    "libsvtav1": {"svtav1-params": "lp=1"},
}


class CodecError(RuntimeError):
    """The encoder or the decoder failed, or the decoder gave back another number of frames."""


def _even(frames: list[np.ndarray]) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Pad frames to even sides (4:2:0 needs them; edge pixels repeated) and return the size to crop back to."""
    h, w = frames[0].shape[:2]
    ph, pw = h % 2, w % 2
    if not (ph or pw):
        return frames, (h, w)
    return [np.pad(f, ((0, ph), (0, pw), (0, 0)), mode="edge") for f in frames], (h, w)


def _encode(frames: list[np.ndarray], codec: str, crf: int, rate: float) -> bytes:
    import av

    if codec == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encoder at its default level
    buf = io.BytesIO()
    out = av.open(buf, "w", format="matroska")
    try:
        stream = out.add_stream(codec, rate=Fraction(rate).limit_denominator(1001),
                                options={"crf": str(crf), **ENCODER_OPTIONS[codec]})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    finally:
        out.close()
    return buf.getvalue()


def _decode(data: bytes) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def codec_roundtrip(frames: list[np.ndarray], codec: str, crf: int, rate: float = 25.0) -> tuple[list[np.ndarray], int]:
    """``frames`` (RGB uint8, one size) encoded with ``codec`` at ``crf`` and decoded again; also the bitstream's
    size in bytes. Raises :class:`CodecError` naming the codec when FFmpeg fails."""
    import av

    if codec not in ENCODER_OPTIONS:
        raise CodecError(f"codec {codec!r} is not one of {sorted(ENCODER_OPTIONS)}")
    padded, (h, w) = _even(frames)
    try:
        data = _encode(padded, codec, crf, rate)
        decoded = _decode(data)
    except (av.error.FFmpegError, ValueError) as e:
        raise CodecError(f"{codec} at crf {crf} failed on {w}x{h} frames ({e})") from e
    if len(decoded) != len(frames):
        raise CodecError(f"{codec} gave back {len(decoded)} of {len(frames)} frames")
    return [np.ascontiguousarray(f[:h, :w]) for f in decoded], len(data)
