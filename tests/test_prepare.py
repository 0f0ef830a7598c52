"""`xpsr prepare`: pairs, manifest, report, odd inputs, determinism, resume, paired import."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, make_sources, prepare_config
from PIL import Image

from xpsr.data.degradations import usm_sharpen
from xpsr.data.manifest import RecipeMismatchError
from xpsr.data.pairs import prepare_pairs, read_manifest


def _bytes(folder):
    """The images and the manifest (its lines in the same order whatever the worker count)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.suffix in (".png", ".jsonl")}


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
        assert r["source_hash"] and r["lr_hash"] and r["usm"] is True and r["recipe"] == "usm-then-degrade/v2"
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


def _lr(folder, record):
    return np.asarray(Image.open(folder / record["lr"]))


def test_the_sharpened_crop_is_degraded_and_the_recipe_is_recorded(tmp_path):
    """Official make_train.py: USM first, then the degradation of the sharpened crop (same seed, same draws)."""
    src = make_sources(tmp_path / "src", n=1)
    runs = {"new": {}, "no_usm": {"degradation.usm_gt": "false"},
            "old_order": {"degradation.degrade_sharpened": "false"}}
    recs = {}
    for name, over in runs.items():
        prepare_pairs(prepare_config([src], tmp_path / name, **over))
        recs[name] = read_manifest(tmp_path / name / "manifest.jsonl")[0]
    assert [recs[n]["recipe"] for n in runs] == ["usm-then-degrade/v2", "no-usm/v2", "degrade-then-usm/v2"]
    assert recs["new"]["degradation"] == recs["no_usm"]["degradation"] == recs["old_order"]["degradation"]
    new, no_usm, old = (_lr(tmp_path / n, recs[n]) for n in runs)
    assert not np.array_equal(new, no_usm)  # turning USM off changes the LR
    assert np.array_equal(old, no_usm)  # the old order degraded the plain crop whatever usm_gt said


def test_without_random_degradations_the_lr_is_the_downscaled_sharpened_crop(tmp_path):
    src = make_sources(tmp_path / "src", n=1)
    off = {"degradation.stage1.blur_prob": 0, "degradation.stage1.resize_prob": "[0,0,1]",
           "degradation.stage1.gaussian_noise_prob": 1, "degradation.stage1.noise_range": "[0,0]",
           "degradation.stage1.jpeg_prob": 0, "degradation.second_order_prob": 0,
           "degradation.final_sinc_prob": 0, "degradation.stage2.jpeg_prob": 0,
           "degradation.stage2.resize_modes": "[area]"}
    prepare_pairs(prepare_config([src], tmp_path / "out", **off))
    r = read_manifest(tmp_path / "out" / "manifest.jsonl")[0]
    x, y, w, h = r["crop_box"]
    crop = np.asarray(Image.open(src / "astronaut.png"))[y:y + h, x:x + w].astype(np.float32) / 255
    sharp = usm_sharpen(crop)  # BasicSR's USM (pinned by tests/test_degradations.py)

    def box4(img):
        return (img.astype(np.float64).reshape(h // 4, 4, w // 4, 4, 3).mean((1, 3)) * 255).round()

    lr = _lr(tmp_path / "out", r).astype(np.float64)
    assert np.abs(lr - box4(sharp)).max() <= 1 and (lr == box4(sharp)).mean() > 0.99
    assert np.abs(lr - box4(crop)).mean() > 1  # not the plain crop's downscale (the old order)


def test_shared_draws_follow_groups_any_worker_count_and_resume(tmp_path):
    src = make_sources(tmp_path / "src", n=3)
    prepare_pairs(prepare_config([src], tmp_path / "a", share_draws_every=2, variants=2))
    prepare_pairs(prepare_config([src], tmp_path / "b", share_draws_every=2, variants=2, workers=2))
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    records = read_manifest(tmp_path / "a" / "manifest.jsonl")
    by = {(r["source"].rsplit("/", 1)[-1], r["variant"]): r for r in records}
    g = [by[(name, 0)] for name in ("astronaut.png", "chelsea.png", "coffee.png")]
    assert g[0]["draw_group"] == g[1]["draw_group"] != g[2]["draw_group"]
    d = [r["degradation"] for r in g]
    assert d[0]["stage1"]["resize"] == d[1]["stage1"]["resize"] and d[0]["final"]["mode"] == d[1]["final"]["mode"]
    assert d[0]["noise_seed"] != d[1]["noise_seed"]  # per-pair draws stay per pair
    assert by[("astronaut.png", 0)]["degradation"]["stage1"]["resize"] != \
        by[("astronaut.png", 1)]["degradation"]["stage1"]["resize"]  # each variant (epoch) its own batch draws
    manifest = tmp_path / "a" / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:2]))  # interrupted
    prepare_pairs(prepare_config([src], tmp_path / "a", share_draws_every=2, variants=2))
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    with pytest.raises(RecipeMismatchError, match="share_draws_every"):
        prepare_pairs(prepare_config([src], tmp_path / "a", share_draws_every=1, variants=2))


def test_resuming_into_a_folder_of_another_recipe_fails(tmp_path):
    src = make_sources(tmp_path / "src", n=1)
    prepare_pairs(prepare_config([src], tmp_path / "out"))
    manifest = tmp_path / "out" / "manifest.jsonl"
    line = json.loads(manifest.read_text())
    del line["recipe"]  # as written by the first recipe
    manifest.write_text(json.dumps(line) + "\n")
    with pytest.raises(RecipeMismatchError, match="degrade-then-usm/v1"):
        prepare_pairs(prepare_config([src], tmp_path / "out", variants=2))


def test_resuming_with_other_degradation_settings_fails(tmp_path):
    src = make_sources(tmp_path / "src", n=1)
    prepare_pairs(prepare_config([src], tmp_path / "out"))
    with pytest.raises(RecipeMismatchError, match="settings_hash"):
        prepare_pairs(prepare_config([src], tmp_path / "out", **{"degradation.stage1.noise_range": "[1,5]"}))
    assert prepare_pairs(prepare_config([src], tmp_path / "out", variants=2))["pairs_made"] == 1  # more pairs: fine
