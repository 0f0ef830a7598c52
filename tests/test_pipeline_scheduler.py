"""A scheduler swapped into XPSRPipeline is used with its own settings (issue 15, wrong results 5): DPM-Solver's
SDE variant is not silently turned into dpmsolver++, its noise comes from the seeded generator, and the default
scheduler still gives the bytes of `xpsr infer`."""
import numpy as np
import pytest
from conftest import REPO
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from xpsr.config import InferConfig, load_config
from xpsr.inference.diffusers_pipeline import XPSRPipeline
from xpsr.inference.pipeline import make_scheduler

CALL = {"num_inference_steps": 3, "process_size": 64, "output_type": "np"}


@pytest.fixture(scope="module")
def pipe():
    from conftest import tiny_config

    from xpsr.models.build import build_xpsr

    return XPSRPipeline.from_modules(build_xpsr(tiny_config()))  # the model `xpsr infer weights=null` builds


def _lr():
    return np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_a_swapped_sde_dpm_solver_keeps_its_algorithm(pipe):
    base = pipe.scheduler
    try:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="sde-dpmsolver++")
        sde = pipe(_lr(), **CALL).images[0]
        again = pipe(_lr(), **CALL).images[0]
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++")
        ode = pipe(_lr(), **CALL).images[0]
    finally:
        pipe.scheduler = base
    assert np.array_equal(sde, again)  # the SDE noise is drawn from the seeded generator: same seed, same bytes
    assert np.abs(sde - ode).max() > 1 / 255


def test_a_config_of_another_class_still_gets_the_named_algorithm():
    ddpm = DDPMScheduler()
    assert make_scheduler("dpmsolver++", ddpm.config, DDPMScheduler).config.algorithm_type == "dpmsolver++"
    sde = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    kept = make_scheduler("dpmsolver++", sde.config, DPMSolverMultistepScheduler).config
    assert kept.algorithm_type == "sde-dpmsolver++" and kept.use_karras_sigmas


def test_the_default_scheduler_gives_the_bytes_of_xpsr_infer(pipe, tmp_path):
    from xpsr.inference.run import run_inference

    (tmp_path / "lr").mkdir()
    Image.fromarray(_lr()).save(tmp_path / "lr" / "a.png")
    cfg = load_config(InferConfig, REPO / "configs" / "infer" / "tiny_cpu.yaml",
                      [f"input={tmp_path / 'lr'}", f"output_dir={tmp_path / 'sr'}", "scheduler=ddpm",
                       "num_inference_steps=3"])
    assert run_inference(cfg)["done"] == 1
    assert isinstance(pipe.scheduler, DDPMScheduler)
    out = pipe(Image.open(tmp_path / "lr" / "a.png"), **CALL).images[0]
    assert np.array_equal((out * 255).round().astype(np.uint8), np.asarray(Image.open(tmp_path / "sr" / "a.png")))
