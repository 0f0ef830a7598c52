"""The embedded default end to end, tables across runs, and the reproduction script on a tiny model."""
import json
import subprocess
import sys

import numpy as np
from conftest import REPO

from xpsr.data.images import save_png_atomic


def test_demo_writes_a_report_and_xpsr_training_teaches_the_controlnet(tmp_path):
    """The embedded demo on a CI budget (a prior of 20 + 20 steps, 30 XPSR steps; ~1 CPU-minute): the report
    is written, and on the held-out pairs the trained model predicts the noise better than the same frozen
    prior before XPSR training (same draws), so training taught the ControlNet to use the LR image."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "xpsr.cli", "demo", f"output_dir={out}", "train_steps=30",
                           "inference_steps=2", "prior.vae_steps=20", "prior.unet_steps=20", "prior.batch_size=4"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (out / "report.html").read_text()
    assert "does <b>not</b> show the" in html
    # LR | bicubic | prior alone | XPSR | HR per held-out image + loss curves
    assert html.count("data:image/png") == 3 * 5 + 1
    assert "bicubic" in html and "PSNR" in html
    assert f"demo report: {out / 'report.html'}" in proc.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    mse = summary["heldout_noise_mse"]
    assert mse["after"] < 0.97 * mse["before"], mse  # measured: 0.839 -> 0.772
    assert set(summary["metrics"]) == {"bicubic", "prior alone (before XPSR training)", "XPSR (tiny, CPU)",
                                       "HR through the prior's VAE"}
    assert f"error falls from {mse['before']:.4f}" in html


def _eval_dir(path, **values):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({**values, "settings": {}}))
    return path


def test_tables_and_perception_distortion_plot(tmp_path):
    runs = {"sfa": _eval_dir(tmp_path / "sfa", psnr=24.0, lpips=0.30),
            "sequential": _eval_dir(tmp_path / "seq", psnr=23.5, lpips=0.32)}
    args = [f"runs.{k}={v}" for k, v in runs.items()]
    proc = subprocess.run([sys.executable, "-m", "xpsr.cli", "tables", *args, "metrics=[psnr,lpips]",
                           "compare=paper", "dataset=RealSR", f"output_dir={tmp_path / 't'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "t" / "table.md").read_text()
    assert "| sfa | 24.00 | 0.3000 |" in table and "| sequential | 23.50 | 0.3200 |" in table
    assert "XPSR (paper)" in table and "Table 1" in table
    assert (tmp_path / "t" / "pd_scatter.png").stat().st_size > 1000


def test_reproduction_script_on_a_tiny_model(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        hr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        save_png_atomic(hr, tmp_path / "RealSR" / "HR" / f"x{i}_HR.png")
        save_png_atomic(hr[::4, ::4], tmp_path / "RealSR" / "LR" / f"x{i}_LR4.png")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_paper.py"), "--out", str(tmp_path / "r"),
                           "--base", "tiny", "--realsr", str(tmp_path / "RealSR"), "--offline-captions",
                           "--metrics", "psnr,ssim",
                           "--infer-config", str(REPO / "configs" / "infer" / "tiny_cpu.yaml"),
                           "--infer-override", "num_inference_steps=2", "--infer-override", "process_size=32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "r" / "RealSR" / "eval" / "summary.json").read_text())
    assert summary["settings"]["images"] == 2 and summary["psnr"] > 0
    assert (tmp_path / "r" / "RealSR" / "tables" / "table.md").is_file()


def test_visual_comparison_shows_where_runs_disagree(tmp_path):
    from PIL import Image

    from xpsr.config import EvalConfig, load_config
    from xpsr.metrics.evaluate import evaluate
    from xpsr.metrics.visual import busiest_window, visual_comparison

    rng = np.random.default_rng(0)
    hr = {f"im{i}.png": rng.integers(60, 200, (96, 128, 3), dtype=np.uint8) for i in range(3)}
    for name, img in hr.items():
        save_png_atomic(img, tmp_path / "hr" / name)
        save_png_atomic(img, tmp_path / "a" / name)  # run a: perfect
        worse = img.copy()
        if name == "im1.png":  # run b differs from a only in im1, in its lower-right corner
            worse[60:, 90:] = 255 - worse[60:, 90:]
        save_png_atomic(worse, tmp_path / "b" / name)
    runs = {}
    for label in ("a", "b"):
        cfg = load_config(EvalConfig, None, [f"sr={tmp_path / label}", f"hr={tmp_path / 'hr'}", "metrics=[psnr,ssim]",
                                             f"output_dir={tmp_path / ('eval_' + label)}", "device=cpu"])
        evaluate(cfg)
        runs[label] = tmp_path / ("eval_" + label)
    y, x = busiest_window([np.asarray(Image.open(tmp_path / d / "im1.png")) for d in ("a", "b")], 32)
    assert y >= 60 - 1 and x >= 90 - 1
    out = visual_comparison(runs, tmp_path / "visual.png", count=2, crop=32, metric="ssim")
    grid = np.asarray(Image.open(out))
    assert grid.shape == (4 + 2 * (32 + 16 + 4), 4 + 3 * (32 + 4), 3)  # 2 rows; HR, a, b columns
    # the first row is im1 (the largest spread): its b cell is the inverted corner, unlike its a cell
    first_a = grid[4 + 16:4 + 16 + 32, 4 + 36:4 + 36 + 32].astype(int)
    first_b = grid[4 + 16:4 + 16 + 32, 4 + 72:4 + 72 + 32].astype(int)
    assert np.abs(first_a - first_b).mean() > 40
