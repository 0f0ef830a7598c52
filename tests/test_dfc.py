"""DFC heads and loss."""
import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN, randomize_zero_inits, run, tiny_inputs
from safetensors.torch import load_file

from xpsr.models.dfc import RRDB, DFCConditioningEmbedding, dfc_loss


def test_dfc_loss_formula_by_hand():
    torch.manual_seed(0)
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    hr_lat = torch.randn(2, 4, 4, 4)
    rgbs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    lats = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    pixel = sum(F.l1_loss(r, F.interpolate(hr, size=r.shape[-2:], mode="bilinear", align_corners=False))
                for r in rgbs)
    latent = sum(F.l1_loss(r, F.interpolate(hr_lat, size=r.shape[-2:], mode="bilinear")) for r in lats)
    loss = dfc_loss(rgbs, lats, hr, hr_lat, weight=0.05)
    torch.testing.assert_close(loss.total, 0.05 * (pixel + latent))
    torch.testing.assert_close(loss.pixel, 0.05 * pixel)
    only_pixel = dfc_loss(rgbs, lats, hr, hr_lat, latent=False)
    only_latent = dfc_loss(rgbs, lats, hr, hr_lat, pixel=False)
    assert only_pixel.latent == 0 and only_latent.pixel == 0
    torch.testing.assert_close(only_pixel.total + only_latent.total, loss.total)
    first = dfc_loss(rgbs, lats, hr, hr_lat, pixel=False, latent_indices=[1])
    torch.testing.assert_close(first.total, 0.05 * F.l1_loss(lats[1], F.interpolate(hr_lat, size=(2, 2),
                                                                                    mode="bilinear")))
    assert dfc_loss(rgbs, lats, hr, hr_lat, weight=0.1).total == pytest.approx(2 * loss.total.item(), rel=1e-6)


def test_dfc_loss_equals_the_official_value_on_golden_outputs():
    i, o = load_file(str(GOLDEN / "inputs.safetensors")), load_file(str(GOLDEN / "outputs.safetensors"))
    rgbs = [o[f"pixel_dfc.{k}"] for k in range(3)]
    lats = [o[f"latent_dfc.{k}"] for k in range(9)] + [o["latent_dfc_mid"]]
    loss = dfc_loss(rgbs, lats, i["hr_image"], i["hr_latents"])
    assert abs(loss.total.item() - o["dfc_loss"].item()) <= 1e-6 * abs(o["dfc_loss"].item())


def test_heads_shapes_and_scale_semantics(make_tiny):
    m = make_tiny()
    randomize_zero_inits(m.controlnet)
    x = tiny_inputs(m)
    with torch.no_grad():
        _, full = run(m, x, scale=1.0)
        _, half = run(m, x, scale=0.5)
    assert [r.shape[-1] for r in full.pixel_rgbs] == [32, 16, 8]  # after each stride-2 stage
    assert len(full.latent_preds) == len(full.down_block_res_samples) + 1
    assert all(p.shape[1] == 4 for p in full.latent_preds)
    for a, b in zip(full.down_block_res_samples, half.down_block_res_samples):
        torch.testing.assert_close(b, 0.5 * a)
    # the heads read the residuals before conditioning_scale
    for a, b in zip(full.latent_preds, half.latent_preds):
        assert torch.equal(a, b)
    assert m.controlnet.controlnet_cond_embedding.side_outputs is None  # nothing kept between calls


def test_toggles_remove_heads(make_tiny):
    m = make_tiny(dfc_pixel_heads=False, dfc_latent_heads=False)
    x = tiny_inputs(m)
    with torch.no_grad():
        _, out = run(m, x)
    assert out.pixel_rgbs == [] and out.latent_preds == []
    assert not any("dfc_" in k or "to_rgbs" in k for k in m.controlnet.state_dict())


def test_rrdb_preprocessor(make_tiny):
    m = make_tiny(rrdb=True)
    emb = m.controlnet.controlnet_cond_embedding
    assert isinstance(emb, DFCConditioningEmbedding) and isinstance(emb.preprocessor[0], RRDB)
    assert "controlnet_cond_embedding.preprocessor.1.rdb3.conv5.weight" in m.controlnet.state_dict()
    x = tiny_inputs(m)
    with torch.no_grad():
        _, out = run(m, x)
    assert all(torch.isfinite(r).all() for r in out.pixel_rgbs)


def test_rrdb_is_basicsr_rrdb_with_growth_equal_to_width_and_scaled_init(make_tiny):
    """As the official `RRDB(block_out_channels[0], block_out_channels[0])` from BasicSR 1.4.2: in each dense
    block conv k takes width*k channels (growth = width), every conv is 3x3, Kaiming-normal times 0.1 with zero
    bias; forward x + 0.2 * rdb3(rdb2(rdb1(x))), each rdb x + 0.2 * conv5(cat(x, x1..x4)), leaky ReLU 0.2."""
    emb = make_tiny(rrdb=True).controlnet.controlnet_cond_embedding
    width = emb.conv_in.out_channels
    shapes = {k: tuple(v.shape) for k, v in emb.preprocessor.state_dict().items()}
    expected = {}
    for block in range(2):
        for rdb in (1, 2, 3):
            for k in range(1, 6):
                expected[f"{block}.rdb{rdb}.conv{k}.weight"] = (width, width * k, 3, 3)
                expected[f"{block}.rdb{rdb}.conv{k}.bias"] = (width,)
    assert shapes == expected

    # the init, by hand: default Conv2d init of conv1..conv5 in order, then kaiming_normal_ * 0.1 and bias 0
    torch.manual_seed(7)
    ours = RRDB(16, 16)
    torch.manual_seed(7)
    hand = {}
    for rdb in (1, 2, 3):
        convs = [torch.nn.Conv2d(16 * k, 16, 3, 1, 1) for k in range(1, 6)]
        for k, conv in enumerate(convs, 1):
            torch.nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="leaky_relu")
            hand[f"rdb{rdb}.conv{k}.weight"] = conv.weight.detach() * 0.1
            hand[f"rdb{rdb}.conv{k}.bias"] = torch.zeros(16)
    state = ours.state_dict()
    assert state.keys() == hand.keys() and all(torch.equal(state[k], hand[k]) for k in hand)
    w = state["rdb1.conv5.weight"]  # fan-in 5 * 16 * 3 * 3
    assert abs(w.std().item() - 0.1 * (2 / (80 * 9)) ** 0.5) < 0.1 * 0.1 * (2 / (80 * 9)) ** 0.5

    # the forward, by hand
    x = torch.randn(1, 16, 6, 5)

    def rdb(i, v):
        feats = [v]
        for k in range(1, 5):
            feats.append(F.leaky_relu(F.conv2d(torch.cat(feats, 1), hand[f"rdb{i}.conv{k}.weight"], padding=1), 0.2))
        return F.conv2d(torch.cat(feats, 1), hand[f"rdb{i}.conv5.weight"], padding=1) * 0.2 + v

    with torch.no_grad():
        torch.testing.assert_close(ours(x), rdb(3, rdb(2, rdb(1, x))) * 0.2 + x, rtol=1e-5, atol=1e-6)
