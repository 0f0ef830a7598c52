"""`xpsr prepare` with video.clips=true: one degradation per clip, a real codec, determinism, resume, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_clip_without_frames
from PIL import Image

from xpsr.config import DatasetConfig, PrepareConfig, load_config
from xpsr.config.video import TRAINING_CODECS
from xpsr.data.manifest import read_manifest
from xpsr.video import training_data
from xpsr.video.roundtrip import codec_roundtrip
from xpsr.video.source import Clip
from xpsr.video.synthetic import photo, write_clip
from xpsr.video.training_data import degrade_frames, draw_clip, prepare_clips
from xpsr.video.training_inputs import plan_clips

CROP = 32  # HR crop; LR frames 8x8 at x4


def pan(path: Path, frames: int = 8, size: tuple[int, int] = (48, 40), name: str = "astronaut") -> Path:
    """A clip panning over a photo by 2 px per frame."""
    w, h = size
    wide = photo(name, w + 2 * frames, h)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_clip(path, [wide[:, 2 * i:2 * i + w] for i in range(frames)])


def config(inputs, out, *overrides) -> PrepareConfig:
    args = [f"inputs=[{','.join(str(i) for i in inputs)}]", f"output_dir={out}", f"crop_size={CROP}",
            "video.clips=true", "video.clip_frames=4", *overrides]
    return load_config(PrepareConfig, REPO / "configs" / "data" / "xpsr.yaml", args)


def files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.suffix in (".png", ".jsonl")}


def by_clip(records: list[dict]) -> dict[str, list[dict]]:
    clips: dict[str, list[dict]] = {}
    for r in records:
        clips.setdefault(r["clip_id"], []).append(r)
    return clips


def without_noise_seeds(params: dict) -> dict:
    params = json.loads(json.dumps(params))
    params.pop("noise_seed")
    for stage in (params["stage1"], params["stage2"]):
        if stage is not None:
            stage["noise"].pop("gray_seed", None)
    return params


def test_a_clip_shares_one_crop_and_draw_and_clips_differ(tmp_path):
    src = pan(tmp_path / "src" / "pan.mp4", frames=8)
    stats = prepare_clips(config([src], tmp_path / "out", "variants=3"))
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    clips = by_clip(records)
    assert stats["clips_made"] == len(clips) == 6 and stats["frames_made"] == len(records) == 24  # 2 windows x 3
    keys = set()
    for rows in clips.values():
        assert [r["frame_index"] for r in rows] == [0, 1, 2, 3] and len({r["draw_key"] for r in rows}) == 1
        assert all(without_noise_seeds(r["degradation"]) == without_noise_seeds(rows[0]["degradation"]) for r in rows)
        assert len({r["degradation"]["noise_seed"] for r in rows}) == 4  # noise_per_frame: fresh samples
        assert len({json.dumps(r["crop_box"]) for r in rows}) == 1 and len({r["quality"] for r in rows}) == 1
        keys.add(rows[0]["draw_key"])
        for r in rows:
            assert Image.open(tmp_path / "out" / r["hr"]).size == (CROP, CROP)
            assert Image.open(tmp_path / "out" / r["lr"]).size == (CROP // 4, CROP // 4)
    assert len(keys) == 6
    assert [r["source_frame"] for r in clips[records[-1]["clip_id"]]] == [4, 5, 6, 7]


def test_a_static_clip_differs_over_time_only_by_its_noise(tmp_path):
    frame = photo("chelsea", 48, 40)
    (tmp_path / "src").mkdir()
    src = write_clip(tmp_path / "src" / "still.mkv", [frame] * 4, codec="ffv1", options={})  # lossless: equal frames
    no_noise = ["degradation.stage1.gaussian_noise_prob=1", "degradation.stage2.gaussian_noise_prob=1",
                "degradation.stage1.noise_range=[0,0]", "degradation.stage2.noise_range=[0,0]"]
    for overrides, equal in (([], False), (["video.noise_per_frame=false"], True), (no_noise, True)):
        cfg = config([src], tmp_path / "out", *overrides)
        (job,), _ = plan_clips(cfg, set(), [])
        frames = list(Clip(job.info).frames(0, 4))
        hrs, pre_codec, _ = degrade_frames(cfg, draw_clip(cfg, job), frames)
        assert all(np.array_equal(hrs[0], h) for h in hrs)
        assert all(np.array_equal(pre_codec[0], f) for f in pre_codec[1:]) == equal, overrides


def test_the_codec_really_runs_at_a_quality_drawn_per_clip(tmp_path):
    src = pan(tmp_path / "src" / "pan.mp4", frames=8)
    cfg = config([src], tmp_path / "out", "variants=4", "video.crf_range=[20,45]",
                 "video.codecs=[libx264,libvpx-vp9,libsvtav1]")
    prepare_clips(cfg)
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    firsts = [rows[0] for rows in by_clip(records).values()]
    assert all(20 <= r["quality"] <= 45 and r["quality_kind"] == "crf" for r in firsts)
    assert len({r["quality"] for r in firsts}) > 1 and len({r["codec"] for r in firsts}) > 1
    jobs, _ = plan_clips(cfg, set(), [])
    for job in jobs[:3]:
        frames = list(Clip(job.info).frames(job.frames[0], job.frames[-1] + 1))
        hrs, pre_codec, _ = degrade_frames(cfg, draw_clip(cfg, job), frames)
        saved = [np.asarray(Image.open(tmp_path / "out" / "lr" / job.clip_id / f"{i:04d}.png")) for i in range(4)]
        saved_hr = [np.asarray(Image.open(tmp_path / "out" / "hr" / job.clip_id / f"{i:04d}.png")) for i in range(4)]
        assert all(np.array_equal(a, b) for a, b in zip(hrs, saved_hr))
        assert any(not np.array_equal(a, b) for a, b in zip(pre_codec, saved))  # the codec changed the LR frames
    # and its quality setting is real: a high CRF departs further from the frames it was given than a low one
    clean = [photo("coffee", 64, 48)[:, i:i + 48] for i in range(4)]
    errors = [np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(clean, codec_roundtrip(clean, "libx264",
                                                                                                  crf)[0])])
              for crf in (5, 45)]
    assert errors[0] < errors[1]


def test_same_seed_same_bytes_any_worker_count_and_another_seed_differs(tmp_path):
    src = pan(tmp_path / "src" / "pan.mp4", frames=4)
    codecs = "video.codecs=[libx264,libvpx-vp9,libsvtav1]"
    for name, seed, workers in (("a", 0, 0), ("b", 0, 2), ("c", 1, 0)):
        prepare_clips(config([src], tmp_path / name, codecs, "variants=3", f"seed={seed}", f"workers={workers}"))
    a, b, c = (files(tmp_path / n) for n in "abc")
    assert a == b and a.keys() == c.keys() and any(a[k] != c[k] for k in a if k.startswith("lr/"))
    # every offered encoder gives the same frames run after run, odd sizes (padded for 4:2:0) included
    rng = np.random.default_rng(0)
    for size in ((8, 8), (7, 9)):
        clip = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(4)]
        for codec in TRAINING_CODECS:
            first, second = codec_roundtrip(clip, codec, 30)[0], codec_roundtrip(clip, codec, 30)[0]
            assert first[0].shape == (*size, 3) and all(np.array_equal(x, y) for x, y in zip(first, second)), codec


def test_an_interrupted_clip_is_remade_with_the_same_bytes(tmp_path, monkeypatch):
    src = pan(tmp_path / "src" / "pan.mp4", frames=8)
    prepare_clips(config([src], tmp_path / "whole", "variants=2"))
    real_save, calls = training_data.save_png_atomic, []

    def dying_save(img, path):  # killed while writing the 3rd clip's LR frames
        calls.append(path)
        if len(calls) == 2 * 8 + 6:
            raise KeyboardInterrupt
        real_save(img, path)

    monkeypatch.setattr(training_data, "save_png_atomic", dying_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_clips(config([src], tmp_path / "cut", "variants=2"))
    monkeypatch.setattr(training_data, "save_png_atomic", real_save)
    assert len(by_clip(read_manifest(tmp_path / "cut" / "manifest.jsonl"))) == 2
    assert not list((tmp_path / "cut").rglob(".tmp-*"))  # no half-written clip left under any name
    # and a run killed after a clip's folders were renamed but before all its lines were written
    lines = (tmp_path / "whole" / "manifest.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "whole" / "manifest.jsonl").write_text("".join(lines[:-2]) + lines[-2][:30])
    (tmp_path / "whole" / "hr" / ".tmp-leftover").mkdir()
    again = prepare_clips(config([src], tmp_path / "cut", "variants=2"))
    assert again["clips_made"] == 2 and again["clips_skipped_as_done"] == 2
    with pytest.warns(UserWarning, match="torn line"):
        torn = prepare_clips(config([src], tmp_path / "whole", "variants=2"))
    assert torn["clips_made"] == 1 and torn["frames_made"] == 2
    assert not (tmp_path / "whole" / "hr" / ".tmp-leftover").exists()
    assert files(tmp_path / "cut") == files(tmp_path / "whole")
    assert prepare_clips(config([src], tmp_path / "cut", "variants=2"))["clips_made"] == 0


def test_bad_inputs_are_one_line_each_and_the_rest_goes_on(tmp_path, capsys):
    src = tmp_path / "src"
    pan(src / "good.mp4", frames=4)
    pan(src / "short.mp4", frames=2)
    pan(src / "small.mp4", frames=4, size=(24, 24))
    (src / "garbage.mp4").write_bytes(b"this is not a video")
    (src / "empty.mkv").write_bytes(b"")
    write_clip_without_frames(src / "zero.mkv")
    data = write_clip(src / "cut.mp4", [photo("rocket", 48, 40)] * 8, faststart=True).read_bytes()
    (src / "cut.mp4").write_bytes(data[:len(data) // 3])
    (tmp_path / "notes.txt").write_text("hello")
    frames = src / "frames"
    frames.mkdir()
    for i in range(4):
        Image.fromarray(photo("coffee", 48 + 2 * i, 40)[:, 2 * i:]).save(frames / f"{i:03d}.png")
    stats = prepare_clips(config([src, tmp_path / "notes.txt"], tmp_path / "out", "video.image_sequences=true"))
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = {Path(e["source"]).name: e["reason"] for e in report["entries"] if e["decision"] == "skipped"}
    assert set(skipped) == {"short.mp4", "small.mp4", "garbage.mp4", "empty.mkv", "zero.mkv", "cut.mp4",
                            "notes.txt"}
    assert stats["inputs_skipped"] == 7 and stats["clips_made"] == 2  # good.mp4 and the frame folder
    assert "shorter than one clip" in skipped["short.mp4"] and "smaller than the 32px crop" in skipped["small.mp4"]
    assert "truncated" in skipped["cut.mp4"] and "no frames" in skipped["zero.mkv"]
    assert "not a readable video" in skipped["garbage.mp4"]
    assert "not a video file" in skipped["notes.txt"]
    for name, reason in skipped.items():
        assert name in reason and sum(name in line for line in err.splitlines() if "skipped" in line) == 1
    assert "Traceback" not in err


def test_the_image_training_dataset_reads_the_clips_and_the_cli_dispatches(tmp_path, capsys):
    from xpsr.cli import main
    from xpsr.training.dataset import PairedPromptDataset

    src = pan(tmp_path / "src" / "pan.mp4", frames=4)
    assert main(["prepare", "--config", "configs/data/video.yaml", f"inputs=[{src}]", f"output_dir={tmp_path / 'o'}",
                 f"crop_size={CROP}", "video.clip_frames=4"]) == 0
    data = PairedPromptDataset(tmp_path / "o", DatasetConfig(crop_size=CROP, missing_prompt="empty",
                                                             original_image_ratio=0.0))
    assert len(data) == 4
    sample = data[3]
    assert tuple(sample["hr"].shape) == (3, CROP, CROP) and sample["id"].endswith("-f0003")
    assert main(["prepare", f"inputs=[{src}]", f"output_dir={tmp_path / 'p'}", "video.clips=true",
                 "share_draws_every=2"]) == 1
    assert "share_draws_every" in capsys.readouterr().err
