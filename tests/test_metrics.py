"""Evaluation harness: Y-channel PSNR/SSIM vs scikit-image, outputs and cache, offline weights.

The PSNR/SSIM formulas themselves (and their agreement with pyiqa) are pinned in test_psnr_ssim.py.
"""
import json

import numpy as np
import pytest
import torch

from xpsr.config import EvalConfig, load_config
from xpsr.data.images import save_png_atomic
from xpsr.metrics.evaluate import evaluate, markdown_table
from xpsr.metrics.weights import MissingMetricWeights


def _pair_dirs(tmp_path, n=3, size=48):
    rng = np.random.default_rng(0)
    for i in range(n):
        hr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        sr = np.clip(hr.astype(int) + rng.integers(-20, 20, hr.shape), 0, 255).astype(np.uint8)
        save_png_atomic(hr, tmp_path / "hr" / f"img{i}.png")
        save_png_atomic(sr, tmp_path / "sr" / f"img{i}.png")
    return tmp_path / "sr", tmp_path / "hr"


def _cfg(tmp_path, sr, hr, **kw):
    args = [f"sr={sr}", f"hr={hr}", f"output_dir={tmp_path / 'eval'}", "device=cpu", f"weights_dir={tmp_path / 'w'}"]
    args += [f"{k}={v}" for k, v in kw.items()]
    return load_config(EvalConfig, None, args)


def _y(img):
    from skimage.color import rgb2ycbcr

    return rgb2ycbcr(img)[..., 0]


def test_psnr_ssim_match_scikit_image_on_the_y_channel(tmp_path):
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    sr_dir, hr_dir = _pair_dirs(tmp_path)
    summary = evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[psnr,ssim]"))
    psnrs, ssims = [], []
    for i in range(3):
        sr = np.asarray(Image.open(sr_dir / f"img{i}.png"))
        hr = np.asarray(Image.open(hr_dir / f"img{i}.png"))
        y_sr, y_hr = _y(sr), _y(hr)
        psnrs.append(peak_signal_noise_ratio(y_hr, y_sr, data_range=255))
        ssims.append(structural_similarity(y_hr, y_sr, data_range=255, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False))
    assert abs(summary["psnr"] - np.mean(psnrs)) < 1e-4  # only pyiqa's 1e-8 guard on the MSE differs (2e-5 dB)
    assert abs(summary["ssim"] - np.mean(ssims)) < 1e-4  # ours on Y rounded to integers, as pyiqa does


def test_outputs_and_per_image_cache(tmp_path):
    sr_dir, hr_dir = _pair_dirs(tmp_path)
    evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[psnr]"))
    out = tmp_path / "eval"
    cache = json.loads((out / "metrics_cache.json").read_text())
    assert len(cache) == 3
    summary = evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[psnr,ssim]"))
    assert len(json.loads((out / "metrics_cache.json").read_text())) == 6  # only ssim was added
    assert set(summary) >= {"psnr", "ssim", "settings"} and summary["settings"]["images"] == 3
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "image,psnr,ssim" and len(csv_lines) == 4
    assert "PSNR ↑" in (out / "table.md").read_text()


def test_pairing_errors_are_clear(tmp_path):
    sr_dir, hr_dir = _pair_dirs(tmp_path)
    save_png_atomic(np.zeros((40, 40, 3), np.uint8), hr_dir / "img1.png")
    with pytest.raises(ValueError, match="size mismatch: SR img1.png"):
        evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[psnr]"))
    save_png_atomic(np.zeros((48, 48, 3), np.uint8), hr_dir / "extra.png")
    with pytest.raises(ValueError, match="3 SR images"):
        evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[psnr]"))


def test_missing_learned_weights_name_metric_file_and_folder(tmp_path):
    sr_dir, hr_dir = _pair_dirs(tmp_path, n=1)
    with pytest.raises(MissingMetricWeights) as e:
        evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[musiq]"))
    msg = str(e.value)
    assert "'musiq'" in msg and "musiq_koniq_ckpt" in msg and str(tmp_path / "w") in msg


def test_learned_metric_runs_from_local_placeholder_weights(tmp_path):
    """The real MUSIQ code path with weights read from our folder (placeholder values made here)."""
    import pyiqa

    placeholder = pyiqa.create_metric("musiq", pretrained=False, device="cpu").net.state_dict()
    (tmp_path / "w").mkdir()
    torch.save(placeholder, tmp_path / "w" / "musiq_koniq_ckpt-e95806b9.pth")
    sr_dir, hr_dir = _pair_dirs(tmp_path, n=2, size=64)
    summary = evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[musiq]"))
    assert np.isfinite(summary["musiq"]) and "KonIQ" in summary["settings"]["variants"]["musiq"]


def test_markdown_table_marks_direction():
    table = markdown_table({"ours": {"psnr": 24.1, "lpips": 0.3}}, ["psnr", "lpips"])
    assert "PSNR ↑" in table and "LPIPS ↓" in table and "| ours | 24.10 | 0.3000 |" in table


@pytest.mark.parametrize("metric, filename", [
    ("maniqa", "ckpt_koniq10k.pt"), ("maniqa-pipal", "MANIQA_PIPAL-ae6d356b.pth"), ("clipiqa", "RN50.pt")])
def test_learned_metrics_never_touch_the_network(tmp_path, monkeypatch, metric, filename):
    """MANIQA's timm backbone and CLIP-IQA's CLIP archive used to be fetched by their own downloaders."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"{metric} tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    sr_dir, hr_dir = _pair_dirs(tmp_path, n=1)
    with pytest.raises(MissingMetricWeights) as e:
        evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics=f"[{metric}]"))
    assert f"'{metric}'" in str(e.value) and filename in str(e.value) and str(tmp_path / "w") in str(e.value)


def test_clip_archive_with_the_wrong_checksum_is_refused(tmp_path):
    sr_dir, hr_dir = _pair_dirs(tmp_path, n=1)
    (tmp_path / "w").mkdir(exist_ok=True)
    (tmp_path / "w" / "RN50.pt").write_bytes(b"not the CLIP archive")
    with pytest.raises(ValueError, match="sha256"):
        evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[clipiqa]"))


def test_unknown_metric_is_refused(tmp_path):
    sr_dir, hr_dir = _pair_dirs(tmp_path, n=1)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(_cfg(tmp_path, sr_dir, hr_dir, metrics="[maniqa-imaginary]"))
