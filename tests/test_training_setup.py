"""Training setup: precision as the official script, validation as the official one, the deterministic
switch, seeding, and the LR-schedule warning on resume with another max_steps."""
import os
import random

import numpy as np
import pytest
import torch
from conftest import REPO

from xpsr.config import ConfigError, TrainConfig, load_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from xpsr.training.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), crop_size=64)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; these tests switch it, so reset around each."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _cfg(demo, out, *overrides):
    return load_config(TrainConfig, REPO / "configs" / "train" / "tiny.yaml", [
        f"output_dir={out}", "demo_data=false", f"data.pairs=[{demo.pairs[0]}]", f"data.cache={demo.cache}",
        "report_to=none", "validation.every=0", "checkpoint_every=0", "num_workers=0", "device=cpu", *overrides])


@pytest.mark.parametrize("frozen_unet_dtype", ["fp32", "mixed_precision"])
def test_frozen_parts_are_stored_as_the_official_script_does(demo, tmp_path, frozen_unet_dtype):
    """Official train.py: `vae.to(dtype=weight_dtype)`, `text_encoder.to(dtype=weight_dtype)`, the UNet left
    in fp32 (accelerate autocasts its forward); the trainable weights are fp32 in every case."""
    from xpsr.training.loop import build_session, setup_accelerator

    cfg = _cfg(demo, tmp_path, "mixed_precision=bf16", f"frozen_unet_dtype={frozen_unet_dtype}")
    accelerator, out = setup_accelerator(cfg)
    s = build_session(cfg, accelerator, out)
    assert {p.dtype for p in s.modules.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in s.modules.text_encoder.parameters()} == {torch.bfloat16}
    frozen_unet = {p.dtype for p in s.modules.unet.parameters() if not p.requires_grad}
    assert frozen_unet == ({torch.float32} if frozen_unet_dtype == "fp32" else {torch.bfloat16})
    assert {p.dtype for p in s.trainable.values()} == {torch.float32}
    assert any(k.startswith("unet.") for k in s.trainable)  # the pixel attentions live in the UNet
    assert {p.dtype for p in s.modules.controlnet.parameters()} == {torch.float32}


def test_bf16_training_with_the_deterministic_switch_runs_and_restores_the_flags(demo, tmp_path):
    from xpsr.training.loop import run_training

    before = torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    summary = run_training(_cfg(demo, tmp_path, "max_steps=2", "mixed_precision=bf16", "deterministic=true"))
    assert summary["steps"] == 2 and all(np.isfinite(v) for v in summary["last"].values())
    assert (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before


def test_deterministic_mode_sets_every_flag_and_refuses_a_wrong_cublas_setting(monkeypatch):
    from xpsr.training.determinism import deterministic_mode

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    try:
        with deterministic_mode(True):
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        with deterministic_mode(False):
            assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = False
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG"):
        with deterministic_mode(True):
            pass


def test_seed_everything_fixes_every_global_generator():
    from xpsr.training.determinism import seed_everything

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    seed_everything(5, rank=1)
    first = draws()
    seed_everything(6)
    assert draws() == first  # seed + rank
    seed_everything(5, rank=0)
    assert draws() != first


def test_validation_samples_as_the_official_validation(demo, tmp_path, monkeypatch):
    """Official train.py `log_validation` + xpsr_valid.yaml: UniPC, 20 steps, the LR latent noised to the first
    timestep and again to added_noise_level 400 (valid_parse_args default), no colour fix; negative prompts of
    the official test config. Ours runs that through the inference code, x scale up to the crop size."""
    from accelerate import Accelerator

    import xpsr.inference.pipeline as pipeline
    from xpsr.models.build import build_xpsr
    from xpsr.training.dataset import build_dataset
    from xpsr.training.validation import run_validation, validation_infer_config

    cfg = load_config(TrainConfig, None, [f"output_dir={tmp_path}", f"data.pairs=[{demo.pairs[0]}]",
                                          f"data.cache={demo.cache}", "data.crop_size=64"])  # recipe defaults
    infer = validation_infer_config(cfg, scale=4)
    assert (infer.scheduler, infer.num_inference_steps, infer.start_from, infer.added_noise_level,
            infer.color_fix) == ("unipc", 20, "lr", 400, "none")
    assert infer.negative_prompt == "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
    assert infer.negative_quality_prompt == "high resolution, best quality, clear"
    assert (infer.upscale, infer.process_size, infer.seed, infer.guidance_scale) == (4, 64, cfg.seed, 5.5)

    official = REPO / "configs" / "infer" / "xpsr_official.yaml"  # another base: its keys, ours on top
    based = validation_infer_config(_cfg(demo, tmp_path, f"validation.infer_config={official}",
                                         "validation.num_inference_steps=3"), scale=4)
    assert (based.scheduler, based.num_inference_steps, based.resize, based.model.base) == (
        "unipc", 3, "pil", "stable-diffusion-v1-5/stable-diffusion-v1-5")

    seen = []
    monkeypatch.setattr(pipeline, "super_resolve", lambda modules, lr, content, quality, c, device: seen.append(
        (lr.shape, content, quality, c)) or np.zeros((lr.shape[0] * 4, lr.shape[1] * 4, 3), np.uint8))
    dataset, _ = build_dataset(cfg.data)
    path = run_validation(cfg, build_xpsr(cfg.model), dataset, tmp_path / "grid.png", Accelerator(cpu=True), 1)
    assert path.is_file() and len(seen) == 2
    assert seen[0][0] == (16, 16, 3) and seen[0][3] == infer and seen[0][1] == "a photo"


def test_a_bad_validation_key_fails_at_setup_naming_it(demo, tmp_path):
    from xpsr.training.loop import setup_accelerator

    with pytest.raises(ConfigError, match="scheduler"):
        setup_accelerator(_cfg(demo, tmp_path, "validation.every=5", "validation.scheduler=bogus"))


def test_resume_with_another_max_steps_warns_for_schedules_that_depend_on_it():
    from xpsr.training.checkpointing import warn_if_schedule_changes

    with pytest.warns(UserWarning, match="max_steps=2 with max_steps=4"):
        assert warn_if_schedule_changes("cosine", 2, 4)
    assert warn_if_schedule_changes("constant", 2, 4) is None
    assert warn_if_schedule_changes("constant_with_warmup", 2, 4) is None
    assert warn_if_schedule_changes("linear", 4, 4) is None
    assert warn_if_schedule_changes("linear", None, 4) is None  # checkpoints written before max_steps was saved
