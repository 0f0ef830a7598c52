"""Inference as the official test script, each item against a hand computation of the official formula
(``myutils/wavelet_color_fix.py``, ``pipelines/pipeline_xpsr.py``, ``test.py``), written here in numpy."""
import numpy as np
import pytest
import torch
from conftest import REPO, tiny_config

from xpsr.config import InferConfig, load_config
from xpsr.inference.color import adain_color_fix, fix_colors, round_to_8bit, truncate_to_8bit, wavelet_color_fix
from xpsr.inference.pipeline import make_scheduler, start_latents, super_resolve
from xpsr.models.build import build_xpsr


@pytest.fixture(scope="module")
def modules():
    m = build_xpsr(tiny_config())
    for x in (m.unet, m.controlnet, m.vae, m.text_encoder):
        x.eval()
    return m


def _cfg(**kw):
    base = {"input": "x", "output_dir": "y", "num_inference_steps": 3, "process_size": 32, "device": "cpu"}
    base.update(kw)
    return load_config(InferConfig, None, [f"{k}={v}" for k, v in base.items()])


def _adain_by_hand(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """calc_mean_std: per channel, mean and sqrt(unbiased variance + 1e-5); then AdaIN; then clamp to [0, 1]."""
    out = np.empty_like(content)
    for c in range(content.shape[0]):
        stats = []
        for x in (content[c], style[c]):
            n = x.size
            mean = x.sum() / n
            stats.append((mean, np.sqrt(((x - mean) ** 2).sum() / (n - 1) + 1e-5)))
        (c_mean, c_std), (s_mean, s_std) = stats
        out[c] = (content[c] - c_mean) / c_std * s_std + s_mean
    return np.clip(out, 0, 1)


def _wavelet_by_hand(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """wavelet_reconstruction: 5 levels of the 3x3 kernel [1 2 1; 2 4 2; 1 2 1]/16 with dilation (= replicate
    padding) 1, 2, 4, 8, 16; high = sum of each level's (input - blur); the content's high + the style's low."""
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16

    def blur(x, d):
        padded = np.pad(x, ((0, 0), (d, d), (d, d)), mode="edge")
        h, w = x.shape[1:]
        out = np.zeros_like(x)
        for i in range(3):
            for j in range(3):
                out += kernel[i, j] * padded[:, i * d:i * d + h, j * d:j * d + w]
        return out

    def split(x):
        high = np.zeros_like(x)
        for level in range(5):
            low = blur(x, 2**level)
            high += x - low
            x = low
        return high, x

    return np.clip(split(content)[0] + split(style)[1], 0, 1)


def test_adain_is_the_official_calc_mean_std():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 20, 28, generator=g)
    for sr in (torch.rand(1, 3, 20, 28, generator=g) * 0.6 + 0.2,
               0.5 + 0.01 * torch.rand(1, 3, 20, 28, generator=g)):  # low contrast: where the eps placement shows
        expected = _adain_by_hand(sr[0].double().numpy(), ref[0].double().numpy())
        # float32 vs float64 (the low-contrast case divides by a std of ~0.004); eps added to the std instead
        # of the variance would be off by up to ~0.1 there
        np.testing.assert_allclose(adain_color_fix(sr, ref)[0].numpy(), expected, atol=1e-5, rtol=0)


def test_wavelet_is_the_official_wavelet_reconstruction():
    g = torch.Generator().manual_seed(1)
    sr, ref = torch.rand(1, 3, 24, 40, generator=g), torch.rand(1, 3, 24, 40, generator=g) * 0.5 + 0.4
    expected = _wavelet_by_hand(sr[0].double().numpy(), ref[0].double().numpy())
    assert ((expected == 0) | (expected == 1)).any()  # the clamp matters here
    np.testing.assert_allclose(wavelet_color_fix(sr, ref)[0].numpy(), expected, atol=2e-6, rtol=0)


def test_8bit_conversions_round_then_truncate():
    k = torch.tensor([0.0, 10, 10, 200, 254, 255])
    x = (k + torch.tensor([0.0, 0.3, 0.7, 0.5, 0.99, 0.0])) / 255  # 200.5 rounds to even: 200
    assert torch.equal(round_to_8bit(x) * 255, torch.tensor([0.0, 10, 11, 200, 255, 255]).div(255) * 255)
    assert torch.equal(truncate_to_8bit(x) * 255, torch.tensor([0.0, 10, 10, 200, 254, 255]).div(255) * 255)
    assert torch.equal(truncate_to_8bit(round_to_8bit(x)), round_to_8bit(x))  # k/255 truncates back to k


def _official_8bit_chain(sr: np.ndarray, ref_u8: np.ndarray) -> np.ndarray:
    """test.py: pipeline PIL output ((x * 255).round()), ToTensor (/255), AdaIN, clamp, ToPILImage (x * 255,
    truncated). Returns the uint8 result and the float values it was truncated from."""
    sr_u8 = np.round(sr * 255)
    fixed = _adain_by_hand(sr_u8 / 255, ref_u8 / 255) * 255
    return np.floor(fixed), fixed


def test_8bit_color_fix_is_the_official_sequence_in_the_pipeline(modules, monkeypatch):
    import xpsr.inference.pipeline as pipe

    decoded = []
    real = pipe.vae_decode
    monkeypatch.setattr(pipe, "vae_decode", lambda *a, **k: decoded.append(real(*a, **k)) or decoded[-1])
    lr = np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    cfg = _cfg(color_fix_8bit=True, num_inference_steps=1)
    out = super_resolve(modules, lr, "", "noisy", cfg, torch.device("cpu"))
    ref_u8 = pipe.condition_image(lr, cfg, torch.device("cpu"))[0].double().numpy() * 255
    sr = ((decoded[-1][0].double().numpy() + 1) / 2).clip(0, 1)
    expected, fixed = _official_8bit_chain(sr, np.round(ref_u8))
    got = out.transpose(2, 0, 1).astype(np.float64)
    # float32 here vs float64 there: a value within 1e-3 of an integer may truncate either way (0 and 255 are
    # clamped values, exact in both)
    near_integer = (np.abs(fixed - np.round(fixed)) < 1e-3) & (fixed > 0) & (fixed < 255)
    assert (got[~near_integer] == expected[~near_integer]).all() and near_integer.mean() < 0.01
    assert (np.round(fixed) != expected).mean() > 0.2  # truncation, not rounding, was applied


def test_8bit_switch_only_changes_the_colour_fix_io():
    g = torch.Generator().manual_seed(2)
    sr, ref = torch.rand(1, 3, 8, 8, generator=g), torch.rand(1, 3, 8, 8, generator=g)
    assert torch.equal(fix_colors(sr, ref, "adain", False), adain_color_fix(sr, ref))
    assert torch.equal(fix_colors(sr, ref, "wavelet", True),
                       truncate_to_8bit(wavelet_color_fix(round_to_8bit(sr), ref)))
    assert torch.equal(fix_colors(sr, ref, "none", True), round_to_8bit(sr))


def test_lr_latent_sample_is_the_official_posterior_sample_in_the_official_draw_order(modules):
    scheduler = make_scheduler("ddpm", modules.scheduler.config)
    scheduler.set_timesteps(5)
    lr = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    cfg = _cfg(start_from="lr", lr_latent="sample", vae_tile=0)
    latents, _ = start_latents(modules, lr, scheduler, scheduler.timesteps, cfg, torch.Generator().manual_seed(3),
                               torch.device("cpu"))
    again, _ = start_latents(modules, lr, scheduler, scheduler.timesteps, cfg, torch.Generator().manual_seed(3),
                             torch.device("cpu"))
    assert torch.equal(latents, again)  # the same seed gives the same bytes

    # prepare_latents: vae.encode(image * 2 - 1).latent_dist.sample(generator) * scaling_factor, then two
    # add_noise calls, each with a fresh randn from the same generator, in that order
    with torch.no_grad():
        moments = modules.vae.encode(lr * 2 - 1).latent_dist.parameters.double().numpy()
    mean, logvar = moments[:, :4], np.clip(moments[:, 4:], -30, 20)
    g = torch.Generator().manual_seed(3)
    eps, n1, n2 = (torch.randn(1, 4, 4, 6, generator=g).double().numpy() for _ in range(3))
    z = (mean + np.exp(0.5 * logvar) * eps) * modules.vae.config.scaling_factor
    ab = scheduler.alphas_cumprod.double().numpy()
    t0 = int(scheduler.timesteps[0])
    expected = np.sqrt(ab[800]) * (np.sqrt(ab[t0]) * z + np.sqrt(1 - ab[t0]) * n1) + np.sqrt(1 - ab[800]) * n2
    np.testing.assert_allclose(latents.double().numpy(), expected, atol=1e-5, rtol=0)

    mean_start, _ = start_latents(modules, lr, scheduler, scheduler.timesteps, _cfg(lr_latent="mean", vae_tile=0),
                                  torch.Generator().manual_seed(3), torch.device("cpu"))
    assert not torch.allclose(mean_start, latents, atol=1e-3)


def test_tiled_posterior_sample_equals_the_untiled_draw(modules):
    """The tiled encoder gives the untiled posterior (whole-image GroupNorm statistics), and the sample is
    mean + std * eps with eps drawn once over the whole latent (the official ``latent_dist.sample``)."""
    from xpsr.inference.pipeline import lr_latents

    lr = torch.rand(1, 3, 64, 256, generator=torch.Generator().manual_seed(5))  # > 208 px: tiles of 32
    vae, sf = modules.vae, modules.vae.config.scaling_factor
    with torch.no_grad():
        whole = lr_latents(modules, lr, _cfg(lr_latent="sample", vae_tile=0), torch.Generator().manual_seed(1))
        tiled = lr_latents(modules, lr, _cfg(lr_latent="sample", vae_tile=32), torch.Generator().manual_seed(1))
        dist = vae.encode(lr * 2 - 1).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(whole, (dist.mean + dist.std * eps) * sf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=1e-4)


def test_official_config_selects_the_official_behaviour():
    cfg = load_config(InferConfig, REPO / "configs" / "infer" / "xpsr_official.yaml", ["input=x", "output_dir=y"])
    from xpsr.inference.trained_settings import TrainedSettings, resolve_settings

    # lr_latent is left to the weights (a one-step student's own); the sampler's is the official posterior sample
    assert resolve_settings(cfg, TrainedSettings()).lr_latent == "sample" and cfg.color_fix_8bit
    assert cfg.color_fix == "adain"
    assert InferConfig(input="x", output_dir="y").color_fix_8bit is False  # truncation is an official quirk
