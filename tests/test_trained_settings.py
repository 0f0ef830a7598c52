"""A one-step student runs as it was trained on every face (issue 15, wrong results 2 and 3): `xpsr infer` on the
run and on a merged export, the diffusers pipeline loaded from the export, and the model card take t* and the LR
latent from the weights; the multi-step sampler on the student is refused; a user's explicit setting wins."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO
from onestep_helpers import build
from PIL import Image

from xpsr.config import ExportConfig, InferConfig, load_config, to_dict
from xpsr.inference.trained_settings import TrainedSettings, resolve_settings, trained_settings

T_STAR = 700  # not the default 999: it must survive every step


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A one-step run dir (t* = 700, lr_latent mean) with a non-zero student LoRA, its merged export, and an input."""
    from xpsr.apps.export import export_model
    from xpsr.models.checkpoint import save_trained
    from xpsr.onestep.lora import STUDENT, adapter_parameters

    root = tmp_path_factory.mktemp("student")
    cfg, modules, _, _, _ = build(root / "build", f"onestep.timestep={T_STAR}", "onestep.vsd_weight=0")
    with torch.no_grad():
        for p in adapter_parameters(modules.unet, STUDENT).values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    run = root / "run"
    save_trained(run / "final" / "trained.safetensors", modules.unet, modules.controlnet, to_dict(cfg))
    export = export_model(ExportConfig(weights=str(run), output=str(root / "export"), merge_lora=True))
    lr_dir = root / "lr"
    lr_dir.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(lr_dir / "a.png")
    return {"run": run, "export": export, "lr": lr_dir, "root": root}


def _infer(student, weights, out, *extra) -> np.ndarray:
    from xpsr.inference.run import run_inference

    cfg = load_config(InferConfig, REPO / "configs" / "infer" / "tiny_cpu.yaml",
                      [f"input={student['lr']}", f"output_dir={student['root'] / out}", f"weights={weights}", *extra])
    assert run_inference(cfg)["done"] == 1
    return np.asarray(Image.open(student["root"] / out / "a.png"))


def test_settings_are_read_from_the_run_and_recorded_in_the_export(student):
    expected = ("onestep", T_STAR, "mean")
    for weights in (student["run"], student["run"] / "final" / "trained.safetensors", student["export"]):
        s = trained_settings(weights)
        assert (s.mode, s.onestep_timestep, s.lr_latent) == expected, weights
    record = json.loads((student["export"] / "unet" / "config.json").read_text())["xpsr_onestep"]
    assert record == {"mode": "onestep", "timestep": T_STAR, "lr_latent": "mean"}
    card = (student["export"] / "README.md").read_text()
    assert f"t* = {T_STAR}" in card and "`lr_latent=mean`" in card and "onestep_timestep=999" not in card


def test_xpsr_infer_on_the_run_uses_the_trained_t_star_and_lr_latent(student):
    from xpsr.inference.pipeline import super_resolve
    from xpsr.inference.run import load_modules

    as_trained = _infer(student, student["run"], "sr_mode", "mode=onestep")
    assert np.array_equal(_infer(student, student["run"], "sr_unset"), as_trained)  # mode from the run too
    cfg = load_config(InferConfig, REPO / "configs" / "infer" / "tiny_cpu.yaml",
                      ["input=x", "output_dir=y", f"weights={student['run']}"])
    modules = load_modules(cfg)
    lr = np.asarray(Image.open(student["lr"] / "a.png"))

    def sr(**explicit):
        return super_resolve(modules, lr, "", _quality(lr), _replace(cfg, **explicit), torch.device("cpu"))

    assert np.array_equal(sr(mode="onestep", onestep_timestep=T_STAR, lr_latent="mean"), as_trained)
    assert not np.array_equal(sr(mode="onestep", lr_latent="sample"), as_trained)  # the explicit setting wins
    assert not np.array_equal(sr(mode="onestep", onestep_timestep=999), as_trained)
    with pytest.raises(ValueError, match="one-step student"):
        _infer(student, student["run"], "sr_refused", "mode=multistep")
    _infer(student, student["run"], "sr_forced", "mode=multistep", "multistep_on_student=true")


def test_the_merged_export_runs_one_step_as_trained_on_every_face(student):
    from xpsr.inference.diffusers_pipeline import XPSRPipeline

    pipe = XPSRPipeline.from_pretrained(student["export"])
    lr = Image.open(student["lr"] / "a.png")
    call = {"process_size": 64, "output_type": "np"}
    plain = pipe(lr, **call).images[0]
    explicit = pipe(lr, mode="onestep", onestep_timestep=T_STAR, lr_latent="mean", **call).images[0]
    assert np.array_equal(plain, explicit)
    assert np.array_equal(pipe(lr, mode="onestep", **call).images[0], explicit)
    assert not np.array_equal(pipe(lr, mode="onestep", onestep_timestep=999, **call).images[0], explicit)
    with pytest.raises(ValueError, match="one-step student"):
        pipe(lr, mode="multistep", num_inference_steps=2, **call)
    from_cli = _infer(student, student["export"], "sr_export")
    assert np.array_equal(from_cli, (plain * 255).round().astype(np.uint8))
    unmerged = _infer(student, student["run"], "sr_run")
    assert np.abs(from_cli.astype(int) - unmerged.astype(int)).max() <= 1  # merging changes float rounding only


def test_a_damaged_record_is_refused_naming_the_file(student, tmp_path):
    from xpsr.inference.diffusers_pipeline import XPSRPipeline
    from xpsr.models.checkpoint import CheckpointMismatchError

    folder = shutil.copytree(student["export"], tmp_path / "export")
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["xpsr_onestep"]["timestep"] = 5000
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"unet/config.json: bad 'xpsr_onestep'"):
        XPSRPipeline.from_pretrained(folder)
    with pytest.raises(CheckpointMismatchError, match="timestep"):
        trained_settings(folder)


def test_unset_settings_resolve_from_the_weights_and_explicit_ones_are_kept():
    official = load_config(InferConfig, REPO / "configs" / "infer" / "xpsr_official.yaml",
                           ["input=x", "output_dir=y", "mode=onestep"])  # README's SD one-step command
    s = TrainedSettings("onestep", 250, "mean")
    r = resolve_settings(official, s)
    assert (r.mode, r.onestep_timestep, r.lr_latent) == ("onestep", 250, "mean")
    r = resolve_settings(_replace(official, mode=None, lr_latent="sample", onestep_timestep=999), s)
    assert (r.mode, r.onestep_timestep, r.lr_latent) == ("onestep", 999, "sample")
    teacher = resolve_settings(_replace(official, mode=None), TrainedSettings())
    assert (teacher.mode, teacher.lr_latent) == ("multistep", "sample")  # the official sampler, as before
    no_record = resolve_settings(official, TrainedSettings())  # one step on weights that do not say
    assert (no_record.onestep_timestep, no_record.lr_latent) == (999, "mean")  # OneStepConfig's defaults


def _replace(cfg, **values):
    import dataclasses

    return dataclasses.replace(cfg, **values)


def _quality(lr):
    from xpsr.captions.heuristic import describe, measure

    return describe(measure(lr))
