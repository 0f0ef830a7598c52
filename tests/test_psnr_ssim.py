"""Our Y-channel PSNR/SSIM: the BT.601 formula, an independent float64 reference, and agreement with pyiqa.

Against pyiqa (the metrics extra), what is left is pyiqa's float32 arithmetic, pinned piece by piece:
PSNR within 1e-5 dB (pyiqa's is float32 end to end; measured up to 4.3e-6 dB over 52 pairs); rounded Y equal
except at colours within 4e-5 of a half-integer (its float32 conversion rounds 143 of the 16.7M colours the
other way); SSIM from the same Y within 1e-6 (pyiqa's window is stored in float32; measured 2e-7); SSIM end
to end within 3e-5 (the JPEG'd chelsea below has a few of those colours: 6.9e-6).
"""
import cv2
import numpy as np
import pytest
import skimage.data
import torch

from xpsr.metrics.psnr_ssim import psnr_y, ssim_of_planes, ssim_y, y_channel

PYIQA_PSNR_TOL_DB = 1e-5
PYIQA_SSIM_SAME_Y_TOL = 1e-6
PYIQA_SSIM_TOL = 3e-5


def _degrade(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Downscale x4, bicubic back up, noise, JPEG 70: a realistic SR-like image (HxWx3 uint8 RGB)."""
    h, w = hr.shape[:2]
    lr = cv2.resize(hr, (max(w // 4, 1), max(h // 4, 1)), interpolation=cv2.INTER_AREA)
    up = cv2.resize(lr, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 3, hr.shape)
    ok, buf = cv2.imencode(".jpg", np.clip(np.round(up), 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 70])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def _pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    chelsea, astronaut = np.asarray(skimage.data.chelsea()), np.asarray(skimage.data.astronaut())
    odd, near = astronaut[101:138, 203:256], astronaut[40:160, 180:340]  # 53x37, 160x120
    noise = rng.integers(0, 256, (31, 97, 3), dtype=np.uint8)
    return {
        "chelsea 451x300, JPEG'd": (_degrade(chelsea, rng), chelsea),
        "astronaut 53x37": (_degrade(odd, rng), odd),
        "astronaut 160x120, +-1 noise (~55 dB)": (
            np.clip(near.astype(int) + rng.integers(-1, 2, near.shape), 0, 255).astype(np.uint8), near),
        "noise 97x31": (np.clip(noise.astype(int) + rng.integers(-20, 20, noise.shape), 0, 255).astype(np.uint8),
                        noise),
        "inverted 53x37 (SSIM's clipped term)": (255 - odd, odd),
    }


def test_y_channel_is_bt601_in_16_235():
    from skimage.color import rgb2ycbcr

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 204, 68], [2, 44, 141],
                  [128, 128, 128]]
    hand = 16 + (65.481 * img[..., 0] + 128.553 * img[..., 1] + 24.966 * img[..., 2]) / 255.0
    exact = y_channel(img, rounded=False)
    np.testing.assert_allclose(exact, hand, rtol=0, atol=1e-11)
    np.testing.assert_allclose(exact, rgb2ycbcr(img)[..., 0], rtol=0, atol=1e-11)
    assert exact[0, 0] == 16 and exact[0, 1] == 235
    rounded = y_channel(img, rounded=True)
    assert np.all(np.abs(rounded - exact) <= 0.5) and np.all(rounded == np.round(rounded))
    # (0, 204, 68) and (2, 44, 141) sit exactly on 125.5 and 52.5: halves go up, as MATLAB's uint8 rounding
    assert exact[0, 5] == 125.5 and rounded[0, 5] == 126 and exact[0, 6] == 52.5 and rounded[0, 6] == 53


def test_psnr_and_ssim_equal_an_independent_float64_computation():
    """PSNR by hand on scikit-image's Y; SSIM from scikit-image's SSIM map (Gaussian 1.5, population variances)
    on our rounded Y, its values clipped at 0 and averaged where the window fits (pyiqa clips the
    contrast-structure term, and the luminance term is positive, so clipping the product is the same)."""
    from skimage.color import rgb2ycbcr
    from skimage.metrics import structural_similarity

    for name, (sr, hr) in _pairs().items():
        for border in (0, 4):
            crop = (slice(border, -border or None),) * 2
            mse = np.mean((rgb2ycbcr(sr[crop])[..., 0] - rgb2ycbcr(hr[crop])[..., 0]) ** 2)
            expected_psnr = 10 * np.log10(255.0**2 / (mse + 1e-8 * 255.0**2))
            assert psnr_y(sr, hr, border) == pytest.approx(expected_psnr, abs=1e-9), name
            _, ssim_map = structural_similarity(y_channel(sr[crop], True), y_channel(hr[crop], True), data_range=255,
                                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                full=True)
            expected_ssim = np.maximum(ssim_map[5:-5, 5:-5], 0).mean()
            assert ssim_y(sr, hr, border) == pytest.approx(expected_ssim, abs=1e-10), name


def _official_y(img: np.ndarray) -> torch.Tensor:
    """Y as the official test.py computes it: float32 [0, 1] RGB times the BT.601 row, + 16, / 255, then float64."""
    rgb = torch.from_numpy((img / 255.0).astype(np.float32))
    luma = torch.tensor([[65.481], [128.553], [24.966]])
    return ((rgb @ luma + 16.0) / 255.0).permute(2, 0, 1)[None].to(torch.float64)


@pytest.mark.parametrize("crop_border", [0, 4])
def test_psnr_and_ssim_agree_with_pyiqa(crop_border):
    """pyiqa's `psnr`/`ssim` with the options `xpsr eval` used to pass them, and the official test.py's route (its
    own Y plane into pyiqa's default `psnr`/`ssim`: unrounded for PSNR, rounded by pyiqa's SSIM)."""
    import pyiqa
    from pyiqa.utils.color_util import to_y_channel

    opts = {"test_y_channel": True, "color_space": "ycbcr", "crop_border": crop_border}
    pyiqa_psnr = pyiqa.create_metric("psnr", device="cpu", **opts)
    pyiqa_ssim = pyiqa.create_metric("ssim", device="cpu", **opts)
    default_psnr, default_ssim = pyiqa.create_metric("psnr", device="cpu"), pyiqa.create_metric("ssim", device="cpu")

    def tensor(img):
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div(255)

    def pyiqa_rounded_y(img):
        return to_y_channel(tensor(img), 255, "ycbcr")[0, 0].round().double().numpy()

    seen = set()
    for name, (sr, hr) in _pairs().items():
        ours_psnr, ours_ssim = psnr_y(sr, hr, crop_border), ssim_y(sr, hr, crop_border)
        assert abs(ours_psnr - pyiqa_psnr(tensor(sr), tensor(hr)).item()) < PYIQA_PSNR_TOL_DB, name
        theirs_ssim = pyiqa_ssim(tensor(sr), tensor(hr)).item()
        assert abs(ours_ssim - theirs_ssim) < PYIQA_SSIM_TOL, name
        crop = (slice(crop_border, -crop_border or None),) * 2
        y_sr, y_hr = pyiqa_rounded_y(sr[crop]), pyiqa_rounded_y(hr[crop])
        for img, theirs in ((sr[crop], y_sr), (hr[crop], y_hr)):
            exact = y_channel(img, rounded=False)
            differ = y_channel(img, rounded=True) != theirs
            assert np.all(np.abs(exact[differ] % 1 - 0.5) < 4e-5), name  # only colours next to a half-integer
        assert abs(ssim_of_planes(y_sr, y_hr) - theirs_ssim) < PYIQA_SSIM_SAME_Y_TOL, name
        if crop_border == 0:  # the official test.py's own route: its float32 Y plane into pyiqa's default metrics
            official_sr, official_hr = _official_y(sr), _official_y(hr)
            assert abs(ours_psnr - default_psnr(official_sr, official_hr).item()) < PYIQA_PSNR_TOL_DB, name
            assert abs(ours_ssim - default_ssim(official_sr, official_hr).item()) < PYIQA_SSIM_TOL, name
        seen.add((round(ours_psnr, 2), round(ours_ssim, 3)))
    assert len(seen) == len(_pairs())  # the cases really differ (nothing trivially equal)


def test_identical_and_anti_correlated_images():
    img = np.asarray(skimage.data.chelsea())[:40, :60]
    assert psnr_y(img, img) == pytest.approx(80.0, abs=1e-12)  # the 1e-8 MSE guard, not infinity
    assert ssim_y(img, img) == pytest.approx(1.0, abs=1e-12)
    noise = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim_y(255 - noise, noise) == 0.0  # every window anti-correlated: clipped to 0, not negative


def test_bad_inputs_are_refused_clearly():
    img = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 11x11 pixels after crop_border=5, got 20x10"):
        ssim_y(img, img, crop_border=5)
    with pytest.raises(ValueError, match="crop_border=10 leaves nothing of a 30x20 image"):
        psnr_y(img, img, crop_border=10)
    with pytest.raises(ValueError, match="differ in size"):
        psnr_y(img, img[:, :29])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        ssim_y(img.astype(np.float32), img.astype(np.float32))
