"""Video in, video out (xpsr/video): timestamps, audio, colour metadata, chunks and resume, bad clips.

Most tests replace the frame sampler with a nearest-neighbour upscale (the I/O is under test); the resume and
stability tests run the tiny random model on 32 px clips."""
import json
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import REPO, write_clip_without_frames

import xpsr.video.sampler as sampler_mod
from xpsr.config import InferConfig, load_config
from xpsr.video import chunks as ch
from xpsr.video.run import run_video
from xpsr.video.synthetic import panned_clip, write_clip

TINY = REPO / "configs" / "infer" / "tiny_cpu.yaml"


def _cfg(src, out, *extra):
    return load_config(InferConfig, TINY, [f"input={src}", f"output_dir={out}", "upscale=2", *extra])


def _frames(n=8, size=(32, 32)):
    return panned_clip("astronaut", n, size, 2)[0]


def _decoded(path):
    with av.open(str(path)) as c:
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


@pytest.fixture
def nearest(monkeypatch):
    """The sampler replaced by a nearest-neighbour upscale plus the frame index (so frames differ)."""
    calls = []

    def fake(self, index, lr):
        calls.append(index)
        up = np.repeat(np.repeat(lr, self.cfg.upscale, 0), self.cfg.upscale, 1)
        return up // 2 + (index % 8) * 8

    monkeypatch.setattr(sampler_mod.FrameSampler, "__init__", lambda self, modules, cfg, *a: setattr(self, "cfg", cfg))
    monkeypatch.setattr(sampler_mod.FrameSampler, "__call__", fake)
    monkeypatch.setattr(sampler_mod.FrameSampler, "state", lambda self: {"field0": torch.zeros(1)})
    monkeypatch.setattr(sampler_mod.FrameSampler, "restore", lambda self, state: None)
    return calls


def test_clip_keeps_timestamps_audio_and_colour(tmp_path, nearest):
    pts = [0, 1, 2, 4, 5, 7, 8, 9]  # variable frame rate: gaps at 3 and 6
    src = tmp_path / "in"
    src.mkdir()
    write_clip(src / "a.mp4", _frames(), pts=pts, audio_seconds=0.4,
               colour={"color_primaries": 1, "color_trc": 1, "colorspace": 1})
    write_clip(src / "b.mov", _frames(4))
    report = run_video(_cfg(src, tmp_path / "out", "video.chunk_frames=3"), modules=object())
    assert report["done"] == 2 and not report["errors"]
    frames = _decoded(tmp_path / "out" / "a.mp4")
    assert [t for t, _ in frames] == [p / 25 for p in pts] and frames[0][1].shape == (64, 64, 3)
    with av.open(str(tmp_path / "out" / "a.mp4")) as out, av.open(str(src / "a.mp4")) as inp:
        assert out.streams.video[0].codec_context.color_primaries == 1
        count = [sum(p.dts is not None for p in c.demux(audio=0)) for c in (out, inp)]
        assert count[0] == count[1] > 0  # every audio packet copied
        assert out.streams.audio[0].codec_context.name == "aac"
    assert len(_decoded(tmp_path / "out" / "b.mov")) == 4
    clip = json.loads((tmp_path / "out" / "a.video_report.json").read_text())
    assert clip["frames"] == 8 and clip["chunks"] == 3 and clip["variable_frame_rate"] and clip["seed"] == 0
    assert clip["kept"]["audio_streams"] == 1 and clip["settings"]["video"]["stability"] == "flow"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]  # work folders removed


def test_image_sequence_to_png_frames_and_10_bit_video(tmp_path, nearest):
    from PIL import Image

    seq = tmp_path / "seq"
    seq.mkdir()
    for i, f in enumerate(_frames(5)):
        Image.fromarray(f).save(seq / f"f{i:03d}.png")
    run_video(_cfg(seq, tmp_path / "o1", "video.image_sequence=true", "video.codec=png"), modules=object())
    assert sorted(p.name for p in (tmp_path / "o1" / "seq_frames").iterdir()) == [ch.frame_name(i) for i in range(5)]
    assert not (tmp_path / "o1" / "seq.mp4").exists()
    run_video(_cfg(seq, tmp_path / "o2", "video.image_sequence=true", "video.sequence_fps=12.5", "video.bit_depth=10",
                   "video.codec=libx265"), modules=object())
    with av.open(str(tmp_path / "o2" / "seq.mp4")) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p10le"
        assert [float(f.time) for f in c.decode(video=0)] == [i / 12.5 for i in range(5)]


def _truncated(path, tmp_path):
    write_clip(tmp_path / "whole.mp4", _frames())
    data = (tmp_path / "whole.mp4").read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _truncated_faststart(path, tmp_path):
    """Index first: the cut file opens, and its header counts frames that are not there."""
    write_clip(tmp_path / "whole.mp4", _frames(), faststart=True)
    data = (tmp_path / "whole.mp4").read_bytes()
    path.write_bytes(data[:int(len(data) * 0.7)])


def _audio_only(path, tmp_path):
    c = av.open(str(path), "w")
    s = c.add_stream("aac", rate=8000, layout="mono")
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 8000, 0
    for p in [*s.encode(frame), *s.encode()]:
        c.mux(p)
    c.close()


def _no_frames(path, tmp_path):
    write_clip_without_frames(path)


@pytest.mark.parametrize("make,expected", [
    (_truncated, "not a readable video"), (_truncated_faststart, "truncated, "),
    (_audio_only, "has no video stream"), (_no_frames, "zero-length clip"),
    (lambda p, t: p.write_bytes(b""), "not a readable video"),
    (lambda p, t: p.write_bytes(b"not a video at all" * 10), "not a readable video"),
    (lambda p, t: write_clip(p, _frames(2, (64, 64))), "max_output_pixels=4,096")])
def test_bad_clips_get_one_line_and_no_output(tmp_path, nearest, capsys, make, expected):
    src = tmp_path / "in"
    src.mkdir()
    make(src / "bad.mp4", tmp_path)
    write_clip(src / "good.mp4", _frames(3))
    report = run_video(_cfg(src, tmp_path / "out", "max_output_pixels=4096"), modules=object())
    assert report["done"] == 1 and len(report["errors"]) == 1
    error = report["errors"][0]["error"]
    assert expected in error and "bad.mp4" in error and "\n" not in error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.mp4", "good.video_report.json",
                                                                    "video_report.json"]


def test_chunks_shared_between_processes_and_resumed(tmp_path, nearest):
    """A chunk claimed by another process is left to it; its owner's death (the claim released, the
    chunk's .partial left) makes the next run do it, continuing from the state chunk 0 saved; the output
    equals an uninterrupted run's. Chunk 2, whose predecessor was not done, started from its warm-up."""
    from xpsr.inference.claims import release_claim, try_claim

    write_clip(tmp_path / "c.mp4", _frames(7))
    run_video(_cfg(tmp_path / "c.mp4", tmp_path / "ref", "video.chunk_frames=3"), modules=object())
    out = tmp_path / "out"
    work = ch.work_folder(out, "c.mp4")
    work.mkdir(parents=True)
    (work / "chunk-00001.partial").mkdir()  # a killed process's half chunk
    claim = try_claim(work / "chunk-00001")
    report = run_video(_cfg(tmp_path / "c.mp4", out, "video.chunk_frames=3"), modules=object())
    assert report["done"] == 0 and report["left_to_other_processes"] == 1  # chunk 1 is held elsewhere
    assert not (out / "c.mp4").exists()
    assert ch.done(work, ch.Chunk(0, 0, 3, 0)) and not ch.done(work, ch.Chunk(1, 3, 6, 1))
    release_claim(claim, work / "chunk-00001")
    nearest.clear()
    run_video(_cfg(tmp_path / "c.mp4", out, "video.chunk_frames=3"), modules=object())
    assert nearest == [3, 4, 5]  # only chunk 1, from chunk 0's saved state
    assert (out / "c.mp4").read_bytes() == (tmp_path / "ref" / "c.mp4").read_bytes()


@pytest.fixture(scope="module")
def tiny_modules():
    from xpsr.video.run import load_ready_modules

    cfg = load_config(InferConfig, TINY, ["input=x", "output_dir=y"])
    return load_ready_modules(cfg, torch.device("cpu"))


def test_resumed_run_gives_the_bytes_of_an_uninterrupted_one(tmp_path, tiny_modules, monkeypatch):
    """Chunks of 2 frames, killed in chunk 1 and rerun: the bytes of a run in one chunk (flow noise, DDPM)."""
    write_clip(tmp_path / "c.mp4", _frames(5))
    cfg = _cfg(tmp_path / "c.mp4", tmp_path / "ref", "video.chunk_frames=16", "num_inference_steps=2",
               "scheduler=ddpm")
    run_video(cfg, modules=tiny_modules)
    real = ch.save_chunk

    def dies_at_chunk_1(work, chunk, frames, state):
        if chunk.index == 1:
            next(frames)
            raise KeyboardInterrupt  # as a kill in the middle of chunk 1
        real(work, chunk, frames, state)

    monkeypatch.setattr(ch, "save_chunk", dies_at_chunk_1)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_video(load_config(InferConfig, TINY, [*_args(cfg), f"output_dir={out}"]), modules=tiny_modules)
    monkeypatch.setattr(ch, "save_chunk", real)
    run_video(load_config(InferConfig, TINY, [*_args(cfg), f"output_dir={out}"]), modules=tiny_modules)
    assert (out / "c.mp4").read_bytes() == (tmp_path / "ref" / "c.mp4").read_bytes()


def _args(cfg):
    return [f"input={cfg.input}", "upscale=2", "video.chunk_frames=2", "num_inference_steps=2", "scheduler=ddpm"]


def test_flow_noise_is_far_steadier_than_independent_noise(tiny_modules):
    """The panned clip (exact motion): temporal error of flow-warped noise vs fresh noise per frame. Measured
    on this tiny random model with these settings: MAD 0.30x the baseline's (64.0 vs 19.1); the test asks for
    below 0.5x. The demo prior's numbers are in docs/video.md."""
    from xpsr.video.stability import run_method, temporal_error

    cfg = load_config(InferConfig, TINY, ["input=x", "output_dir=y", "num_inference_steps=2"])  # x4
    lr = panned_clip("astronaut", 5, (32, 32), 2)[0]  # 2 LR px = 8 px at x4 = one latent of the 8x VAE
    errors = {s: temporal_error(run_method(tiny_modules, cfg, lr, s)[0], 8)["mad"] for s in ("independent", "flow")}
    assert errors["flow"] < 0.5 * errors["independent"], errors


def test_warped_noise_stays_white_gaussian():
    from xpsr.video.motion import Motion, warp_noise

    g = torch.Generator().manual_seed(0)
    prev, fresh = torch.randn((1, 4, 32, 32), generator=g), torch.randn((1, 4, 32, 32), generator=g)
    flow = np.zeros((32, 32, 2), np.float32)
    flow[..., 0] = np.linspace(-3, 3, 32)[None, :]  # a zoom: neighbours converge on the same source
    warped = warp_noise(prev, Motion(flow, np.ones((32, 32), bool), (32, 32)), fresh)
    values = warped.flatten()
    assert abs(float(values.std()) - 1) < 0.05 and abs(float(values.mean())) < 0.05
    per_channel = warped[0].reshape(4, -1)
    assert all(len(torch.unique(c)) == c.numel() for c in per_channel)  # no sample used twice
    shift = np.zeros((32, 32, 2), np.float32)
    shift[..., 0] = -1  # content moved right by one latent: each latent takes its left neighbour's sample
    moved = warp_noise(prev, Motion(shift, np.ones((32, 32), bool), (32, 32)), fresh)
    assert torch.equal(moved[..., 1:], prev[..., :-1]) and torch.equal(moved[..., 0], fresh[..., 0])


def test_write_clip_variable_rate_round_trip(tmp_path):
    write_clip(tmp_path / "v.mkv", _frames(3), pts=[0, 3, 4], time_base=Fraction(1, 10), codec="ffv1")
    assert [t for t, _ in _decoded(tmp_path / "v.mkv")] == [0.0, 0.3, 0.4]


def test_pipeline_helper_takes_the_cli_path_and_the_app_gets_previews(tmp_path, tiny_modules):
    from xpsr.inference.diffusers_pipeline import XPSRPipeline
    from xpsr.video.api import super_resolve_clip_for_app

    write_clip(tmp_path / "c.mp4", _frames(3))
    cfg = _cfg(tmp_path / "c.mp4", tmp_path / "cli", "num_inference_steps=1")
    run_video(cfg, modules=tiny_modules)
    pipe = XPSRPipeline.from_modules(tiny_modules)
    report = pipe.super_resolve_video(tmp_path / "c.mp4", tmp_path / "pipe", upscale=2, num_inference_steps=1,
                                      scheduler="ddim", process_size=64, video={"chunk_frames": 16})
    assert report["outputs"] == [str(tmp_path / "pipe" / "c.mp4")]
    assert (tmp_path / "pipe" / "c.mp4").read_bytes() == (tmp_path / "cli" / "c.mp4").read_bytes()
    shown = super_resolve_clip_for_app(tiny_modules, tmp_path / "c.mp4", tmp_path / "app", cfg, max_frames=2)
    assert shown["frames"] == 2 and shown["preview_frames"] == [0, 1]
    assert [tuple(x.shape) for x in shown["previews"][0]] == [(64, 64, 3), (64, 64, 3)]


def test_xpsr_infer_hands_clips_to_the_video_path_and_images_not(tmp_path, monkeypatch):
    import xpsr.video.run as video_run
    from xpsr.inference.run import run_inference
    from xpsr.video.run import is_video_input

    write_clip(tmp_path / "c.mov", _frames(2))
    seen = []
    monkeypatch.setattr(video_run, "run_video", lambda cfg: seen.append(cfg.input) or {"errors": [], "done": 1})
    assert run_inference(_cfg(tmp_path / "c.mov", tmp_path / "out"))["done"] == 1 and seen == [str(tmp_path / "c.mov")]
    (tmp_path / "imgs").mkdir()
    assert not is_video_input(_cfg(tmp_path / "imgs", tmp_path / "o"))
    assert is_video_input(_cfg(tmp_path / "imgs", tmp_path / "o", "video.image_sequence=true"))
    assert is_video_input(_cfg(tmp_path, tmp_path / "o2"))  # a folder holding a clip
