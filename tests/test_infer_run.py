"""`xpsr infer` under hostile inputs and faults: size limits, per-image errors, name clashes, temp files, prompts,
a full disk, and several processes sharing one output folder (a kill costs only the image in flight)."""
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, write_png_bomb
from node_helpers import FAKE_INFER
from PIL import Image

import xpsr.inference.run as run_mod
from xpsr.config import EvalConfig, InferConfig, load_config
from xpsr.data.images import save_png_atomic
from xpsr.errors import DiskFullError
from xpsr.inference.run import SizeRefused, check_size, clean_prompt

TINY = REPO / "configs" / "infer" / "tiny_cpu.yaml"


def _cfg(src, out, **kw):
    args = [f"input={src}", f"output_dir={out}", "num_inference_steps=1"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(InferConfig, TINY, args)


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def fake_sr(monkeypatch):
    """super_resolve replaced by a nearest-neighbour upscale; records the sizes it was given."""
    seen = []

    def fake(modules, lr, content, quality, cfg, device):
        seen.append(lr.shape[:2])
        return np.repeat(np.repeat(lr, cfg.upscale, axis=0), cfg.upscale, axis=1)

    monkeypatch.setattr(run_mod, "super_resolve", fake)
    return seen


def _accounted(report):
    return report["done"] + report["skipped_existing"] + report["in_progress_elsewhere"] + report["failed"]


def test_oversized_inputs_and_bombs_are_refused_per_image_naming_the_limit(tmp_path, fake_sr):
    src = tmp_path / "lr"
    save_png_atomic(_img(16, 16), src / "good.png")
    Image.fromarray(_img(1, 3000)).save(src / "strip.png")  # 10 KB; processed at 512 x 1,536,000 px unchecked
    write_png_bomb(src / "bomb.png")
    report = run_mod.run_inference(_cfg(src, tmp_path / "sr", process_size=512))
    assert report["done"] == 1 and fake_sr == [(16, 16)] and _accounted(report) == report["inputs"] == 3
    errors = {os.path.basename(e["input"]): e["error"] for e in report["errors"]}
    assert "max_process_pixels=16,777,216" in errors["strip.png"] and "1536000x512" in errors["strip.png"]
    assert "decompression-bomb" in errors["bomb.png"]
    # the key lifts the limit: the strip now reaches the model
    report = run_mod.run_inference(_cfg(src, tmp_path / "sr2", process_size=512, max_process_pixels=0))
    assert (1, 3000) in fake_sr and report["done"] == 2
    # upscale=1000 on 32x32 would be a 32000 x 32000 output
    one = tmp_path / "one"
    save_png_atomic(_img(32, 32), one / "a.png")
    report = run_mod.run_inference(_cfg(one, tmp_path / "sr3", upscale=1000))
    assert report["done"] == 0 and "max_output_pixels=16,777,216" in report["errors"][0]["error"]


def test_size_limits_on_extreme_shapes():
    cfg = _cfg("x", "y", process_size=512)
    check_size("ok", 512, 2048, cfg)  # x4 = 8192 x 2048 = exactly 4096^2 output pixels: allowed (tiled)
    with pytest.raises(SizeRefused, match="max_output_pixels"):
        check_size("wide", 513, 2048, cfg)
    with pytest.raises(SizeRefused, match="max_process_pixels"):
        check_size("strip", 1, 2048, cfg)
    check_size("tiny", 8, 8, cfg)


def test_an_8x8_input_is_super_resolved_by_the_tiny_model(tmp_path):
    save_png_atomic(_img(8, 8), tmp_path / "lr" / "a.png")
    report = run_mod.run_inference(_cfg(tmp_path / "lr", tmp_path / "sr"))
    assert report["done"] == 1
    assert np.asarray(Image.open(tmp_path / "sr" / "a.png")).shape == (32, 32, 3)


def test_same_stem_inputs_get_distinct_outputs_and_counts_are_true(tmp_path, fake_sr):
    src = tmp_path / "lr"
    save_png_atomic(_img(8, 8, 1), src / "x.png")
    Image.fromarray(_img(8, 8, 2)).save(src / "x.jpg", quality=95)
    save_png_atomic(_img(8, 8, 3), src / "sub" / "y.png")
    (src / "bad.png").write_text("not an image")
    out = tmp_path / "sr"
    report = run_mod.run_inference(_cfg(src, out))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["sub/y.png", "x.jpg.png", "x.png"]
    assert report["done"] == 3 and report["failed"] == 1 and _accounted(report) == report["inputs"] == 4
    from_jpg = np.asarray(Image.open(src / "x.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(out / "x.jpg.png")), np.repeat(np.repeat(from_jpg, 4, 0), 4, 1))
    report = run_mod.run_inference(_cfg(src, out))  # resume: the same names, nothing redone
    assert report["done"] == 0 and report["skipped_existing"] == 3 and report["failed"] == 1


def test_temp_files_of_killed_runs_are_ignored_and_cleaned(tmp_path, fake_sr):
    from xpsr.captions.run import run_captioning
    from xpsr.config import CaptionConfig
    from xpsr.metrics.evaluate import evaluate

    src, out = tmp_path / "lr", tmp_path / "sr"
    save_png_atomic(_img(8, 8), src / "a.png")
    save_png_atomic(_img(8, 8, 1), src / ".tmp-k2j4h5g6.png")  # what a kill at the rename leaves
    save_png_atomic(_img(32, 32, 2), out / ".tmp-abcd_123.png")
    (out / ".tmp-claim-0123456789abcdef").write_bytes(b"")
    (out / ".tmp-notes.png").write_bytes(b"a user's file, not ours")
    report = run_mod.run_inference(_cfg(src, out))
    assert report["inputs"] == 1 and report["done"] == 1
    left = sorted(p.name for p in out.iterdir())
    assert left == [".tmp-notes.png", ".xpsr-infer.lock", "a.png", "infer_report.json"], left
    stats = run_captioning(load_config(CaptionConfig, None, [f"images={src}", f"cache={tmp_path / 'p.sqlite'}"]))
    assert stats["images"] == 1 and stats["captioned"] == 1
    save_png_atomic(_img(32, 32, 3), out / ".tmp-zzzzzzzz.png")
    save_png_atomic(_img(32, 32, 4), tmp_path / "hr" / "a.png")
    evaluate(load_config(EvalConfig, None, [f"sr={out}", f"hr={tmp_path / 'hr'}", "metrics=[psnr]", "device=cpu",
                                            f"output_dir={tmp_path / 'eval'}", f"weights_dir={tmp_path / 'w'}"]))
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["settings"]["images"] == 1


def test_hostile_prompts_are_cleaned_truncation_is_recorded_and_nothing_crashes(tmp_path):
    from xpsr.captions.cache import PromptCache, PromptRow
    from xpsr.data.images import file_hash

    src = tmp_path / "lr"
    contents = ["", "a\x00cat\x07 on \x1b[31mred grass\n", "日本語のキャプション 🐱 кошка", "a red bird " * 60]
    rows = []
    for i, text in enumerate(contents):
        save_png_atomic(_img(8, 8, i), src / f"{i}.png")
        h = file_hash(src / f"{i}.png")
        rows += [PromptRow(h, "content", "t", "q", text), PromptRow(h, "quality", "t", "q", contents[-1 - i])]
    with PromptCache(tmp_path / "p.sqlite") as cache:
        cache.put_many(rows)
    report = run_mod.run_inference(_cfg(src, tmp_path / "sr", cache=tmp_path / "p.sqlite", caption_missing="false",
                                        process_size=32))
    assert report["done"] == 4 and report["truncated_prompts"] == 2
    by_name = {os.path.basename(r["input"]): r for r in report["images"]}
    assert by_name["3.png"]["truncated"] == ["content"] and by_name["3.png"]["tokens"]["content"] > 77
    assert by_name["0.png"]["truncated"] == ["quality"] and by_name["0.png"]["truncated_to_tokens"] == 77
    used = by_name["1.png"]["prompts"]["content"]
    assert "\x00" not in used and "\x1b" not in used and used.startswith("a cat")
    assert by_name["2.png"]["prompts"]["content"].startswith("日本語")
    # a byte that is not UTF-8 on the command line arrives as a lone surrogate: the tokenizer cannot take it
    assert clean_prompt("caf\udce9 au lait") == "caf  au lait"
    cfg = dataclasses.replace(_cfg(src, tmp_path / "sr2", prompts="fixed", process_size=32), prompt="caf\udce9")
    report = run_mod.run_inference(cfg)
    assert report["done"] == 4


def test_disk_full_stops_with_a_message_leaves_no_partial_file_and_a_rerun_completes(tmp_path, fake_sr, monkeypatch):
    src, out = tmp_path / "lr", tmp_path / "sr"
    for i in range(3):
        save_png_atomic(_img(8, 8, i), src / f"{i}.png")
    real_save, calls = Image.Image.save, []

    def save_until_full(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) < 2:
            return real_save(self, fp, *args, **kwargs)
        with open(fp, "wb") as f:  # half a file, then the disk is full
            f.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    with pytest.raises(DiskFullError, match="disk full: cannot write .*1.png"):
        run_mod.run_inference(_cfg(src, out))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".xpsr")) == ["0.png", "infer_report.json"]
    report = json.loads((out / "infer_report.json").read_text())
    assert report["done"] == 1 and report["not_attempted"] == 1 and report["errors"][0]["stopped_the_run"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    report = run_mod.run_inference(_cfg(src, out))
    assert report["done"] == 2 and report["skipped_existing"] == 1


_WORKER = FAKE_INFER + """
log = sys.argv[3]
def note(word, path):
    with open(log, "a") as f:  # one short O_APPEND write per line: lines of two processes never mix
        f.write(f"{word} {os.getpid()} {os.path.basename(str(path))}\\n")
install_fake_infer(note)
run_mod.run_inference(load_config(InferConfig, sys.argv[4], [f"input={sys.argv[1]}", f"output_dir={sys.argv[2]}"]))
"""


def test_processes_sharing_a_folder_do_each_image_once_and_a_kill_costs_only_the_image_in_flight(tmp_path):
    src, out, log = tmp_path / "lr", tmp_path / "sr", tmp_path / "log.txt"
    for i in range(40):
        save_png_atomic(_img(8, 8, i), src / f"{i:02d}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def start():
        return subprocess.Popen([sys.executable, "-c", _WORKER, str(src), str(out), str(log), str(TINY)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    victim, survivor = start(), start()
    deadline = time.time() + 240
    while time.time() < deadline and survivor.poll() is None:  # kill once the victim is well into its work
        done_by_victim = log.read_text().count(f"written {victim.pid} ") if log.exists() else 0
        if done_by_victim >= 3:
            break
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert survivor.wait(timeout=300) == 0, survivor.stderr.read()[-2000:]
    last = start()  # alone now: finishes what the victim had in flight and cleans its claim file
    assert last.wait(timeout=300) == 0, last.stderr.read()[-2000:]
    lines = [line.split() for line in log.read_text().splitlines()]
    written = [name for word, _, name in lines if word == "written"]
    assert sorted(written) == [f"{i:02d}.png" for i in range(40)]  # every image once, none twice
    pids = {pid for _, pid, _ in lines}
    assert str(victim.pid) in pids and str(survivor.pid) in pids, "both processes should have worked"
    victim_started = {n for w, p, n in lines if w == "start" and p == str(victim.pid)}
    victim_written = {n for w, p, n in lines if w == "written" and p == str(victim.pid)}
    assert len(victim_started - victim_written) <= 1  # the kill cost at most the image in flight
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert len(list(out.glob("*.png"))) == 40
