"""Real-ESRGAN kernels and degradations: golden kernels/USM, branches, determinism, ranges."""
import json

import numpy as np
import pytest
import torch
from conftest import DATA
from safetensors.numpy import load_file

from xpsr.config import DegradationConfig
from xpsr.data import kernels as K
from xpsr.data.degradations import (
    add_gaussian_noise,
    add_poisson_noise,
    degrade,
    resize_by_factor,
    sample_degradation,
    sample_shared_draws,
    second_stage_size,
    usm_sharpen,
)
from xpsr.data.jpeg import jpeg

REF = DATA / "golden" / "realesrgan"
SPEC = json.loads((REF / "realesrgan_reference.json").read_text())
ARRAYS = load_file(str(REF / "realesrgan_reference.safetensors"))
BUILDERS = {
    "bivariate_Gaussian": lambda s: K.gaussian_kernel(s["kernel_size"], s["sig_x"], s["sig_y"], s["theta"],
                                                      s["isotropic"]),
    "bivariate_generalized_Gaussian": lambda s: K.generalized_gaussian_kernel(
        s["kernel_size"], s["sig_x"], s["sig_y"], s["theta"], s["beta"], s["isotropic"]),
    "bivariate_plateau": lambda s: K.plateau_kernel(s["kernel_size"], s["sig_x"], s["sig_y"], s["theta"], s["beta"],
                                                    s["isotropic"]),
    "circular_lowpass_kernel": lambda s: K.sinc_kernel(s["cutoff"], s["kernel_size"], s.get("pad_to", 0)),
}


@pytest.mark.parametrize("name", [k for k in SPEC if k != "usm"])
def test_kernels_reproduce_basicsr(name):
    spec = SPEC[name]
    kernel = BUILDERS[spec["function"]](spec)
    assert kernel.shape == ARRAYS[name].shape
    assert np.abs(kernel - ARRAYS[name]).max() <= 1e-7
    assert abs(kernel.sum() - 1) < 1e-12


def test_usm_reproduces_basicsr():
    spec = SPEC["usm"]
    out = usm_sharpen(ARRAYS["usm_input"], spec["weight"], spec["radius"], spec["threshold"])
    assert np.abs(out - ARRAYS["usm_output"]).max() <= 1e-5


def test_sampled_kernels_sum_to_one_and_are_padded():
    rng = np.random.default_rng(0)
    cfg = DegradationConfig()
    kinds = set()
    for _ in range(200):
        p = sample_degradation(cfg, rng)["stage1"]["blur"]
        k = K.build_kernel(p)
        kinds.add(p["kind"])
        assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-9
        assert p["kind"] == "sinc" or (k >= 0).all()  # only sinc kernels ring below zero
    assert {"iso", "aniso", "sinc"} <= kinds


def _hr(size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bicubic").clamp(0, 1)


def test_same_seed_same_bytes_different_seed_different():
    cfg, hr = DegradationConfig(), _hr()
    a = degrade(hr, sample_degradation(cfg, np.random.default_rng(5)), 4)
    b = degrade(hr, sample_degradation(cfg, np.random.default_rng(5)), 4)
    c = degrade(hr, sample_degradation(cfg, np.random.default_rng(6)), 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sample_degradation(cfg, np.random.default_rng(5)) == sample_degradation(cfg, np.random.default_rng(5))


def test_output_size_range_and_dtype():
    hr = _hr(96)
    for seed in range(8):
        lr = degrade(hr, sample_degradation(DegradationConfig(), np.random.default_rng(seed)), 4)
        assert lr.shape == (1, 3, 24, 24) and lr.dtype == torch.float32
        assert lr.min() >= 0 and lr.max() <= 1
        assert torch.equal(lr, (lr * 255).round() / 255)  # quantised like a saved 8-bit image
    with pytest.raises(ValueError, match="expected"):
        degrade(hr[:, :1], sample_degradation(DegradationConfig(), np.random.default_rng(0)), 4)


def _only(**changes) -> DegradationConfig:
    """A degradation with every branch off except what ``changes`` turns on."""
    cfg = DegradationConfig(second_order_prob=0.0, final_sinc_prob=0.0)
    cfg.stage1.blur_prob, cfg.stage1.jpeg_prob, cfg.stage2.jpeg_prob = 0.0, 0.0, 0.0
    cfg.stage1.resize_prob = [0.0, 0.0, 1.0]
    cfg.stage1.gaussian_noise_prob, cfg.stage1.noise_range = 1.0, [0.0, 0.0]
    for key, value in changes.items():
        obj = cfg
        *path, last = key.split("__")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg


@pytest.mark.parametrize("branch, change", [
    ("stage1.blur", {"stage1__blur_prob": 1.0}),
    ("stage1.noise", {"stage1__noise_range": [20.0, 20.0]}),
    ("stage1.jpeg", {"stage1__jpeg_prob": 1.0}),
    ("stage2", {"second_order_prob": 1.0}),
    ("final.sinc", {"final_sinc_prob": 1.0}),
    ("final.jpeg", {"stage2__jpeg_prob": 1.0}),
])
def test_each_branch_can_be_forced_and_has_an_effect(branch, change):
    hr = _hr(64)
    rng_seed = 3
    off = sample_degradation(_only(), np.random.default_rng(rng_seed))
    on = sample_degradation(_only(**change), np.random.default_rng(rng_seed))
    assert off["stage1"]["blur"] is None and off["stage2"] is None and off["final"]["sinc"] is None
    assert off["stage1"]["jpeg"] is None and off["final"]["jpeg"] is None
    assert off != on
    assert not torch.equal(degrade(hr, off, 4), degrade(hr, on, 4)), branch


def test_resize_direction_follows_probabilities():
    cfg = DegradationConfig()
    cfg.stage1.resize_prob = [0.0, 1.0, 0.0]
    rng = np.random.default_rng(0)
    factors = [sample_degradation(cfg, rng)["stage1"]["resize"]["factor"] for _ in range(50)]
    assert all(0.15 <= f <= 1 for f in factors)


@pytest.mark.parametrize("codec", ["torch", "opencv"])
def test_jpeg_error_falls_as_quality_rises(codec):
    img = _hr(64, seed=1) * 0.8 + torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.2
    errors = [(jpeg(img, q, codec) - img).abs().mean().item() for q in (10, 30, 50, 70, 90)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_noise_kinds_and_gray_noise():
    hr = _hr(64)
    for kind_prob, gray in ((1.0, True), (1.0, False), (0.0, True), (0.0, False)):
        cfg = _only(stage1__gaussian_noise_prob=kind_prob, stage1__gray_noise_prob=1.0 if gray else 0.0,
                    stage1__noise_range=[25.0, 25.0], stage1__poisson_scale_range=[3.0, 3.0])
        p = sample_degradation(cfg, np.random.default_rng(0))
        lr = degrade(hr, p, 1)
        diff = lr - (hr * 255).round() / 255
        assert diff.abs().mean() > 0.01
        channel_spread = (diff[:, 0] - diff[:, 1]).abs().mean().item()
        if gray and kind_prob == 1.0:
            assert channel_spread < 0.01  # same noise in every channel (up to clipping)
        if not gray:
            assert channel_spread > 0.01


def test_tiny_images_survive_every_degradation():
    """Small crops shrink below the kernel size after a strong down-resize; nothing may fail."""
    cfg = DegradationConfig()
    cfg.stage1.resize_prob = [0.0, 1.0, 0.0]
    for seed in range(20):
        lr = degrade(_hr(32, seed), sample_degradation(cfg, np.random.default_rng(seed)), 4)
        assert lr.shape == (1, 3, 8, 8) and torch.isfinite(lr).all()


def _bilinear_by_factor(img: np.ndarray, factor: float) -> np.ndarray:
    """Hand computation of torch's bilinear resize with a scale factor (align_corners=False), float64 (C, H, W)."""
    def axis(n_in):
        n_out = int(np.floor(n_in * factor))
        src = np.maximum((np.arange(n_out) + 0.5) / factor - 0.5, 0)  # the factor itself maps coordinates
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    (r0, r1, ry), (c0, c1, cx) = axis(img.shape[1]), axis(img.shape[2])
    rows = img[:, r0] * (1 - ry)[None, :, None] + img[:, r1] * ry[None, :, None]
    return rows[:, :, c0] * (1 - cx) + rows[:, :, c1] * cx


def test_stage1_resizes_by_scale_factor_like_the_official():
    """Official stage 1: F.interpolate(scale_factor=f): size floor(H*f), coordinates mapped with f (not out/in)."""
    img = torch.rand(1, 3, 50, 47, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = resize_by_factor(img, 0.37, "bilinear")
    expected = _bilinear_by_factor(img[0].numpy(), 0.37)
    assert out.shape[-2:] == (18, 17) == expected.shape[-2:]
    assert np.abs(out[0].numpy() - expected).max() < 1e-12
    by_size = torch.nn.functional.interpolate(img, size=(18, 17), mode="bilinear", align_corners=False)
    assert (by_size - out).abs().max() > 1e-3  # an explicit size maps coordinates differently
    for mode in ("area", "bicubic"):
        direct = torch.nn.functional.interpolate(img, scale_factor=0.37, mode=mode)
        assert torch.equal(resize_by_factor(img, 0.37, mode), direct)


def test_second_stage_size_is_computed_from_the_hr_size():
    assert second_stage_size(62, 512, 4, 0.97) == (int(62 / 4 * 0.97), int(512 / 4 * 0.97)) == (15, 124)
    assert second_stage_size(62, 62, 4, 0.97)[0] != int(62 // 4 * 0.97)  # 15 vs 14


def test_degrade_uses_the_stage1_factor_and_the_official_sizes():
    img = _hr(64).double()
    cfg = _only(stage1__resize_prob=[0.0, 1.0, 0.0], stage1__resize_modes=["bilinear"],
                stage2__resize_modes=["area"])
    params = sample_degradation(cfg, np.random.default_rng(0))
    f = params["stage1"]["resize"]["factor"]
    stage1 = torch.from_numpy(_bilinear_by_factor(img[0].numpy(), f))[None]
    expected = torch.nn.functional.interpolate(stage1, size=(16, 16), mode="area")
    got = degrade(img, params, 4)
    assert (got - (expected * 255).round() / 255).abs().max() <= 1 / 255 + 1e-9
    assert (got - (expected * 255).round() / 255).abs().mean() < 0.01 / 255


def test_gray_gaussian_noise_field_comes_from_its_own_seed():
    """The official draws one grey field per batch: two images with one gray_seed get the same field."""
    img = torch.full((1, 3, 32, 32), 0.5)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = add_gaussian_noise(img, 10.0, True, g1, gray_seed=7)
    b = add_gaussian_noise(img, 10.0, True, g2, gray_seed=7)
    c = add_gaussian_noise(img, 10.0, True, g2, gray_seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 0], a[:, 1])
    colour = add_gaussian_noise(img, 10.0, False, torch.Generator().manual_seed(1), gray_seed=7)
    assert not torch.equal(colour[:, 0], colour[:, 1])


def test_gray_poisson_noise_is_the_luma_noise_of_the_unclamped_image():
    """BasicSR: luma with torchvision's weights (0.2989, 0.587, 0.114) of the unclamped image, then quantised."""
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 16, 16, generator=g) * 1.2  # overshoots as a bicubic resize can
    got = add_poisson_noise(img, 2.0, True, torch.Generator().manual_seed(5))
    luma = (0.2989 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2])[:, None]
    q = (luma * 255).round().clamp(0, 255) / 255
    levels = 2.0 ** np.ceil(np.log2(len(torch.unique(q))))
    noise = torch.poisson(q * levels, generator=torch.Generator().manual_seed(5)) / levels - q
    assert torch.equal(got, (img + noise * 2.0).clamp(0, 1))


def test_shared_draws_are_used_and_the_rest_is_per_pair():
    cfg = DegradationConfig()
    shared = sample_shared_draws(cfg, np.random.default_rng(9))
    a = sample_degradation(cfg, np.random.default_rng(1), shared)
    b = sample_degradation(cfg, np.random.default_rng(2), shared)
    for p in (a, b):
        assert p["stage1"]["resize"] == shared["stage1"]["resize"] and p["final"]["mode"] == shared["final"]["mode"]
        assert p["final"]["jpeg_first"] == shared["final"]["jpeg_first"]
        assert (p["stage2"] is not None) == shared["second_order"]
    assert a["stage1"]["blur"] != b["stage1"]["blur"] and a["noise_seed"] != b["noise_seed"]
    assert isinstance(a["stage1"]["jpeg"], float)  # a float quality, as the official


def test_records_of_the_first_recipe_are_refused():
    params = sample_degradation(DegradationConfig(), np.random.default_rng(0))
    del params["version"]
    with pytest.raises(ValueError, match="version 1"):
        degrade(_hr(), params, 4)


def test_data_configs_degrade_the_sharpened_crop_with_the_torch_jpeg():
    from conftest import REPO

    from xpsr.config import PrepareConfig, load_config

    for name in ("xpsr.yaml", "realesrgan.yaml"):
        cfg = load_config(PrepareConfig, REPO / "configs" / "data" / name, allow_missing=True)
        d = cfg.degradation
        assert d.usm_gt and d.degrade_sharpened and d.jpeg_codec == "torch" and cfg.share_draws_every == 1
