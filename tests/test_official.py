"""Official-format import beyond the golden's shapes: linear projections, per-block heads, other widths."""
import json

import pytest
import torch
from conftest import randomize_zero_inits, run, tiny_inputs
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

from xpsr.config import ModelConfig
from xpsr.models.build import XPSRModules, inject_xpsr
from xpsr.models.checkpoint import CheckpointMismatchError
from xpsr.models.official import build_from_official, export_official, load_official

SD21_LIKE = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 48),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=(2, 4, 6), norm_num_groups=8, use_linear_projection=True,
)


def _model(unet_config: dict, **cfg) -> XPSRModules:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    mc = ModelConfig(base="tiny", conditioning_channels=[8, 16, 16, 32], **cfg)
    unet, cn = inject_xpsr(unet, cn, mc)
    randomize_zero_inits(unet, cn)
    return XPSRModules(unet=unet.eval(), controlnet=cn.eval(), vae=None, text_encoder=None, tokenizer=None,
                       scheduler=None, config=mc)


@pytest.mark.parametrize("unet_sfa", [False, True])
def test_official_format_round_trip_on_other_shapes(tmp_path, unet_sfa):
    m = _model(SD21_LIKE, unet_sfa=unet_sfa)
    unet_state, cn_state, config = export_official(m.unet, m.controlnet, m.config)
    assert any(".attentions_lowlevel." in k for k in cn_state) and any("conv_degradation_mid" in k for k in cn_state)
    save_file(unet_state, str(tmp_path / "official_unet.safetensors"))
    save_file(cn_state, str(tmp_path / "official_controlnet.safetensors"))
    (tmp_path / "official_config.json").write_text(json.dumps(config))
    unet, cn, cfg = load_official(tmp_path)
    assert cfg.unet_sfa == unet_sfa and cfg.fusion_mode == "sfa"
    assert unet.up_blocks[0].pixel_attentions[0].config.num_attention_heads == 6  # per-block heads, reversed
    x = tiny_inputs(m)
    x["content_embeds"] = torch.randn(2, 7, 24)
    x["quality_embeds"] = torch.randn(2, 9, 24)
    with torch.no_grad():
        ref, ref_cn = run(m, x)
        got, got_cn = run(m, x, unet=unet, controlnet=cn)
    assert torch.equal(ref, got)
    assert all(torch.equal(a, b) for a, b in zip(ref_cn.latent_preds, got_cn.latent_preds))


def test_released_folder_layout_and_bin_weights(tmp_path):
    m = _model(SD21_LIKE)
    unet_state, cn_state, config = export_official(m.unet, m.controlnet, m.config)
    for name, state in (("unet", unet_state), ("controlnet", cn_state)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config[name]))
        torch.save(state, tmp_path / name / "diffusion_pytorch_model.bin")  # loaded with weights_only=True
    unet, cn, _ = load_official(tmp_path)
    assert torch.equal(unet.conv_in.weight, m.unet.conv_in.weight)


def test_wrong_official_weights_give_a_readable_error():
    m = _model(SD21_LIKE)
    unet_state, cn_state, config = export_official(m.unet, m.controlnet, m.config)
    cn_state.pop("conv_degradation_mid.0.weight")
    cn_state["surprise.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as e:
        build_from_official(unet_state, cn_state, config)
    msg = str(e.value)
    assert "official ControlNet" in msg and "dfc_latent_head_mid.weight" in msg and "surprise.weight" in msg


def test_not_an_official_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an official XPSR checkpoint"):
        load_official(tmp_path)


def _official_rrdb_shapes(width: int) -> dict[str, tuple[int, ...]]:
    """The official `preprocesser`: nn.Sequential of two BasicSR RRDB(width, width) (models/xpsr/controlnet.py);
    each RRDB has rdb1..rdb3, each with conv1..conv5: conv k maps width * k channels to width, 3x3."""
    shapes = {}
    for block in range(2):
        for rdb in (1, 2, 3):
            for k in range(1, 6):
                key = f"controlnet_cond_embedding.preprocesser.{block}.rdb{rdb}.conv{k}"
                shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (width, width * k, 3, 3), (width,)
    return shapes


def test_official_use_rrdb_keys_load_strictly_and_round_trip(tmp_path):
    plain = _model(SD21_LIKE)
    unet_state, cn_state, config = export_official(plain.unet, plain.controlnet, plain.config)
    g = torch.Generator().manual_seed(5)
    rrdb = {k: torch.randn(s, generator=g) * 0.02 for k, s in _official_rrdb_shapes(8).items()}
    config["controlnet"]["use_rrdb"] = True
    _, cn, cfg = build_from_official(unet_state, {**cn_state, **rrdb}, config)  # strict: no missing/extra key
    assert cfg.rrdb is True
    ours = cn.state_dict()
    assert all(torch.equal(ours[k.replace(".preprocesser.", ".preprocessor.")], v) for k, v in rrdb.items())

    m = _model(SD21_LIKE, rrdb=True)
    unet_state, cn_state, config = export_official(m.unet, m.controlnet, m.config)
    assert config["controlnet"]["use_rrdb"] is True
    assert {k: tuple(v.shape) for k, v in cn_state.items() if ".preprocesser." in k} == _official_rrdb_shapes(8)
    save_file(unet_state, str(tmp_path / "official_unet.safetensors"))
    save_file(cn_state, str(tmp_path / "official_controlnet.safetensors"))
    (tmp_path / "official_config.json").write_text(json.dumps(config))
    unet, cn, cfg = load_official(tmp_path)
    assert cfg.rrdb is True
    x = tiny_inputs(m)
    x["content_embeds"], x["quality_embeds"] = torch.randn(2, 7, 24), torch.randn(2, 9, 24)
    with torch.no_grad():
        ref, ref_cn = run(m, x)
        got, got_cn = run(m, x, unet=unet, controlnet=cn)
    assert torch.equal(ref, got)
    assert all(torch.equal(a, b) for a, b in zip(ref_cn.pixel_rgbs, got_cn.pixel_rgbs))
