"""Schema of video super-resolution, the ``video`` section of `xpsr infer` (docs/video.md).

A video input (a video file, a folder holding video files, or a folder of frames with
``video.image_sequence=true``) goes through xpsr/video instead of the image loop; every other `xpsr infer`
key (model, sampler, prompts, size limits per frame) applies to each frame as it does to an image.
"""
from __future__ import annotations

from dataclasses import dataclass

from xpsr.config.rules import TIMESTEP, choice, doc

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
# the video encoders of PyAV's bundled FFmpeg (av 18) we offer; `png` = PNG frames only, no video file
CODECS = ("libx264", "libx265", "libsvtav1", "libvpx-vp9", "ffv1", "png")
STABILITY = ("independent", "same", "flow", "carry")
# encoders of `prepare`'s video training data: those whose output is the same bytes run after run at any frame
# size here (libx265 is not: below ~128 px its frames differ between identical runs, measured with av 18.1)
TRAINING_CODECS = ("libx264", "libvpx-vp9", "libsvtav1")


@dataclass
class VideoConfig:
    """How a clip is read, stabilised over time, split into chunks and written."""

    stability: str = choice("flow", STABILITY,
                            "noise over time. independent: fresh noise every frame (flickers; the baseline); same: "
                            "one noise field for every frame; flow: the noise moves with the content along optical "
                            "flow (nearest-pixel moves, fresh noise where content appears), so it stays Gaussian; "
                            "carry: flow noise, and each frame starts from the previous SR frame warped along "
                            "the flow, noised to carry_timestep (SDEdit)")
    carry_timestep: int = doc(500, "stability=carry: timestep the warped previous result is noised to; lower = "
                                   "steadier, higher = closer to a per-frame result", **TIMESTEP)
    flow_preset: str = choice("medium", ("ultrafast", "fast", "medium"), "OpenCV DIS optical-flow preset")
    flow_check: float = doc(1.0, "forward-backward flow check in LR px: a pixel whose round trip misses by more "
                                 "is treated as newly visible (fresh noise, nothing carried)", above=0)
    chunk_frames: int = doc(16, "frames per chunk: the unit of resume after a kill and of work shared by several "
                                "processes", min=1)
    chunk_overlap: int = doc(2, "stability=flow|carry: a chunk whose predecessor is not finished yet (another "
                                "process has it) starts this many frames early (not kept) to warm its noise up "
                                "along the motion; a chunk after a finished one continues from its saved state",
                             min=0)
    codec: str = choice("libx264", CODECS, "output encoder of PyAV's bundled FFmpeg; png = PNG frames only")
    crf: int = doc(18, "constant-rate-factor quality of libx264/libx265 (0-51) and libsvtav1 (0-63); lower = "
                       "better and bigger", min=0, max=63)
    preset: str = doc("medium", "encoder speed preset of libx264/libx265 (ultrafast ... veryslow); libsvtav1 takes "
                                "0-13 (a name leaves its default)", nonempty=True)
    bit_depth: int = doc(8, "8, or 10 (yuv420p10le: libx264, libx265, libsvtav1; ffv1 keeps 16 bits); "
                            "libvpx-vp9 and png are 8-bit here", min=8, max=10)
    container: str = choice("same", ("same", "mp4", "mkv", "mov"), "output container; same = the input's "
                                                                    "(mkv when the input's cannot hold the codec)")
    frames: bool = doc(False, "also keep every SR frame as PNG in OUTPUT_DIR/NAME_frames/")
    copy_audio: bool = doc(True, "copy the input's audio streams into the output (packets, not re-encoded)")
    image_sequence: bool = doc(False, "input is a folder of frames (images sorted by name) that form one clip")
    sequence_fps: float = doc(24.0, "image_sequence=true: frame rate of the clip", above=0)
    max_frames: int = doc(0, "only the first N frames of each clip (previews); 0 = all", min=0)

    def validate(self) -> list[tuple[str, str]]:
        if self.bit_depth not in (8, 10):
            return [("bit_depth", "must be 8 or 10")]
        if self.bit_depth == 10 and self.codec in ("libvpx-vp9", "png"):
            return [("bit_depth", f"10-bit output needs codec=libx264, libx265, libsvtav1 or ffv1 (not {self.codec})")]
        return []


@dataclass
class VideoPrepareConfig:
    """The ``video`` section of `xpsr prepare`: LR/HR clips from videos for video fine-tuning (docs/video.md)."""

    clips: bool = doc(False, "inputs are videos: make clips of clip_frames frames, each with one crop and one "
                             "degradation draw for all its frames, then a real video codec (docs/video.md)")
    clip_frames: int = doc(8, "consecutive frames per clip", min=1)
    frame_step: int = doc(1, "keep every N-th frame of the video in a clip (N > 1: more motion between frames)",
                          min=1)
    clips_per_video: int = doc(0, "clips cut from each video, back to back from its first frame; 0 = every whole "
                                  "clip it holds", min=0)
    image_sequences: bool = doc(False, "also read every folder that directly holds images as one video (its "
                                       "frames sorted by name)")
    codecs: list[str] = doc(["libx264"], "video encoders of PyAV's FFmpeg; each clip draws one of them",
                            nonempty=True, each_of=TRAINING_CODECS)
    crf_range: list[int] = doc([18, 38], "constant-rate-factor range [low, high]; each clip draws an integer in "
                                         "it (higher = stronger compression artefacts)", ordered=True, min=0, max=51)
    frame_rate: float = doc(25.0, "frame rate the LR clip is encoded at (it steers the encoders' rate control)",
                            above=0)
    noise_per_frame: bool = doc(True, "fresh noise samples on every frame, at the clip's one noise kind and "
                                      "level (as a sensor's noise); false = the same noise field on every frame")
