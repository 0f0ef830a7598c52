"""`xpsr prepare`: pairs, manifest, report, odd inputs, determinism, resume, paired import."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, make_sources, prepare_config
from PIL import Image

from xpsr.data.pairs import prepare_pairs, read_manifest


def _bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_prepare_writes_pairs_manifest_and_report(tmp_path):
    src = make_sources(tmp_path / "src")
    stats = prepare_pairs(prepare_config([src], tmp_path / "out", crops_per_image=2))
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert stats["pairs_made"] == len(records) == 6
    for r in records:
        hr = np.asarray(Image.open(tmp_path / "out" / r["hr"]))
        lr = np.asarray(Image.open(tmp_path / "out" / r["lr"]))
        assert hr.shape == (64, 64, 3) and lr.shape == (16, 16, 3)
        assert r["scale"] == 4 and "stage1" in r["degradation"] and len(r["crop_box"]) == 4
        assert r["source_hash"] and r["lr_hash"] and r["usm"] is True
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stats"]["pairs_per_s"] > 0


def test_same_seed_same_bytes_any_worker_count_and_other_seed_differs(tmp_path):
    src = make_sources(tmp_path / "src")
    prepare_pairs(prepare_config([src], tmp_path / "a"))
    prepare_pairs(prepare_config([src], tmp_path / "b", workers=2))
    prepare_pairs(prepare_config([src], tmp_path / "c", seed=1))
    a, b, c = _bytes(tmp_path / "a"), _bytes(tmp_path / "b"), _bytes(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and any(a[k] != c[k] for k in a)


def test_resume_skips_finished_pairs_and_repairs_a_torn_manifest(tmp_path):
    src = make_sources(tmp_path / "src")
    cfg = prepare_config([src], tmp_path / "out", variants=2)
    first = prepare_pairs(cfg)
    manifest = tmp_path / "out" / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    # simulate a crash: the last record half-written, another one never written
    manifest.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])
    again = prepare_pairs(cfg)
    records = read_manifest(manifest)
    assert first["pairs_made"] == 6 and again["pairs_made"] == 2
    assert sorted(r["id"] for r in records) == sorted({r["id"] for r in records}) and len(records) == 6
    assert prepare_pairs(cfg)["pairs_made"] == 0


def test_odd_inputs_are_handled_and_reported(tmp_path):
    src = make_sources(tmp_path / "src", n=1)
    Image.fromarray(np.full((80, 90), 128, np.uint8)).save(src / "gray.png")
    Image.fromarray(np.zeros((80, 90, 4), np.uint8)).save(src / "alpha.png")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(src / "small.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "tiny.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    prepare_pairs(prepare_config([src], tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {e["source"].split("/")[-1]: e for e in report["entries"]}
    assert by_name["broken.png"]["decision"] == "skipped"
    assert by_name["tiny.png"]["decision"] == "skipped" and "smaller" in by_name["tiny.png"]["reason"]
    assert by_name["gray.png"]["decision"] == "converted"
    assert "alpha" in by_name["alpha.png"]["reason"]
    assert "padded" in by_name["small.png"]["reason"]
    ids = {r["id"].split("-")[0] for r in read_manifest(tmp_path / "out" / "manifest.jsonl")}
    assert ids == {"astronaut", "gray", "alpha", "small"}
    skip = prepare_pairs(prepare_config([src], tmp_path / "out2", small_images="skip"))
    assert skip["pairs_total"] == 3


def test_test_set_mode_takes_one_centre_crop(tmp_path):
    src = make_sources(tmp_path / "src")
    prepare_pairs(prepare_config([src], tmp_path / "out", test_set=True, crops_per_image=5, variants=3))
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert len(records) == 3
    for r in records:
        x, y, w, h = r["crop_box"]
        assert (w, h) == (64, 64) and x == (96 + 17 - 64) // 2 and y == (96 - 64) // 2
    prepare_pairs(prepare_config([src], tmp_path / "seeded", test_set=True, test_crop="seeded"))
    boxes = [r["crop_box"] for r in read_manifest(tmp_path / "seeded" / "manifest.jsonl")]
    assert len(boxes) == 3 and boxes != [r["crop_box"] for r in records]


def test_import_of_an_existing_paired_set(tmp_path):
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR"
    hr_dir.mkdir()
    lr_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(hr_dir / f"img{i}_HR.png")
        size = 16 if i != 2 else 20  # the third pair is not x4
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(lr_dir / f"img{i}_LR4.png")
    stats = prepare_pairs(prepare_config([], tmp_path / "out", paired_hr=hr_dir, paired_lr=lr_dir))
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert stats["pairs_made"] == 2 and [r["id"] for r in records] == ["img0_HR", "img1_HR"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "not x4" in report["entries"][0]["reason"]


def test_cli_exits_non_zero_when_nothing_is_usable(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.png").write_bytes(b"nope")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare.py"), "--config",
                           str(REPO / "configs" / "data" / "xpsr.yaml"), f"inputs=[{src}]",
                           f"output_dir={tmp_path / 'out'}", "crop_size=64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "no usable pair" in proc.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["entries"][0]["decision"] == "skipped"


def test_missing_input_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_pairs(prepare_config([tmp_path / "nope"], tmp_path / "out"))
