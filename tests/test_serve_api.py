"""`xpsr serve` as an API and as a face of a trained model (issue 15): a one-step student is served in one step
with the settings it was trained under (and a wrong mode is refused), gradio_client sees named parameters and
outputs, controls are checked instead of truncated, and the processing-size limit is the one `xpsr infer` and
XPSRPipeline apply, with the same message. The server runs in this process (no second interpreter to start)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import REPO, served_client
from onestep_helpers import onestep_config
from PIL import Image

from xpsr.config import InferConfig, ServeConfig, load_config

TINY = REPO / "configs" / "serve" / "tiny_cpu.yaml"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A one-step student of the tiny recipe, trained one step (onestep.lr_latent=mean, t*=999)."""
    from xpsr.training.loop import run_training

    out = tmp_path_factory.mktemp("student")
    run_training(onestep_config(out, "max_steps=1", "checkpoint_every=0", "validation.every=0"))
    return out


def _photo(path, width: int, height: int):
    from skimage import data

    Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC).save(path)
    return path


def test_a_student_is_served_in_one_step_with_its_training_settings(student, tmp_path):
    from xpsr.apps.serve.app import build_app
    from xpsr.apps.serve.engine import Controls, Engine, infer_config
    from xpsr.inference.pipeline import super_resolve

    engine = Engine(load_config(ServeConfig, TINY, [f"weights={student}"]), tmp_path / "out")
    assert (engine.settings.mode, engine.settings.onestep_timestep, engine.settings.lr_latent) == \
        ("onestep", 999, "mean")
    assert engine.settings.source == {"mode": "the weights", "onestep_timestep": "the weights",
                                      "lr_latent": "the weights"}
    lr_path = _photo(tmp_path / "a.png", 32, 24)
    controls = Controls(steps=4, guidance=4.5, seed=0, color_fix="adain", upscale=2, tiled=True, tile_px=512)
    result = engine.run(lr_path, "a.png", "", "a photo", controls)
    assert "one-step (t*=999, LR latent mean" in result.mode
    icfg, _ = infer_config(engine.cfg, controls, 24, 32, engine.settings)
    lr = np.asarray(Image.open(lr_path).convert("RGB"))
    onestep = super_resolve(engine.modules, lr, "", "a photo", icfg, torch.device("cpu"))
    assert (icfg.mode, icfg.lr_latent) == ("onestep", "mean") and np.array_equal(result.sr, onestep)
    import dataclasses

    sampled = super_resolve(engine.modules, lr, "", "a photo", dataclasses.replace(icfg, lr_latent="sample"),
                            torch.device("cpu"))
    assert not np.array_equal(result.sr, sampled)  # the LR latent it was trained with matters
    page = build_app(engine).config  # the page says how the model runs, and greys out the unused controls
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in page["components"])
    assert "Mode: one-step (t*=999, LR latent mean" in texts
    steps = next(c for c in page["components"] if str(c["props"].get("label", "")).startswith("Steps"))
    assert steps["props"]["interactive"] is False and "not used" in steps["props"]["label"]

    # an explicit serve setting wins, and says where it came from
    override = Engine(load_config(ServeConfig, TINY, [f"weights={student}", "lr_latent=sample",
                                                      "onestep_timestep=500"]), tmp_path / "out2")
    assert (override.settings.lr_latent, override.settings.onestep_timestep) == ("sample", 500)
    assert override.settings.source["lr_latent"] == "the serve config"


def test_a_wrong_mode_is_refused_at_startup(student, tmp_path):
    from xpsr.apps.serve.engine import Engine, RequestError, resolve_settings

    with pytest.raises(RequestError, match="one-step student"):
        Engine(load_config(ServeConfig, TINY, [f"weights={student}", "mode=multistep"]), tmp_path / "out")
    cfg = load_config(ServeConfig, TINY, ["mode=onestep", "weights=teacher_run"])
    with pytest.raises(RequestError, match="trained for the multi-step sampler"):
        resolve_settings(cfg, {"mode": "multistep"}, None)


def test_trained_settings_of_an_export_folder(tmp_path):
    """An `xpsr export` folder of a merged student records its settings in unet/config.json (xpsr_onestep), read
    by the same reader as `xpsr infer` and the pipeline."""
    import json

    from xpsr.apps.serve.engine import trained_settings

    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    record = {"mode": "onestep", "timestep": 700, "lr_latent": "mean"}
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"xpsr_onestep": record}))
    assert trained_settings(str(tmp_path)) == {"mode": "onestep", "onestep_timestep": 700, "lr_latent": "mean"}
    (tmp_path / "unet" / "config.json").write_text("{}")
    assert trained_settings(str(tmp_path)) == {"mode": "multistep"}
    assert trained_settings(None) == {}


def test_weights_that_do_not_say_are_served_as_infer_and_the_pipeline_run_them():
    """mode=onestep on weights that record nothing: the student defaults (t*, LR latent mean) of the shared
    resolver, not the sampler's posterior sample; multistep: the sample."""
    from xpsr.apps.serve.engine import resolve_settings
    from xpsr.config import InferConfig, ServeConfig
    from xpsr.inference.trained_settings import TrainedSettings
    from xpsr.inference.trained_settings import resolve_settings as shared

    for mode in ("onestep", "multistep"):
        served = resolve_settings(ServeConfig(mode=mode), {}, None)
        infer = shared(InferConfig(input="x", output_dir="y", mode=mode), TrainedSettings())
        assert (served.mode, served.onestep_timestep, served.lr_latent) == \
            (infer.mode, infer.onestep_timestep if mode == "onestep" else None, infer.lr_latent)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The tiny CPU app served in this process on a free port, and a gradio_client on it."""
    with served_client(tmp_path_factory.mktemp("serve_api")) as c:
        yield c


def test_the_api_has_named_parameters_and_outputs(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    params = [p["parameter_name"] for p in api["/super_resolve"]["parameters"]]
    assert params == ["image", "content_prompt", "quality_prompt", "steps", "guidance", "seed", "color_fix",
                      "upscale", "tiled", "tile_px"]
    outputs = [r["label"] for r in api["/super_resolve"]["returns"]]
    assert outputs == ["Before (bicubic) | after (XPSR)", "Prompts used", "Run info", "Download PNG"]
    assert [p["parameter_name"] for p in api["/prompts"]["parameters"]] == ["image"]


@pytest.mark.parametrize("field, value, message", [
    ("seed", 2**70, "seed must be between 0 and 4,294,967,295"),
    ("seed", -1, "seed must be between 0 and 4,294,967,295"),
    ("steps", 2.7, "steps must be a whole number, got 2.7"),
    ("upscale", 1.5, "upscale must be a whole number"),
])
def test_controls_are_checked_not_truncated(client, tmp_path, field, value, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    values = dict(image=handle_file(str(_photo(tmp_path / "a.png", 16, 16))), content_prompt="",
                  quality_prompt="q", steps=2, guidance=4.5, seed=0, color_fix="adain", upscale=2, tiled=True,
                  tile_px=512)
    values[field] = value
    with pytest.raises(AppError) as info:
        client.predict(**values, api_name="/super_resolve")
    assert message in str(info.value) and "Traceback" not in str(info.value)


def test_serve_and_pipeline_refuse_a_strip_with_the_same_message(client, tmp_path):
    """A 1x3000 PNG would be processed at 192000x64 px with the tiny config (236 s and 3 GB before the fix)."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from xpsr.inference.diffusers_pipeline import XPSRPipeline
    from xpsr.inference.limits import SizeRefused, check_size
    from xpsr.models.build import build_xpsr

    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 3000), (90, 120, 200)).save(strip)
    cfg = load_config(ServeConfig, TINY)
    assert cfg.max_process_pixels < 64 * 192000  # the tiny config's limit refuses it
    with pytest.raises(AppError) as served:
        client.predict(handle_file(str(strip)), "", "q", 2, 4.5, 0, "adain", cfg.upscale, True, 512,
                       api_name="/super_resolve")
    pipe = XPSRPipeline.from_modules(build_xpsr(cfg.model))
    with pytest.raises(SizeRefused) as piped:
        pipe(str(strip), upscale=cfg.upscale, process_size=cfg.process_size,
             max_process_pixels=cfg.max_process_pixels, num_inference_steps=1)
    icfg = load_config(InferConfig, None, ["input=x", "output_dir=y", f"upscale={cfg.upscale}",
                                           f"process_size={cfg.process_size}",
                                           f"max_process_pixels={cfg.max_process_pixels}"])
    with pytest.raises(SizeRefused) as cli:
        check_size("strip.png", 3000, 1, icfg)
    shared = str(cli.value).split(": ", 1)[1]
    assert "above max_process_pixels=" in shared
    assert f"strip.png: {shared}" in str(served.value) and str(piped.value).endswith(f"strip.png: {shared}")
