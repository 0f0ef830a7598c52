"""`xpsr eval` under hostile inputs: a damaged or bomb SR image stops with its name and keeps the scores already
computed, names that are not UTF-8 reach metrics.csv, pairs whose names differ are recorded, and a damaged score
cache is recomputed instead of crashing."""
import json
import os

import numpy as np
import pytest
from conftest import write_png_bomb

from xpsr.config import EvalConfig, load_config
from xpsr.data.images import ImageError, save_png_atomic
from xpsr.metrics.evaluate import evaluate


def _pairs(tmp_path, names):
    rng = np.random.default_rng(0)
    for sr_name, hr_name in names:
        hr = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        save_png_atomic(hr, tmp_path / "hr" / hr_name)
        save_png_atomic(np.clip(hr.astype(int) + 9, 0, 255).astype(np.uint8), tmp_path / "sr" / sr_name)
    return tmp_path / "sr", tmp_path / "hr"


def _cfg(tmp_path, sr, hr):
    return load_config(EvalConfig, None, [f"sr={sr}", f"hr={hr}", f"output_dir={tmp_path / 'eval'}", "device=cpu",
                                          "metrics=[psnr]", f"weights_dir={tmp_path / 'w'}"])


def test_a_bad_sr_image_stops_naming_it_and_the_scores_before_it_are_kept(tmp_path):
    sr, hr = _pairs(tmp_path, [("a.png", "a.png"), ("b.png", "b.png"), ("c.png", "c.png")])
    (sr / "b.png").write_bytes(b"\x89PNG damaged")
    with pytest.raises(ImageError, match="b.png"):
        evaluate(_cfg(tmp_path, sr, hr))
    assert len(json.loads((tmp_path / "eval" / "metrics_cache.json").read_text())) == 1  # a.png's score kept
    write_png_bomb(sr / "b.png")
    with pytest.raises(ImageError, match="b.png: .*decompression"):
        evaluate(_cfg(tmp_path, sr, hr))


def test_non_utf8_names_renamed_pairs_and_a_damaged_score_cache(tmp_path, capsys):
    latin1 = os.fsdecode(b"caf\xe9.png")
    sr, hr = _pairs(tmp_path, [(latin1, latin1), ("x.jpg.png", "x.jpg"), ("y.png", "z.png")])
    summary = evaluate(_cfg(tmp_path, sr, hr))
    assert abs(summary["psnr"] - 20 * np.log10(255 / (9 * 219 / 255))) < 0.5  # +9 on RGB = +7.7 on Y (clipping)
    csv_names = [line.split(",")[0] for line in (tmp_path / "eval" / "metrics.csv").read_text("utf-8").splitlines()]
    assert csv_names == ["image", "caf\\xe9.png", "x.jpg.png", "y.png"]
    # x.jpg.png is infer's output of x.jpg: the same name; y/z is recorded and printed
    assert summary["settings"]["pairs_named_differently"] == 1
    assert summary["settings"]["pairs_named_differently_first"] == ["y.png <-> z.png"]
    assert "1 of 3 SR/HR pairs have different names" in capsys.readouterr().out
    (tmp_path / "eval" / "metrics_cache.json").write_text('{"psnr|ab')  # truncated by a copy
    again = evaluate(_cfg(tmp_path, sr, hr))
    assert again["psnr"] == summary["psnr"] and "ignoring the damaged score cache" in capsys.readouterr().out
