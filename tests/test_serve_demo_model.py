"""A bare `xpsr serve` after `xpsr demo` serves the demo's trained model (with the demo's sampler); without the
demo's folder the page says plainly that the model is random."""
import dataclasses

import pytest

from xpsr.apps.serve.engine import with_demo_model
from xpsr.config import DemoConfig, ServeConfig


@pytest.fixture
def demo_dir(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "trained.safetensors").write_bytes(b"x")
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "prior.json").write_text("{}")
    return tmp_path


def test_without_the_demo_folder_the_page_says_the_model_is_random(tmp_path):
    cfg, line = with_demo_model(ServeConfig(), tmp_path / "no_demo")
    assert cfg == ServeConfig() and "random weights" in line and "xpsr demo" in line


def test_after_the_demo_its_trained_model_and_sampler_are_served(demo_dir):
    cfg, line = with_demo_model(ServeConfig(), demo_dir)
    demo = DemoConfig()
    assert cfg.weights == str(demo_dir / "run") and cfg.model.base == str(demo_dir / "prior")
    assert cfg.model.conditioning_channels == demo.model.conditioning_channels
    assert (cfg.scheduler, cfg.start_from, cfg.added_noise_level, cfg.process_size) == (
        "ddim", demo.start_from, demo.added_noise_level, demo.crop_size)
    assert "xpsr demo" in line and "not the paper's quality" in line


def test_settings_the_user_chose_are_kept(demo_dir):
    cfg, _ = with_demo_model(dataclasses.replace(ServeConfig(), scheduler="unipc"), demo_dir)
    assert cfg.scheduler == "unipc" and cfg.weights == str(demo_dir / "run")


def test_given_weights_or_base_are_served_as_given(demo_dir):
    given = dataclasses.replace(ServeConfig(), weights="runs/x")
    assert with_demo_model(given, demo_dir) == (given, "`runs/x`")
