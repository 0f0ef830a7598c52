"""`xpsr prepare` under faults: kill -9 at random instants, disk full, temp files, hostile inputs and settings."""
import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from conftest import REPO, make_sources, prepare_config
from PIL import Image

from xpsr.data.manifest import ManifestBusyError, ManifestWriter
from xpsr.data.pairs import prepare_pairs, read_manifest


def _outputs(folder):
    """Every file a finished run leaves that must not depend on interruptions (report.json has timings)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "report.json"}


def _temp_files(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]


def _bomb_png(path, side=30000):
    """A PNG whose header says side x side: PIL refuses it as a decompression bomb before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_one_bad_input_skips_only_itself_also_in_worker_processes(tmp_path):
    src = make_sources(tmp_path / "src", n=1)
    _bomb_png(src / "bomb.png")
    good = src / "astronaut.png"
    (src / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (src / ".tmp-left-by-someone.png").write_bytes(good.read_bytes())  # a temp file is never an input
    stats = prepare_pairs(prepare_config([src], tmp_path / "out", workers=1))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    reasons = {e["source"].rsplit("/", 1)[-1]: e["reason"] for e in report["entries"] if e["decision"] == "skipped"}
    assert set(reasons) == {"bomb.png", "truncated.png"} and "decompression bomb" in reasons["bomb.png"]
    assert stats["pairs_total"] == 1 and read_manifest(tmp_path / "out" / "manifest.jsonl")[0]["id"][:9] == "astronaut"


def test_crop_sizes_that_are_not_a_multiple_of_the_scale_are_refused(tmp_path):
    src = make_sources(tmp_path / "src", n=1)
    for crop, scale in ((130, 4), (2, 4)):  # refused when the config is loaded, naming the override
        with pytest.raises(ValueError, match=rf"override 'crop_size={crop}': key 'crop_size' = {crop} must be a "
                                             rf"multiple of scale \({scale}\)"):
            prepare_pairs(prepare_config([src], tmp_path / "out", crop_size=crop, scale=scale))
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_output_inside_the_inputs_is_refused_and_a_source_listed_twice_is_made_once(tmp_path):
    src = make_sources(tmp_path / "src", n=2)
    with pytest.raises(ValueError, match=r"output_dir=.* and inputs\[0\]=.* overlap"):
        prepare_pairs(prepare_config([src], src / "pairs"))
    (src / "copy").mkdir()
    (src / "copy" / "chelsea.png").write_bytes((src / "chelsea.png").read_bytes())
    prepare_pairs(prepare_config([src, src], tmp_path / "out"))
    ids = [r["id"] for r in read_manifest(tmp_path / "out" / "manifest.jsonl")]
    assert len(ids) == len(set(ids)) == 2
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sum("duplicate of" in e["reason"] for e in report["entries"]) == 4  # 6 listed, 2 distinct


def test_temp_files_of_a_killed_run_are_removed_and_a_second_writer_is_refused(tmp_path):
    src = make_sources(tmp_path / "src", n=1)
    out = tmp_path / "out"
    cfg = prepare_config([src], out)
    prepare_pairs(cfg)
    clean = _outputs(out)
    for leftover in (out / "hr" / ".tmp-abc.png", out / "lr" / ".tmp-def.png", out / ".report.json.tmp"):
        leftover.write_bytes(b"half")
    prepare_pairs(cfg)
    assert _temp_files(out) == [] and _outputs(out) == clean
    writer = ManifestWriter(out / "manifest.jsonl")
    with pytest.raises(ManifestBusyError):
        prepare_pairs(cfg)
    writer.close()


def _fill_disk_after(monkeypatch, saves):
    """PNG saves fail with ENOSPC (half a file written) once ``saves`` have succeeded."""
    real_save, count = Image.Image.save, [0]

    def save(self, fp, *args, **kwargs):
        count[0] += 1
        if count[0] > saves:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def test_disk_full_is_one_line_keeps_finished_pairs_and_a_rerun_completes(tmp_path, monkeypatch, capsys):
    from xpsr.cli import main

    src = make_sources(tmp_path / "src", n=2)
    args = ["prepare", "--config", str(REPO / "configs" / "data" / "xpsr.yaml"), f"inputs=[{src}]",
            "crop_size=64", "variants=2"]
    assert main(args + [f"output_dir={tmp_path / 'clean'}"]) == 0
    out = tmp_path / "out"
    _fill_disk_after(monkeypatch, saves=3)  # pair 1 whole, pair 2's HR written, its LR fails
    assert main(args + [f"output_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"disk full while writing {out / 'lr'}" in err and "Traceback" not in err
    assert _temp_files(out) == [] and len(read_manifest(out / "manifest.jsonl")) == 1
    monkeypatch.undo()  # space freed
    assert main(args + [f"output_dir={out}"]) == 0
    assert _outputs(out) == _outputs(tmp_path / "clean")


def _stat(pid):
    """(state, parent pid) from /proc, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


def _alive(pid):
    return _stat(pid) is not None and _stat(pid)[0] not in ("Z", "X")


RUN = """
import sys
sys.path.insert(0, {tests!r})
from conftest import prepare_config
from xpsr.data.pairs import prepare_pairs
print("ready", flush=True)
prepare_pairs(prepare_config([{src!r}], {out!r}, crops_per_image=2, variants=2))
"""


def test_kill_9_at_random_instants_then_a_rerun_gives_the_bytes_of_an_uninterrupted_run(tmp_path):
    src = make_sources(tmp_path / "src", n=3)
    prepare_pairs(prepare_config([src], tmp_path / "clean", crops_per_image=2, variants=2))
    out, rng = tmp_path / "out", random.Random(os.getpid())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    code = RUN.format(tests=str(REPO / "tests"), src=str(src), out=str(out))
    manifest, lines_at_kill = out / "manifest.jsonl", []
    for target in sorted(rng.sample(range(12), 3)):  # kill after about `target` of the 12 lines, at a random instant
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=env)
        assert proc.stdout.readline() == b"ready\n"  # imports done
        while proc.poll() is None and (manifest.read_bytes().count(b"\n") if manifest.exists() else 0) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lines_at_kill.append(manifest.read_bytes().count(b"\n") if manifest.exists() else 0)
    prepare_pairs(prepare_config([src], out, crops_per_image=2, variants=2))
    assert _outputs(out) == _outputs(tmp_path / "clean") and _temp_files(out) == []
    ids = [r["id"] for r in read_manifest(out / "manifest.jsonl")]
    assert len(ids) == len(set(ids)) == 12, lines_at_kill


WORKER = """
import os, sys, time
from xpsr.data.pairs import init_worker
parent = os.getpid()
child = os.fork()
if child == 0:
    init_worker(parent)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_workers_die_with_a_killed_parent(tmp_path):
    """An orphaned worker would go on writing into the folder while the rerun cleans it."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    child = int(proc.stdout.readline())
    time.sleep(0.2)
    assert _alive(child) and _stat(child)[1] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_paired_import_makes_a_name_found_twice_once(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("a", "b"):
        for side, size in (("HR", 32), ("LR", 8)):
            (tmp_path / side / sub).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / side / sub / "x.png")
    cfg = prepare_config([], tmp_path / "out", paired_hr=tmp_path / "HR", paired_lr=tmp_path / "LR")
    for _ in range(2):  # and again, resuming
        prepare_pairs(cfg)
        records = read_manifest(tmp_path / "out" / "manifest.jsonl")
        assert [r["source"] for r in records] == [str(tmp_path / "HR" / "a" / "x.png")]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "taken by" in report["entries"][0]["reason"]
