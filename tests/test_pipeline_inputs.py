"""Images as diffusers users pass them to XPSRPipeline: every accepted form and range gives the bytes of the PIL
image (torchvision's uint8 CHW tensors, [-1, 1] tensors, [0, 255] float arrays, batches and lists), and every
form that would be guessed is refused with a message naming the range found (issue 15, wrong results 1)."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from xpsr.inference.image_inputs import ImageRangeError, to_uint8_images, to_uint8_rgb

CALL = {"num_inference_steps": 2, "process_size": 64, "scheduler": "ddim"}


def _rgb(seed=0, h=16, w=12):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chw(a):  # what torchvision.io.read_image returns for an RGB file: uint8 (3, H, W)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def test_torchvision_read_image_output_is_taken_as_8_bit_levels(tmp_path):
    from torchvision.io import read_image

    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    tensor = read_image(str(tmp_path / "a.png"))
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 16, 12)
    assert np.array_equal(to_uint8_rgb(tensor), a)
    assert np.array_equal(to_uint8_rgb(tmp_path / "a.png"), a)


def test_every_accepted_range_gives_the_pil_bytes():
    a = _rgb()
    pil = to_uint8_rgb(Image.fromarray(a))
    unit = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    with pytest.warns(UserWarning, match=r"read as \[-1, 1\]"):
        signed = to_uint8_rgb(unit * 2 - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the other ranges are not guesses: no warning
        forms = {"uint8 array": a, "uint8 tensor": _chw(a), "[0, 1] tensor": unit, "[0, 1] fp16 tensor": unit.half(),
                 "[0, 1] float array": a / 255.0, "[0, 255] float array": a.astype(np.float32),
                 "[0, 255] float64 tensor": _chw(a).double(), "int64 levels": a.astype(np.int64)}
        for name, x in forms.items():
            assert np.array_equal(to_uint8_rgb(x), pil), name
    assert np.array_equal(signed, pil)
    gray = a[..., 0]
    assert np.array_equal(to_uint8_rgb(torch.from_numpy(gray)[None]), np.repeat(gray[..., None], 3, axis=2))


def test_batches_and_lists_are_read_in_one_range():
    a, b = _rgb(0), _rgb(1)
    nchw = torch.stack([_chw(a), _chw(b)])
    assert all(np.array_equal(x, y) for x, y in zip(to_uint8_images(nchw), [a, b]))
    assert all(np.array_equal(x, y) for x, y in zip(to_uint8_images(np.stack([a, b])), [a, b]))
    bright = np.full((16, 12, 3), 200, np.uint8)  # in [-1, 1] it is 0.57 everywhere: alone it would read as [0, 1]
    batch = torch.stack([_chw(a), _chw(bright)]).float() / 127.5 - 1
    with pytest.warns(UserWarning):
        out = to_uint8_images([batch[0], batch[1]])
    assert np.array_equal(out[0], a) and np.array_equal(out[1], bright)
    assert len(to_uint8_images([nchw, Image.fromarray(a), a])) == 4


@pytest.mark.parametrize("data, found", [
    (np.full((4, 4, 3), 1.5, np.float32) + np.arange(3, dtype=np.float32) * 0.25, r"\[1\.5, 2\]"),  # fractions > 1
    (np.linspace(-2, 1, 48, dtype=np.float32).reshape(4, 4, 3), r"\[-2, 1\]"),
    (np.full((4, 4, 3), 300.0), r"\[300, 300\]"),
    (np.array([[[0.5, np.nan, 0.2]]]), "NaN"),
    (np.full((4, 4, 3), 1000, np.uint16), r"\[1000, 1000\]"),
    (np.zeros((4, 4, 3), bool), "bool"),
])
def test_ambiguous_or_out_of_range_data_is_refused_naming_the_range(data, found):
    with pytest.raises(ImageRangeError, match=found) as e:
        to_uint8_rgb(torch.from_numpy(data).permute(2, 0, 1) if data.dtype == np.uint16 else data)
    assert "float in [0, 1]" in str(e.value)  # the accepted ranges are named too


def test_layout_mistakes_are_named():
    with pytest.raises(ValueError, match=r"HWC tensor: permute\(2, 0, 1\)"):
        to_uint8_rgb(torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"CHW array"):
        to_uint8_rgb(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="empty list"):
        to_uint8_images([])


def test_the_pipeline_gives_the_same_bytes_for_a_read_image_tensor_and_the_pil_image(make_tiny):
    from xpsr.inference.diffusers_pipeline import XPSRPipeline

    pipe = XPSRPipeline.from_modules(make_tiny())
    a = _rgb(h=16, w=16)
    from_pil = pipe(Image.fromarray(a), output_type="np", **CALL).images
    from_tensors = pipe(torch.stack([_chw(a), _chw(a)]), output_type="np", **CALL).images
    assert np.array_equal(from_tensors[0], from_pil[0]) and np.array_equal(from_tensors[1], from_pil[0])
    with pytest.raises(ImageRangeError, match="fit no accepted range"):
        pipe(a.astype(np.float32) + 0.5, **CALL)
