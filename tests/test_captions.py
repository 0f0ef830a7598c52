"""Prompt cache, captioners and the caption runner."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from conftest import REPO

from xpsr.captions.cache import PromptCache, PromptRow
from xpsr.captions.captioners import PAPER_CONTENT_QUESTION, FixedCaptioner, MLLMCaptioner
from xpsr.captions.heuristic import measure
from xpsr.captions.run import caption_with_backoff, run_captioning
from xpsr.config import CaptionConfig, load_config
from xpsr.data.images import file_hash, save_png_atomic


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from xpsr.captions.tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


def _images(folder, n, size=24, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        save_png_atomic(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8), folder / f"im{i:03d}.png")
    return folder


def _cfg(**kw):
    return load_config(CaptionConfig, None, [f"{k}={v}" for k, v in kw.items()])


def test_tiny_llava_runs_end_to_end_into_the_cache(tmp_path, tiny_llava):
    images = _images(tmp_path / "lr", 5)
    cfg = _cfg(images=images, cache=tmp_path / "p.sqlite", kind="content", captioner="llava", model=tiny_llava,
               max_new_tokens=6, batch_size=2, dtype="fp32", device="cpu")
    stats = run_captioning(cfg)
    assert stats["captioned"] == 5
    with PromptCache(tmp_path / "p.sqlite") as cache:
        rows = list(cache.rows())
        assert len(rows) == 5 and {r.kind for r in rows} == {"content"}
        assert rows[0].captioner == f"llava:{tiny_llava}" and rows[0].question == PAPER_CONTENT_QUESTION
        assert all("USER" not in r.text and "ASSISTANT" not in r.text for r in rows)  # template stripped
        assert cache.lookup(file_hash(images / "im000.png"), "content") is not None
    assert run_captioning(cfg)["captioned"] == 0  # resumable: nothing left to do


def test_mllm_batched_equals_one_by_one(tiny_llava):
    cap = MLLMCaptioner(str(tiny_llava), "describe", max_new_tokens=5, dtype="fp32")
    imgs = [np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8) for i in range(3)]
    assert cap.caption(imgs) == [cap.caption([im])[0] for im in imgs]


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load the captioning model"):
        MLLMCaptioner(str(tmp_path / "nothing"), "q")


def test_remote_code_is_passed_only_when_asked(monkeypatch):
    import xpsr.captions.run as run_mod

    seen = []
    monkeypatch.setattr(run_mod, "MLLMCaptioner", lambda *a, **kw: seen.append(kw["trust_remote_code"]))
    for flag in ("false", "true"):
        run_mod.make_captioner(_cfg(images="x", cache="y", captioner="quality", trust_remote_code=flag), "cpu")
    default = load_config(CaptionConfig, REPO / "configs" / "caption" / "llava_quality.yaml", allow_missing=True)
    assert seen == [False, True] and default.trust_remote_code is False


def test_heuristic_orders_images_by_blur_and_noise():
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), (128, 128), interpolation=cv2.INTER_CUBIC)
    base = cv2.addWeighted(base, 0.5, rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), 0.5, 0)
    blurs = [measure(cv2.GaussianBlur(base, (0, 0), s))["sharpness"] for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(blurs, blurs[1:])), blurs
    smooth = cv2.GaussianBlur(base, (0, 0), 3)
    noises = [measure(np.clip(smooth + rng.normal(0, s, smooth.shape), 0, 255).astype(np.uint8))["noise"]
              for s in (0, 5, 10, 20)]
    assert all(a < b for a, b in zip(noises, noises[1:])), noises
    ok, buf = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 10])
    assert measure(cv2.imdecode(buf, cv2.IMREAD_COLOR))["blockiness"] > measure(smooth)["blockiness"]


def test_heuristic_and_fixed_captioners_through_the_runner(tmp_path):
    images = _images(tmp_path / "lr", 4, size=40)
    run_captioning(_cfg(images=images, cache=tmp_path / "p.sqlite", kind="quality", captioner="heuristic"))
    run_captioning(_cfg(images=images, cache=tmp_path / "p.sqlite", kind="content", captioner="empty"))
    with PromptCache(tmp_path / "p.sqlite") as cache:
        assert cache.count("quality") == 4 and cache.count("content") == 4
        texts = {r.kind: r.text for r in cache.rows()}
        assert texts["content"] == "" and "quality image" in texts["quality"]
    with pytest.raises(ValueError, match="heuristic"):
        run_captioning(_cfg(images=images, cache=tmp_path / "p.sqlite", kind="content", captioner="heuristic"))
    assert FixedCaptioner("a photo").caption([None, None]) == ["a photo", "a photo"]


def test_unreadable_images_are_skipped_not_fatal(tmp_path):
    images = _images(tmp_path / "lr", 2)
    (images / "zz_broken.png").write_bytes(b"broken")
    stats = run_captioning(_cfg(images=images, cache=tmp_path / "p.sqlite", captioner="heuristic"))
    assert stats["captioned"] == 2 and len(stats["skipped"]) == 1


def test_out_of_memory_halves_the_batch():
    class Picky:
        calls = []

        def caption(self, images):
            self.calls.append(len(images))
            if len(images) > 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
            return ["ok"] * len(images)

    texts, size = caption_with_backoff(Picky(), list(range(7)), 8)
    assert texts == ["ok"] * 7 and size == 2 and Picky.calls[:2] == [7, 4]

    class Broken:
        def caption(self, images):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        caption_with_backoff(Broken(), [1, 2], 2)


def test_export_import_round_trip_and_official_layout(tmp_path):
    with PromptCache(tmp_path / "a.sqlite") as cache:
        cache.put_many([PromptRow("h1", "content", "c", "q", "a cat"), PromptRow("h1", "quality", "c", "q", "blurry")])
        assert cache.export_jsonl(tmp_path / "x.jsonl") == 2
    with PromptCache(tmp_path / "b.sqlite") as cache:
        assert cache.import_jsonl(tmp_path / "x.jsonl") == 2
        assert cache.import_jsonl(tmp_path / "x.jsonl") == 0  # same keys: nothing duplicated
        assert cache.lookup("h1", "quality") == "blurry"
    root = tmp_path / "official"
    _images(root / "LR", 2)
    (root / "highlevel_prompt").mkdir()
    (root / "lowlevel_prompt_q").mkdir()
    (root / "highlevel_prompt" / "im000.txt").write_text("a dog on grass\n")
    (root / "lowlevel_prompt_q" / "im000.txt").write_text("noisy and soft")
    with PromptCache(tmp_path / "c.sqlite") as cache:
        assert cache.import_official(root / "LR") == 2
        h = file_hash(root / "LR" / "im000.png")
        assert cache.lookup(h, "content") == "a dog on grass" and cache.lookup(h, "quality") == "noisy and soft"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_hash": "x"}\n')
    with PromptCache(tmp_path / "d.sqlite") as cache, pytest.raises(ValueError, match="bad.jsonl:1"):
        cache.import_jsonl(bad)


def _caption_cmd(images, cache, *extra):
    return [sys.executable, str(REPO / "scripts" / "caption.py"), f"images={images}", f"cache={cache}",
            "captioner=heuristic", "batch_size=1", *extra]


def test_kill_9_mid_run_then_resume_gives_exactly_one_row_per_image(tmp_path):
    images = _images(tmp_path / "lr", 40, size=32)
    cache = tmp_path / "p.sqlite"
    proc = subprocess.Popen(_caption_cmd(images, cache, "pause_s=0.05"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    count = 0
    while time.time() < deadline:
        time.sleep(0.1)
        if cache.exists():
            try:
                count = sqlite3.connect(cache, timeout=5).execute("SELECT COUNT(*) FROM prompts").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= 5:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= count < 40, "the run should have been interrupted part-way"
    subprocess.run(_caption_cmd(images, cache), check=True, capture_output=True, timeout=300)
    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    per_image = db.execute("SELECT image_hash, COUNT(*) FROM prompts GROUP BY image_hash, kind").fetchall()
    assert len(per_image) == 40 and all(n == 1 for _, n in per_image)


def test_two_concurrent_writers(tmp_path):
    a, b = _images(tmp_path / "a", 30, seed=1), _images(tmp_path / "b", 30, seed=2)
    cache = tmp_path / "shared.sqlite"
    procs = [subprocess.Popen(_caption_cmd(folder, cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for folder in (a, b)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    with PromptCache(cache) as c:
        assert c.count("quality") == 60 and c.integrity_ok()


def test_two_process_launch_shards_without_overlap(tmp_path):
    """What `accelerate launch --num_processes 2 scripts/caption.py` does: two ranks, disjoint shards."""
    images = _images(tmp_path / "lr", 9)
    cache = tmp_path / "p.sqlite"
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    procs = [subprocess.Popen(_caption_cmd(images, cache, "device=cpu"), env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "caption [0/2]: 5 new" in outs[0] and "caption [1/2]: 4 new" in outs[1]
    with PromptCache(cache) as c:
        assert c.count("quality") == 9


def _open_cache(path, barrier):
    barrier.wait()
    with PromptCache(path):
        pass


def test_many_processes_can_create_the_same_cache_at_once(tmp_path):
    """Regression: the WAL switch answered 'database is locked' to a process racing another's creation."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(12):
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_cache, args=(tmp_path / f"c{trial}.sqlite", barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], f"trial {trial}"
