"""`xpsr serve` with a short clip (issue 19 §4): the engine super-resolves the first ``max_video_frames`` frames
through the video code, with before/after previews; bad uploads get one line; the page's named API endpoint
returns the clip. The model is the tiny random one on CPU, one step."""
from __future__ import annotations

import os

import av
import numpy as np
import pytest
from conftest import REPO, served_client

from xpsr.config import ServeConfig, load_config
from xpsr.video.synthetic import write_clip

TINY = REPO / "configs" / "serve" / "tiny_cpu.yaml"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def _clip(path, frames=4, size=16):
    """An MP4 at ``path`` (any name: a server keeps uploads under names of its own)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    write_clip(path.with_name("tmp.mp4"), [np.roll(base, i, axis=1) for i in range(frames)])
    return path.with_name("tmp.mp4").replace(path)


def _sizes(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24").shape for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from xpsr.apps.serve.engine import Engine

    out = tmp_path_factory.mktemp("serve_video")
    return Engine(load_config(ServeConfig, TINY, [f"output_dir={out / 'results'}", "max_video_frames=3"]),
                  out / "results")


def _controls(upscale=2):
    from xpsr.apps.serve.engine import Controls

    return Controls(steps=1, guidance=4.5, seed=0, color_fix="adain", upscale=upscale, tiled=True, tile_px=512)


def test_a_clip_is_super_resolved_with_previews_and_a_frame_cap(engine, tmp_path):
    clip = _clip(tmp_path / "upload", frames=4)  # a server-side name without suffix: the upload's name counts
    result = engine.run_video(clip, "my clip.mp4", "", "", _controls(upscale=2))
    assert result.output.is_file() and result.output.suffix == ".mp4"
    assert result.output.is_relative_to(engine.output_dir) and result.output.name == "my_clip.mp4"
    assert _sizes(result.output) == [(32, 32, 3)] * 3  # x2, and only the first max_video_frames=3 of 4 frames
    assert (result.frames, result.total_frames) == (3, 4)
    assert any("only the first 3 of 4 frames" in n for n in result.notes)
    assert result.prompts["quality"]  # the heuristic filled the empty quality prompt
    assert [i for i, _, _ in result.previews] == [0, 1, 2]
    for _, before, after in result.previews:
        assert before.shape == after.shape == (32, 32, 3) and before.dtype == after.dtype == np.uint8
    assert not list(result.output.parent.glob("upload/*"))  # the copy of the upload is not kept


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"hello", "notes.txt: not a video this app can read (.mp4"),
    ("garbage.mp4", bytes(range(256)) * 40, "garbage.mp4: not a readable video"),
    ("empty.mov", b"", "empty.mov: the file is empty"),
])
def test_a_bad_upload_gets_one_line_naming_it(engine, tmp_path, name, content, message):
    from xpsr.apps.serve.engine import RequestError

    path = tmp_path / "upload.bin"
    path.write_bytes(content)
    with pytest.raises(RequestError) as info:
        engine.run_video(path, name, "", "", _controls())
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text and str(engine.output_dir) not in text


def test_a_frame_over_the_size_limits_is_refused(engine, tmp_path, monkeypatch):
    import dataclasses

    from xpsr.apps.serve.engine import RequestError

    monkeypatch.setattr(engine, "cfg", dataclasses.replace(engine.cfg, max_output_pixels=64 * 64))
    clip = _clip(tmp_path / "upload", frames=1, size=48)
    with pytest.raises(RequestError, match="^big.mp4: .*max_output_pixels=4,096"):
        engine.run_video(clip, "big.mp4", "", "q", _controls(upscale=2))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The tiny CPU app served in this process on a free port, and a gradio_client on it."""
    with served_client(tmp_path_factory.mktemp("serve_video_api"), "max_video_frames=2") as c:
        yield c


def test_the_video_endpoint_returns_the_clip_and_its_frames(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/super_resolve_video"]
    assert [p["parameter_name"] for p in api["parameters"]] == [
        "video", "content_prompt", "quality_prompt", "steps", "guidance", "seed", "color_fix", "upscale", "tiled",
        "tile_px"]
    assert [r["label"] for r in api["returns"]] == ["Super-resolved clip", "Before | after frames", "Video run info"]
    values = dict(content_prompt="", quality_prompt="q", steps=1, guidance=4.5, seed=0, color_fix="adain",
                  upscale=2, tiled=True, tile_px=512)
    video, frames, info = client.predict(video=handle_file(str(_clip(tmp_path / "c.mp4", frames=3))), **values,
                                         api_name="/super_resolve_video")
    path = video["video"] if isinstance(video, dict) else video
    assert _sizes(path) == [(32, 32, 3)] * 2 and len(frames) == 2
    assert "2 of 3 frames" in info
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(AppError) as error:
        client.predict(video=handle_file(str(bad)), **values, api_name="/super_resolve_video")
    assert "bad.mp4: not a readable video" in str(error.value) and "Traceback" not in str(error.value)
