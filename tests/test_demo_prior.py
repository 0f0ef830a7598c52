"""The demo's prior (xpsr/training/prior.py) and a VAE whose scale factor is not 8."""
import dataclasses

import pytest
import torch

from xpsr.config import ConfigError, DemoPriorConfig, DFCConfig, ModelConfig
from xpsr.models.build import build_xpsr, vae_scale_factor
from xpsr.training.demo_data import write_sample_photos
from xpsr.training.prior import ensure_prior

FAST = DemoPriorConfig(vae_steps=3, unet_steps=2, batch_size=2, vae_crop=32, unet_crop=32)
PROMPTS = ["a photo", ""]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_sample_photos(tmp_path_factory.mktemp("photos"), ("astronaut", "coffee"))


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("prior") / "prior"
    ensure_prior(folder, FAST, photos, PROMPTS, seed=0, log=lambda _: None)
    return folder


def test_prior_same_seed_same_bytes_and_reused(tmp_path, photos, prior_dir):
    again = tmp_path / "again"
    ensure_prior(again, FAST, photos, PROMPTS, seed=0, log=lambda _: None)
    files = sorted(p.relative_to(prior_dir) for p in prior_dir.rglob("*.safetensors"))
    assert len(files) == 3  # unet, vae, text_encoder
    for rel in files:
        assert (prior_dir / rel).read_bytes() == (again / rel).read_bytes(), rel

    weights = again / "unet" / "diffusion_pytorch_model.safetensors"
    stamp, logs = weights.stat().st_mtime_ns, []
    made = ensure_prior(again, FAST, photos, PROMPTS, seed=0, log=logs.append)
    assert logs[0].startswith("prior: reusing") and weights.stat().st_mtime_ns == stamp
    assert len(made["unet_losses"]) == FAST.unet_steps

    logs.clear()  # other settings -> made again, never a stale prior
    made = ensure_prior(again, dataclasses.replace(FAST, unet_steps=3), photos, PROMPTS, seed=0, log=logs.append)
    assert not any("reusing" in line for line in logs) and len(made["unet_losses"]) == 3
    assert not (tmp_path / "again.partial").exists()


def test_prior_folder_is_a_base_with_a_4x_vae(prior_dir):
    from xpsr.training.step import training_step

    modules = build_xpsr(ModelConfig(base=str(prior_dir), conditioning_channels=[8, 16, 32]))
    assert vae_scale_factor(modules.vae) == 4 and modules.unet.config.in_channels == 8
    made = __import__("json").loads((prior_dir / "prior.json").read_text())
    assert modules.vae.config.scaling_factor == pytest.approx(made["scaling_factor"])
    assert modules.vae.config.scaling_factor != 0.18215  # measured on the photos' latents, not SD's

    g = torch.Generator().manual_seed(0)
    batch = {"hr": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "lr_cond": torch.rand(2, 3, 32, 32, generator=g),
             "content_prompt": ["a photo"] * 2, "quality_prompt": ["blurry", "noisy"]}
    out = training_step(modules, batch, DFCConfig(), generator=g)
    assert torch.isfinite(out.loss) and out.terms["dfc_pixel"] > 0 and out.terms["dfc_latent"] > 0
    from xpsr.models.forward import predict_noise
    from xpsr.models.text import encode_prompts

    emb = encode_prompts(modules.tokenizer, modules.text_encoder, ["a photo"] * 2, torch.device("cpu"))
    _, control = predict_noise(modules.unet, modules.controlnet, torch.randn(2, 8, 8, 8, generator=g),
                               torch.tensor([10, 500]), emb, emb, batch["lr_cond"])
    # pixel DFC: one RGB head per stride-2 stage of the conditioning embedding (2 for a 4x VAE)
    assert [tuple(r.shape[-2:]) for r in control.pixel_rgbs] == [(16, 16), (8, 8)]
    assert all(p.shape[1] == 8 for p in control.latent_preds)  # latent DFC heads map to the VAE's channels


def test_conditioning_widths_must_match_the_vae_factor(prior_dir):
    with pytest.raises(ConfigError, match=r"conditioning_channels=\[8, 16, 16, 32\].*8x.*4x smaller.*3 widths"):
        build_xpsr(ModelConfig(base=str(prior_dir), conditioning_channels=[8, 16, 16, 32]))
    with pytest.raises(ConfigError, match=r"model.base='tiny'.*8x smaller.*4 widths"):
        build_xpsr(ModelConfig(base="tiny", conditioning_channels=[8, 16, 32]))


def test_demo_prior_api_gives_a_base_folder_and_reuses_it(tmp_path):
    from xpsr.apps.demo import demo_prior

    folder = demo_prior(tmp_path, FAST, seed=0, log=lambda _: None)
    assert folder == tmp_path.resolve() / "prior" and (folder / "prior.json").is_file()
    modules = build_xpsr(ModelConfig(base=str(folder), conditioning_channels=[8, 16, 32]))
    assert vae_scale_factor(modules.vae) == 4
    logs = []
    assert demo_prior(tmp_path, FAST, seed=0, log=logs.append) == folder
    assert logs[0].startswith("prior: reusing")
