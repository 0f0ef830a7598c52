"""`xpsr tables` from another working directory (issue 15): eval folders are found through the absolute and
summary-relative paths summary.json records; the s/img column never disappears without a word; a missing
perception metric is named (no empty plot, no "no image in common"); config errors exit 1."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from xpsr.cli import main
from xpsr.config import EvalConfig
from xpsr.metrics.evaluate import evaluate


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    """Two runs evaluated with psnr/ssim only, from relative paths typed in the project folder."""
    root = tmp_path_factory.mktemp("tables")
    rng = np.random.default_rng(0)
    for name in ("hr", "sr_a", "sr_b"):
        (root / name).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / name / f"im{i}.png")
    (root / "sr_a" / "infer_report.json").write_text(json.dumps({"seconds_per_image": 0.25}))
    cwd = os.getcwd()
    try:
        os.chdir(root)
        for run in ("a", "b"):
            evaluate(EvalConfig(sr=f"sr_{run}", hr="hr", output_dir=f"eval_{run}", metrics=["psnr", "ssim"],
                                device="cpu"))
    finally:
        os.chdir(cwd)
    return root


def test_tables_from_another_directory(evals, tmp_path, monkeypatch, capsys):
    settings = json.loads((evals / "eval_a" / "summary.json").read_text())["settings"]
    assert settings["sr"] == "sr_a" and settings["sr_from_summary"] == "../sr_a"
    assert settings["sr_absolute"] == str(evals / "sr_a")
    monkeypatch.chdir(tmp_path)
    code = main(["tables", f"runs.a={evals / 'eval_a'}", f"runs.b={evals / 'eval_b'}", "metrics=[psnr]",
                 "output_dir=out", "visual_images=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "s/img ↓" in out and "| a | " in out and "0.2500" in out  # a's SR folder found from here
    assert f"s/img of b: none (no infer_report*.json with seconds_per_image in its SR folder {evals / 'sr_b'})" in out
    assert (tmp_path / "out" / "visual.png").is_file()  # the SR/HR folders were found; images in name order
    assert "no image in common" not in out
    # perception=lpips (the default) and no run has LPIPS: said, and no empty plot written
    assert "no perception-distortion plot (no run has both psnr and lpips (a has no lpips; b has no lpips)" in out
    assert not (tmp_path / "out" / "pd_scatter.png").exists()


def test_a_moved_tree_and_a_summary_of_before(evals, tmp_path, monkeypatch, capsys):
    """The whole tree moved: the summary-relative path finds the folders; without s/img anywhere, it is said."""
    moved = tmp_path / "moved"
    shutil.copytree(evals, moved)
    (moved / "sr_a" / "infer_report.json").unlink()
    monkeypatch.chdir(tmp_path)
    for run in ("a", "b"):  # as if the original tree were gone: only the summary-relative paths lead there
        summary = json.loads((moved / f"eval_{run}" / "summary.json").read_text())
        summary["settings"].update(sr_absolute=f"/nonexistent/sr_{run}", hr_absolute="/nonexistent/hr")
        (moved / f"eval_{run}" / "summary.json").write_text(json.dumps(summary))
    assert main(["tables", f"runs.a={moved / 'eval_a'}", f"runs.b={moved / 'eval_b'}", "metrics=[psnr]",
                 "output_dir=out", "visual_images=1", "perception=ssim"]) == 0
    out = capsys.readouterr().out
    assert "s/img ↓" not in out and "s/img of a: none" in out and f"SR folder {moved / 'sr_b'}" in out
    assert (tmp_path / "out" / "pd_scatter.png").stat().st_size > 1000 and (tmp_path / "out" / "visual.png").is_file()


def test_config_errors_exit_1(tmp_path, capsys):
    assert main(["tables", f"output_dir={tmp_path}"]) == 1
    assert main(["tables", f"runs.a={tmp_path}", "compare=paper", f"output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "give runs.LABEL=EVAL_DIR" in err and "compare=paper needs dataset=" in err
