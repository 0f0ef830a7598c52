"""Reading clips: a video file through PyAV (FFmpeg's libraries in its wheel) or a folder of frames.

A clip is first *indexed* (packets demuxed, nothing decoded): the timestamps of every frame, so the output keeps
them (variable frame rate included) and a chunk can seek to its first frame instead of decoding from the start.
Frames are then decoded one at a time (:meth:`Clip.frames`), so memory does not grow with the clip's length.
Problems of one clip (no video stream, an undecodable or truncated file, no frames, a frame over the size
limits) raise :class:`VideoError` with one line naming the file.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from xpsr.errors import XPSRError, shown

COLOUR_KEYS = ("color_range", "color_primaries", "color_trc", "colorspace")


class VideoError(XPSRError):
    """A clip that cannot be super-resolved as given; the message is one line naming the file."""


@dataclass
class ClipInfo:
    """What the output must keep of its input; JSON-able (stored in the work folder and the report)."""

    path: str
    width: int
    height: int
    pts: list[int]  # presentation timestamp of every frame, in time_base units, in display order
    time_base: tuple[int, int]
    rate: tuple[int, int]  # average frame rate (the encoder's nominal rate; timestamps rule)
    codec: str
    colour: dict = field(default_factory=dict)  # COLOUR_KEYS -> FFmpeg's enum value, where the input sets them
    audio: list[int] = field(default_factory=list)  # indices of the audio streams (copied as packets)
    sequence: list[str] = field(default_factory=list)  # image_sequence: the frame files in order

    @property
    def frames(self) -> int:
        return len(self.pts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClipInfo:
        values = json.loads(text)
        values["time_base"], values["rate"] = tuple(values["time_base"]), tuple(values["rate"])
        return cls(**values)


def _open(path: Path):
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(f"{shown(path)}: not a readable video ({_why(e)})") from e


def _why(e: Exception) -> str:
    """FFmpeg's reason without PyAV's "[Errno N]" prefix and the file name it repeats."""
    text = getattr(e, "strerror", None) or str(e)
    return text.split(": '")[0].strip()


def probe(path: Path, max_frames: int = 0) -> ClipInfo:
    """Index a video file: size, colour metadata, audio streams and the timestamp of every frame."""
    import av

    container = _open(path)
    try:
        if not container.streams.video:
            raise VideoError(f"{shown(path)}: has no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or not ctx.width or not ctx.height:
            raise VideoError(f"{shown(path)}: its video codec ({stream.codec_context.name if ctx else '?'}) is not "
                             "one PyAV's FFmpeg can decode")
        pts = []
        try:
            for packet in container.demux(stream):
                if packet.pts is not None:
                    pts.append(int(packet.pts))
        except av.error.FFmpegError as e:
            raise VideoError(f"{shown(path)}: damaged after {len(pts)} frames ({_why(e)}); re-encode or cut it") from e
        pts.sort()  # packets come in decoding order; B-frames make it differ from display order
        if stream.frames and len(pts) < stream.frames:  # the header counts more frames than the file holds
            raise VideoError(f"{shown(path)}: truncated, {len(pts)} of the {stream.frames} frames its header lists "
                             "are there")
        if max_frames:
            pts = pts[:max_frames]
        if not pts:
            raise VideoError(f"{shown(path)}: has no frames (zero-length clip)")
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        colour = {k: int(getattr(ctx, k)) for k in COLOUR_KEYS if int(getattr(ctx, k) or 0) not in (0, 2)}
        return ClipInfo(str(path), ctx.width, ctx.height, pts, (stream.time_base.numerator,
                        stream.time_base.denominator), (rate.numerator, rate.denominator), ctx.name, colour,
                        [s.index for s in container.streams.audio])
    finally:
        container.close()


def probe_sequence(folder: Path, fps: float, max_frames: int = 0) -> ClipInfo:
    """A folder of frames (sorted by name) as a clip at ``fps``; frame i is shown at i / fps."""
    from PIL import Image

    from xpsr.data.images import list_images

    files = list_images([folder])[:max_frames or None]
    if not files:
        raise VideoError(f"{shown(folder)}: image_sequence=true but the folder holds no images")
    with Image.open(files[0]) as im:
        width, height = im.size
    rate = Fraction(fps).limit_denominator(1001)
    return ClipInfo(str(folder), width, height, list(range(len(files))), (rate.denominator, rate.numerator),
                    (rate.numerator, rate.denominator), "images", sequence=[str(f) for f in files])


class Clip:
    """Decoded frames of an indexed clip, from any frame on, one at a time (RGB uint8 HWC)."""

    def __init__(self, info: ClipInfo):
        self.info = info

    def frames(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Frames ``start`` .. ``stop - 1``; a frame of another size than the first is an error."""
        if self.info.sequence:
            yield from self._images(start, stop)
            return
        import av

        container = _open(Path(self.info.path))
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            wanted = {p: i for i, p in enumerate(self.info.pts[start:stop], start)}
            if start > 0:  # the keyframe at or before the first frame we need, then decode forward
                container.seek(self.info.pts[start], stream=stream, backward=True)
            index = start
            try:
                for frame in container.decode(stream):
                    if frame.pts not in wanted:
                        continue
                    if wanted[frame.pts] != index:
                        raise VideoError(f"{shown(self.info.path)}: frame {index} is missing on decoding")
                    yield self._checked(frame.to_ndarray(format="rgb24"), index)
                    index += 1
                    if index >= stop:
                        return
            except av.error.FFmpegError as e:
                raise VideoError(f"{shown(self.info.path)}: cannot decode frame {index} ({_why(e)})") from e
            if index < stop:
                raise VideoError(f"{shown(self.info.path)}: only {index} of {self.info.frames} frames decode "
                                 "(truncated or damaged?)")
        finally:
            container.close()

    def _images(self, start: int, stop: int) -> Iterator[np.ndarray]:
        from xpsr.data.images import ImageError, load_rgb

        for i in range(start, stop):
            try:
                yield self._checked(load_rgb(self.info.sequence[i])[0], i)
            except ImageError as e:
                raise VideoError(f"{shown(self.info.path)}: frame {i}: {e}") from e

    def _checked(self, frame: np.ndarray, index: int) -> np.ndarray:
        if frame.shape[:2] != (self.info.height, self.info.width):
            raise VideoError(f"{shown(self.info.path)}: frame {index} is {frame.shape[1]}x{frame.shape[0]} px, the "
                             f"clip started at {self.info.width}x{self.info.height}; resize it to one size first")
        return frame
