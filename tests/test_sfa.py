"""Semantic-Fusion Attention: placement, modes, init, and the quality key never reaching processors."""
import copy

import pytest
import torch
from conftest import randomize_zero_inits, run, tiny_inputs
from diffusers import ControlNetModel

from xpsr.models.controlnet import as_xpsr_controlnet
from xpsr.models.sfa import QUALITY_KEY, SFATransformer2D, inject_sfa


def _stock_and_ours(make_tiny, mode):
    m = make_tiny(pixel_attention=False)
    stock = ControlNetModel.from_unet(m.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    randomize_zero_inits(stock)
    ours = copy.deepcopy(stock)
    inject_sfa(ours, mode)
    ours = as_xpsr_controlnet(ours, pixel_heads=False, latent=False)
    return m, stock.eval(), ours.eval()


def test_content_only_equals_stock_controlnet_bit_for_bit(make_tiny):
    m, stock, ours = _stock_and_ours(make_tiny, "content_only")
    x = tiny_inputs(m)
    with torch.no_grad():
        ref = stock(x["noisy_latents"], x["timesteps"], x["content_embeds"], x["lr_cond"])
        out = ours(x["noisy_latents"], x["timesteps"], x["content_embeds"], x["lr_cond"],
                   quality_embeds=x["quality_embeds"])
    for a, b in zip(ref.down_block_res_samples, out.down_block_res_samples):
        assert torch.equal(a, b)
    assert torch.equal(ref.mid_block_res_sample, out.mid_block_res_sample)
    assert set(ours.state_dict()) == set(stock.state_dict())  # no new keys without branches


@pytest.mark.parametrize("mode", ["sfa", "sequential", "content_only", "quality_only"])
def test_every_mode_runs_and_depends_on_the_right_prompt(make_tiny, mode):
    m = make_tiny(fusion_mode=mode)
    randomize_zero_inits(m.controlnet, m.unet)
    x = tiny_inputs(m)
    with torch.no_grad():
        base = run(m, x)[1].mid_block_res_sample
        other_quality = dict(x, quality_embeds=torch.randn_like(x["quality_embeds"]))
        other_content = dict(x, content_embeds=torch.randn_like(x["content_embeds"]))
        q = run(m, other_quality)[1].mid_block_res_sample
        c = run(m, other_content)[1].mid_block_res_sample
    assert torch.isfinite(base).all()
    assert torch.equal(base, q) == (mode == "content_only")
    assert torch.equal(base, c) == (mode == "quality_only")  # every ControlNet cross-attention has SFA


def test_sfa_differs_from_sequential(make_tiny):
    sfa, seq = make_tiny(fusion_mode="sfa"), make_tiny(fusion_mode="sequential")
    x = tiny_inputs(sfa)
    randomize_zero_inits(sfa.controlnet, seq.controlnet)
    with torch.no_grad():
        a = run(sfa, x)[1].mid_block_res_sample
        b = run(seq, x)[1].mid_block_res_sample
    assert not torch.allclose(a, b)


def test_branch_init_copies_pretrained_and_fusion_kv_are_fresh(make_tiny):
    m = make_tiny()
    attn = m.controlnet.down_blocks[1].attentions[0]
    assert isinstance(attn, SFATransformer2D)
    base = {k: v for k, v in attn.state_dict().items() if "_transformer." not in k}
    quality = attn.quality_transformer.state_dict()
    assert quality.keys() == base.keys() and all(torch.equal(quality[k], base[k]) for k in base)
    fusion = attn.fusion_transformer.state_dict()
    channels = attn.config.in_channels
    for k in base:
        if ".attn2.to_k." in k or ".attn2.to_v." in k:
            assert fusion[k].shape == (base[k].shape[0], channels)
        else:
            assert torch.equal(fusion[k], base[k]), k
    # The ControlNet's own transformer is the UNet's (from_unet before injection).
    unet_attn = m.unet.down_blocks[1].attentions[0].state_dict()
    assert all(torch.equal(unet_attn[k], base[k]) for k in base)


def test_placement_per_block(make_tiny):
    m = make_tiny(sfa_down_blocks=[1], sfa_mid=False)
    modes = {name: mod.fusion_mode for name, mod in m.controlnet.named_modules() if isinstance(mod, SFATransformer2D)}
    assert modes == {"down_blocks.0.attentions.0": "content_only", "down_blocks.0.attentions.1": "content_only",
                     "down_blocks.1.attentions.0": "sfa", "down_blocks.1.attentions.1": "sfa",
                     "mid_block.attentions.0": "content_only"}
    assert not any(".quality_transformer." in k for k in m.unet.state_dict())  # UNet SFA off by default


def test_unet_sfa_is_optional_and_trainable(make_tiny):
    m = make_tiny(unet_sfa=True)
    keys = [k for k, p in m.unet.named_parameters() if p.requires_grad]
    assert any("up_blocks.1.attentions.0.fusion_transformer" in k for k in keys)
    assert any("mid_block.attentions.0.quality_transformer" in k for k in keys)
    x = tiny_inputs(m)
    randomize_zero_inits(m.unet)
    with torch.no_grad():
        a = run(m, x)[0]
        b = run(m, dict(x, quality_embeds=torch.randn_like(x["quality_embeds"])))[0]
    assert not torch.allclose(a, b)


def test_quality_key_never_reaches_attention_processors(make_tiny, caplog):
    """diffusers warns for every cross_attention_kwargs key a processor does not take: none for ours."""
    m = make_tiny(unet_sfa=False)
    x = tiny_inputs(m)
    with caplog.at_level("WARNING"), torch.no_grad():
        run(m, x)
        m.controlnet(x["noisy_latents"], x["timesteps"], x["content_embeds"], x["lr_cond"],
                     quality_embeds=x["quality_embeds"], cross_attention_kwargs={"user_key": 1})
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert QUALITY_KEY not in messages
    assert "user_key" in messages  # positive control: an unknown key does reach the processors


def test_shared_cross_attention_kwargs_dict_is_not_mutated(make_tiny):
    m = make_tiny()
    x = tiny_inputs(m)
    shared = {QUALITY_KEY: x["quality_embeds"]}
    with torch.no_grad():
        m.controlnet(x["noisy_latents"], x["timesteps"], x["content_embeds"], x["lr_cond"],
                     cross_attention_kwargs=shared)
    assert QUALITY_KEY in shared  # every block saw it: none popped it from the shared dict


def test_missing_quality_embeds_is_a_clear_error(make_tiny):
    m = make_tiny()
    x = tiny_inputs(m)
    with pytest.raises(ValueError, match="needs quality_embeds"):
        m.controlnet(x["noisy_latents"], x["timesteps"], x["content_embeds"], x["lr_cond"])


def test_double_injection_is_refused(make_tiny):
    m = make_tiny()
    with pytest.raises(ValueError, match="already"):
        inject_sfa(m.controlnet, "sfa")
