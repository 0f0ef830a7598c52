"""Pixel-aware attention: residual routing, zero init, gradient checkpointing, deepcopy."""
import copy

import pytest
import torch
from conftest import randomize_zero_inits, run, tiny_inputs
from diffusers import ControlNetModel, UNet2DConditionModel

from xpsr.config import ModelConfig
from xpsr.models.build import inject_xpsr
from xpsr.models.pixel_attention import (
    XPSRUNet,
    has_pixel_attention,
    inject_pixel_attention,
    residual_channels,
)


def _residuals(unet, x, seed=3):
    g = torch.Generator().manual_seed(seed)
    chans = residual_channels(unet.config)
    sizes = []
    h = x["noisy_latents"].shape[-1]
    for i in range(len(unet.config.block_out_channels)):  # mirror of the down path's resolutions
        sizes += [h] * (unet.config.layers_per_block + (1 if i == 0 else 0))
        if i < len(unet.config.block_out_channels) - 1:
            h //= 2
            sizes.append(h)
    b = x["noisy_latents"].shape[0]
    down = [torch.randn(b, c, s, s, generator=g) for c, s in zip(chans, sizes)]
    mid = torch.randn(b, chans[-1], sizes[-1], sizes[-1], generator=g)
    return down, mid


def _unet_call(unet, x, down, mid):
    return unet(x["noisy_latents"], x["timesteps"], x["content_embeds"], down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


def test_zero_init_pixel_attention_leaves_the_unet_unchanged_bit_for_bit(make_tiny):
    m = make_tiny(pixel_attention=False)
    stock = m.unet
    assert type(stock) is UNet2DConditionModel
    ours = inject_pixel_attention(copy.deepcopy(stock), init="zero")
    x = tiny_inputs(m)
    down, mid = _residuals(stock, x)
    with torch.no_grad():
        assert torch.equal(_unet_call(stock, x, down, mid), _unet_call(ours, x, down, mid))
        randomize_zero_inits(ours)
        assert not torch.allclose(_unet_call(stock, x, down, mid), _unet_call(ours, x, down, mid))


def test_every_up_layer_reads_the_raw_residual_paired_with_its_skip(make_tiny):
    m = make_tiny()
    unet = m.unet
    x = tiny_inputs(m)
    down, mid = _residuals(unet, x)
    seen = []
    hooks = [pa.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["encoder_hidden_states"]),
                                          with_kwargs=True)
             for block in unet.up_blocks for pa in block.pixel_attentions]
    with torch.no_grad():
        _unet_call(unet, x, down, mid)
    for h in hooks:
        h.remove()
    n = len(down)
    assert len(seen) == n == 9  # every layer of every up block, UpBlock2D included; none in the mid block
    for k, tokens in enumerate(seen):
        assert torch.equal(tokens, down[n - 1 - k].flatten(2).transpose(1, 2))  # raw residual N-1-k


def test_routed_residuals_are_cleared_after_forward_even_on_error(make_tiny):
    m = make_tiny()
    x = tiny_inputs(m)
    down, mid = _residuals(m.unet, x)
    with torch.no_grad():
        _unet_call(m.unet, x, down, mid)
    assert all(b._xpsr_pixel_residuals is None for b in m.unet.up_blocks)
    with pytest.raises(RuntimeError):  # a residual of the wrong width
        _unet_call(m.unet, x, down[:-1] + [down[-1][:, :1]], mid)
    assert all(b._xpsr_pixel_residuals is None for b in m.unet.up_blocks)


def _grads(m, x, checkpointing: bool, double_forward: bool = False):
    for model in (m.unet, m.controlnet):
        if checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
    m.controlnet.train()
    m.unet.train()
    pred, control = run(m, x)
    loss = pred.square().mean() + sum(p.abs().mean() for p in control.latent_preds + control.pixel_rgbs)
    if double_forward:  # a second forward with other inputs before the first one's backward
        other = dict(x, lr_cond=torch.rand_like(x["lr_cond"]), noisy_latents=torch.randn_like(x["noisy_latents"]))
        run(m, other)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in list(m.unet.named_parameters()) + list(m.controlnet.named_parameters())
             if p.grad is not None}
    for model in (m.unet, m.controlnet):
        model.zero_grad(set_to_none=True)
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(make_tiny):
    m = make_tiny()
    randomize_zero_inits(m.unet, m.controlnet)
    x = tiny_inputs(m)
    plain = _grads(m, x, checkpointing=False)
    ckpt = _grads(m, x, checkpointing=True)
    ckpt_twice = _grads(m, x, checkpointing=True, double_forward=True)
    assert plain.keys() == ckpt.keys() == ckpt_twice.keys()
    assert any(".pixel_attentions." in k for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(ckpt_twice[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_checkpointing_enabled_before_injection_still_covers_new_modules(make_tiny):
    m = make_tiny(gradient_checkpointing=True)
    flagged = [mod for model in (m.unet, m.controlnet) for mod in model.modules()
               if hasattr(mod, "gradient_checkpointing")]
    assert flagged and all(mod.gradient_checkpointing for mod in flagged)
    # the pitfall itself: checkpointing switched on *before* injection must still cover the new modules
    fresh = make_tiny(pixel_attention=False, fusion_mode="content_only")
    fresh.unet.enable_gradient_checkpointing()
    controlnet = ControlNetModel.from_unet(fresh.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    unet, _ = inject_xpsr(fresh.unet, controlnet, ModelConfig(base="tiny"))
    assert all(pa.gradient_checkpointing for b in unet.up_blocks for pa in b.pixel_attentions)


def test_deepcopy_for_ema_works_and_matches(make_tiny):
    m = make_tiny()
    randomize_zero_inits(m.unet, m.controlnet)
    x = tiny_inputs(m)
    with torch.no_grad():
        run(m, x)
        unet2, cn2 = copy.deepcopy(m.unet), copy.deepcopy(m.controlnet)
        a, _ = run(m, x)
        b, _ = run(m, x, unet=unet2, controlnet=cn2)
    assert isinstance(unet2, XPSRUNet) and has_pixel_attention(unet2)
    assert torch.equal(a, b)
    assert unet2.up_blocks[0].pixel_attentions[0] is not m.unet.up_blocks[0].pixel_attentions[0]


def test_pixel_attention_shapes_follow_the_up_blocks(make_tiny):
    m = make_tiny()
    for block in m.unet.up_blocks:
        assert len(block.pixel_attentions) == len(block.resnets)
        for resnet, pa in zip(block.resnets, block.pixel_attentions):
            assert pa.config.in_channels == resnet.out_channels
            assert pa.config.num_attention_heads == 4  # the tiny UNet's head count
    with pytest.raises(ValueError, match="already"):
        inject_pixel_attention(m.unet)
