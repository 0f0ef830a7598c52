"""Trained-weight checkpoints and the diffusers-style export."""
import json

import pytest
import torch
from conftest import randomize_zero_inits, run, tiny_inputs
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

from xpsr.config import to_dict
from xpsr.models.build import trainable_parameters
from xpsr.models.checkpoint import (
    CheckpointMismatchError,
    export_diffusers,
    load_exported,
    load_trained,
    read_config,
    save_trained,
)


def test_round_trip_reproduces_outputs_exactly(tmp_path, make_tiny):
    a = make_tiny()
    randomize_zero_inits(a.controlnet, a.unet, seed=7)
    path = save_trained(tmp_path / "weights.safetensors", a.unet, a.controlnet, to_dict(a.config))
    saved = load_file(str(path))
    assert set(saved) == set(trainable_parameters(a.unet, a.controlnet))  # only the trained weights
    b = make_tiny()  # same frozen base, trained weights start elsewhere
    with torch.no_grad():
        for p in trainable_parameters(b.unet, b.controlnet).values():
            p.add_(torch.randn_like(p) * 0.1)
    x = tiny_inputs(a)
    with torch.no_grad():
        before = run(b, x)[0]
        config = load_trained(path, b.unet, b.controlnet)
        ref, got = run(a, x)[0], run(b, x)[0]
    assert not torch.equal(before, ref)
    assert torch.equal(ref, got)
    assert config["fusion_mode"] == "sfa" and read_config(path) == config


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path, make_tiny):
    a = make_tiny()
    path = save_trained(tmp_path / "w.safetensors", a.unet, a.controlnet, to_dict(a.config))
    other = make_tiny(fusion_mode="content_only", pixel_attention=False)
    with pytest.raises(CheckpointMismatchError) as e:
        load_trained(path, other.unet, other.controlnet)
    msg = str(e.value)
    assert "unexpected keys" in msg and "quality_transformer" in msg and "pixel_attentions" in msg
    assert "by module" in msg and "(26 keys)" in msg  # long lists are grouped by module


def test_shape_mismatch_and_foreign_files(tmp_path, make_tiny):
    a = make_tiny()
    path = save_trained(tmp_path / "w.safetensors", a.unet, a.controlnet, to_dict(a.config))
    state = load_file(str(path))
    state["controlnet.conv_in.weight"] = torch.zeros(1, 1, 1, 1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"format": "xpsr-trained-v1", "config": "{}"})
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_trained(bad, a.unet, a.controlnet)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not an xpsr checkpoint"):
        load_trained(foreign, a.unet, a.controlnet)
    with pytest.raises(FileNotFoundError):
        load_trained(tmp_path / "missing.safetensors", a.unet, a.controlnet)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, make_tiny):
    a = make_tiny()
    save_trained(tmp_path / "w.safetensors", a.unet, a.controlnet, {})
    save_trained(tmp_path / "w.safetensors", a.unet, a.controlnet, {"again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_diffusers_export_round_trip(tmp_path, make_tiny):
    a = make_tiny(rrdb=True)
    randomize_zero_inits(a.controlnet, a.unet, seed=2)
    export_diffusers(tmp_path / "export", a.unet, a.controlnet, to_dict(a.config))
    unet, controlnet, cfg = load_exported(tmp_path / "export")
    assert cfg.rrdb is True
    x = tiny_inputs(a)
    with torch.no_grad():
        assert torch.equal(run(a, x)[0], run(a, x, unet=unet, controlnet=controlnet)[0])
    config = json.loads((tmp_path / "export" / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel"
    # a plain diffusers user gets the base ControlNet out of it
    stock = ControlNetModel.from_pretrained(tmp_path / "export" / "controlnet")
    assert torch.equal(stock.conv_in.weight, a.controlnet.conv_in.weight)


def test_load_exported_rejects_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported XPSR model"):
        load_exported(tmp_path)
