"""Building, freezing, the trainable set, and loading base models from folders."""
import pytest
import torch
from conftest import DATA, run, tiny_inputs
from diffusers import ControlNetModel

from xpsr.models.build import (
    MissingWeightsError,
    build_xpsr,
    freeze_for_training,
    load_base,
    model_summary,
    trainable_parameters,
)
from xpsr.models.dfc import dfc_loss

PINNED = DATA / "tiny_trainable_keys.txt"


def test_trainable_key_set_is_pinned(make_tiny):
    m = make_tiny()
    keys = sorted(n for n, p in trainable_parameters(m.unet, m.controlnet).items())
    expected = PINNED.read_text().split()
    assert keys == expected, "trainable set changed; if on purpose, regenerate tests/data/tiny_trainable_keys.txt"
    assert {k.split(".")[0] for k in keys} == {"controlnet", "unet"}
    assert all(".pixel_attentions." in k for k in keys if k.startswith("unet."))


def test_gradients_reach_exactly_the_trainable_set(make_tiny):
    m = make_tiny()
    x = tiny_inputs(m)
    m.controlnet.train()
    pred, control = run(m, x)
    loss = pred.square().mean() + dfc_loss(control.pixel_rgbs, control.latent_preds, x["hr_image"],
                                           x["hr_latents"]).total
    loss.backward()
    trainable = trainable_parameters(m.unet, m.controlnet)
    ids = {id(p) for p in trainable.values()}
    for model in (m.unet, m.controlnet, m.vae, m.text_encoder):
        for name, p in model.named_parameters():
            if id(p) in ids:
                assert p.requires_grad and p.grad is not None, name
            else:
                assert not p.requires_grad and p.grad is None, name
    # the SFA branches and the DFC heads do receive signal
    grads = {n: p.grad.abs().sum().item() for n, p in trainable.items()}
    assert sum(v for k, v in grads.items() if "dfc_latent_heads" in k) > 0
    assert sum(v for k, v in grads.items() if "to_rgbs" in k) > 0


def test_trainable_weights_stay_fp32_when_frozen_parts_are_half(make_tiny):
    m = make_tiny()
    for model in (m.unet, m.controlnet, m.vae, m.text_encoder):
        model.to(torch.bfloat16)
    trainable = freeze_for_training(m)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen_unet = [p for n, p in m.unet.named_parameters() if ".pixel_attentions." not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen_unet)


def test_controlnet_is_derived_from_the_stock_unet_before_injection(make_tiny):
    m = make_tiny()
    unet_state, cn_state = m.unet.state_dict(), m.controlnet.state_dict()
    shared = [k for k in cn_state if k.startswith("down_blocks.") and "_transformer." not in k]
    assert shared and all(torch.equal(cn_state[k], unet_state[k]) for k in shared)
    # and no UNet addition leaked into the ControlNet
    assert not any("pixel_attentions" in k for k in cn_state)


def test_tiny_preset_is_deterministic_and_seeded(make_tiny):
    a, b, c = make_tiny(), make_tiny(), make_tiny(seed=1)
    sa, sb, sc = (x.controlnet.state_dict() for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert "trainable total" in model_summary(a)


def test_missing_base_folder_lists_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(MissingWeightsError) as e:
        load_base(str(tmp_path))
    msg = str(e.value)
    for part in ("unet/ weights", "vae/ (folder missing)", "text_encoder/",
                 "scheduler/", "tokenizer/ vocabulary", "hf download"):
        assert part in msg, part
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_base(str(tmp_path / "nope"))


def test_loads_a_local_diffusers_folder(tmp_path, make_tiny):
    """The real loading path (from_pretrained on a folder), on a tiny model saved here."""
    from xpsr.models.tiny import build_tiny_base

    parts = build_tiny_base(seed=5)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        parts[name].save_pretrained(tmp_path / name)
    from conftest import tiny_config

    m = build_xpsr(tiny_config(base=str(tmp_path)))
    ref = parts["unet"].state_dict()
    got = m.unet.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert isinstance(m.controlnet, ControlNetModel)
    with torch.no_grad():
        pred, _ = run(m, tiny_inputs(m))
    assert torch.isfinite(pred).all()


def test_attention_runs_through_sdpa_processors(make_tiny):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    m = make_tiny(unet_sfa=True)
    attns = [mod for model in (m.unet, m.controlnet) for mod in model.modules() if isinstance(mod, Attention)]
    assert attns and all(isinstance(a.processor, AttnProcessor2_0) for a in attns)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="could not load 'someorg/no-such-model' from the hub"):
        load_base("someorg/no-such-model")


@pytest.mark.parametrize("preset, width, layers", [("sd15", 768, 12), ("sd21", 1024, 23)])
def test_random_text_encoder_has_the_preset_shape(preset, width, layers):
    """The inference benchmark at SD size needs no download: a random text encoder of the right shape."""
    from xpsr.models.presets import build_random_text_encoder
    from xpsr.models.text import encode_prompts

    encoder, tokenizer = build_random_text_encoder(preset)
    assert encoder.config.num_hidden_layers == layers
    with torch.no_grad():
        embeds = encode_prompts(tokenizer, encoder, ["a photo of a cat", "blurry"], torch.device("cpu"))
    assert embeds.shape == (2, 77, width) and torch.isfinite(embeds).all()
