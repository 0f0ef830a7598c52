"""Low-VRAM inference (xpsr.inference.low_memory): fp8 weight storage with half-precision compute and CPU
offload, through diffusers' own mechanisms, on CPU against the plain path."""
import copy

import numpy as np
import pytest
import torch
from conftest import randomize_zero_inits

from xpsr.config import InferConfig
from xpsr.errors import XPSRError
from xpsr.inference.low_memory import FP8, apply_low_memory
from xpsr.inference.pipeline import super_resolve
from xpsr.models.build import DTYPES

CPU = torch.device("cpu")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def tiny_bf16():
    from conftest import tiny_config

    from xpsr.models.build import build_xpsr

    modules = build_xpsr(tiny_config())
    randomize_zero_inits(modules.unet, modules.controlnet)  # the ControlNet and pixel attention count
    for m in (modules.unet, modules.controlnet, modules.vae, modules.text_encoder):
        m.eval().to(dtype=torch.bfloat16)
    return modules


def _sr(modules, **kw):
    cfg = InferConfig(input="-", output_dir="-", num_inference_steps=2, process_size=64, dtype="bf16", **kw)
    lr = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    return super_resolve(modules, lr, "a photo", "blurry", cfg, CPU)


def test_fp8_storage_keeps_the_output_close_and_stores_fp8(tiny_bf16):
    reference = _sr(tiny_bf16)
    fp8 = copy.deepcopy(tiny_bf16)
    apply_low_memory(fp8, "fp8", "none", "bf16", CPU)
    big = max(fp8.unet.parameters(), key=lambda p: p.numel())
    assert big.dtype == FP8  # stored in 8 bits ...
    out = _sr(fp8)
    assert out.shape == reference.shape
    assert _psnr(out, reference) > 25  # ... and the image stays close to the bf16 one (tolerance of this test)


@pytest.mark.parametrize("offload", ["model", "group"])
def test_cpu_offload_gives_the_same_image(tiny_bf16, offload):
    reference = _sr(tiny_bf16)
    moved = copy.deepcopy(tiny_bf16)
    apply_low_memory(moved, "same", offload, "bf16", CPU)
    assert np.array_equal(_sr(moved), reference)


def test_fp8_needs_a_half_precision_compute_dtype(tiny_bf16):
    with pytest.raises(XPSRError, match="weights_storage=fp8 computes in half precision"):
        apply_low_memory(copy.deepcopy(tiny_bf16), "fp8", "none", "fp32", CPU)
    assert DTYPES["bf16"] == torch.bfloat16
