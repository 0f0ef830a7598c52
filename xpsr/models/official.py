"""Import of the official XPSR checkpoint format into our modules.

The official release forks diffusers' UNet/ControlNet classes; its weights use key names such as
``down_blocks.N.attentions_lowlevel.M.*`` and its configs carry extra entries (``use_lowlevel_prompt``,
``return_rgbs`` ...). We build stock diffusers models from the configs, inject the XPSR modules the extras
ask for, rename the keys and load strictly.

Accepted layouts:
* ``DIR/official_config.json`` (``{"unet": {...}, "controlnet": {...}}``) + ``DIR/official_unet.safetensors``
  + ``DIR/official_controlnet.safetensors`` (our golden test data);
* ``DIR/unet/`` and ``DIR/controlnet/``, each with ``config.json`` and ``diffusion_pytorch_model.safetensors``
  (or ``.bin``, read with ``torch.load(weights_only=True)``) -- how the released checkpoints are saved.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file

from xpsr.config import ModelConfig
from xpsr.models.checkpoint import load_strict
from xpsr.models.controlnet import XPSRControlNet, as_xpsr_controlnet
from xpsr.models.pixel_attention import XPSRUNet, as_xpsr_unet, inject_pixel_attention
from xpsr.models.sfa import inject_sfa

UNET_EXTRAS = ("up_use_lowlevel_prompt", "mid_use_lowlevel_prompt", "down_use_lowlevel_prompt")
CONTROLNET_EXTRAS = ("return_rgbs", "use_rrdb", "use_lowlevel_prompt", "use_latent_pred")

# (official key, our key) templates: {block} any prefix, {i} an index, {rest} the rest of the key.
_KEY_TEMPLATES = [
    ("{block}.attentions_lowlevel.{i}.{rest}", "{block}.attentions.{i}.quality_transformer.{rest}"),
    ("{block}.attentions_connect.{i}.{rest}", "{block}.attentions.{i}.fusion_transformer.{rest}"),
    ("conv_degradation.{i}.0.{rest}", "dfc_latent_heads.{i}.{rest}"),
    ("conv_degradation_mid.0.{rest}", "dfc_latent_head_mid.{rest}"),
    ("controlnet_cond_embedding.preprocesser.{rest}", "controlnet_cond_embedding.preprocessor.{rest}"),
]
_FIELDS = {"block": r"(?P<block>.+?)", "i": r"(?P<i>\d+)", "rest": r"(?P<rest>.+)"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("^" + "".join(_FIELDS[p] if k % 2 else re.escape(p) for k, p in enumerate(parts)) + "$")


_OFFICIAL_TO_OURS = [(_compile(official), ours) for official, ours in _KEY_TEMPLATES]
_OURS_TO_OFFICIAL = [(_compile(ours), official) for official, ours in _KEY_TEMPLATES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, target in table:
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict())
    return key


def rename_official_key(key: str) -> str:
    """An official checkpoint key -> ours (keys of the stock diffusers parts are unchanged)."""
    return _rename(key, _OFFICIAL_TO_OURS)


def to_official_key(key: str) -> str:
    """Ours -> the official key (to hand weights trained here to the official code)."""
    return _rename(key, _OURS_TO_OFFICIAL)


def _strip(config: dict, extras: tuple[str, ...]) -> dict:
    return {k: v for k, v in config.items() if k not in extras and not k.startswith("_")}


def _flags(values: Any, n: int) -> list[bool]:
    return [bool(v) for v in values][:n] if isinstance(values, (list, tuple)) else [bool(values)] * n


def build_from_official(unet_state: dict[str, torch.Tensor], controlnet_state: dict[str, torch.Tensor],
                        config: dict) -> tuple[XPSRUNet | UNet2DConditionModel, XPSRControlNet, ModelConfig]:
    """Stock models from the official configs, XPSR modules injected as the configs say, weights loaded."""
    for part in ("unet", "controlnet"):
        if part not in config:
            raise KeyError(f"official config has no '{part}' section (keys: {sorted(config)})")
    ucfg, ccfg = config["unet"], config["controlnet"]
    unet = UNet2DConditionModel.from_config(_strip(ucfg, UNET_EXTRAS))
    controlnet = ControlNetModel.from_config(_strip(ccfg, CONTROLNET_EXTRAS))

    quality = bool(ccfg.get("use_lowlevel_prompt", True))
    model_cfg = ModelConfig(
        base="official",
        fusion_mode="sfa" if quality else "content_only",
        sfa_down_blocks=None,
        sfa_mid=quality,
        pixel_attention=any(".pixel_attentions." in k for k in unet_state),
        pixel_attention_init="random",
        dfc_pixel_heads=bool(ccfg.get("return_rgbs", True)),
        dfc_latent_heads=bool(ccfg.get("use_latent_pred", True)),
        rrdb=bool(ccfg.get("use_rrdb", False)),
        conditioning_channels=list(ccfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
    )
    # ControlNet: SFA in every cross-attention down block and the mid block (when use_lowlevel_prompt).
    inject_sfa(controlnet, model_cfg.fusion_mode, down_blocks=None, mid=model_cfg.sfa_mid)
    controlnet = as_xpsr_controlnet(controlnet, pixel_heads=model_cfg.dfc_pixel_heads,
                                    latent=model_cfg.dfc_latent_heads, rrdb=model_cfg.rrdb)
    # UNet: optional SFA (the *_use_lowlevel_prompt flags), then pixel attention.
    n_down, n_up = len(ucfg["down_block_types"]), len(ucfg["up_block_types"])
    down = [i for i, f in enumerate(_flags(ucfg.get("down_use_lowlevel_prompt", False), n_down)) if f]
    up = [i for i, f in enumerate(_flags(ucfg.get("up_use_lowlevel_prompt", False), n_up)) if f]
    mid = bool(ucfg.get("mid_use_lowlevel_prompt", False))
    if down or up or mid:
        model_cfg.unet_sfa = True
        inject_sfa(unet, "sfa", down_blocks=down, mid=mid, up_blocks=up)
        as_xpsr_unet(unet)
    if model_cfg.pixel_attention:
        unet = inject_pixel_attention(unet, init="random")

    load_strict(unet, {rename_official_key(k): v for k, v in unet_state.items()}, "official UNet")
    load_strict(controlnet, {rename_official_key(k): v for k, v in controlnet_state.items()}, "official ControlNet")
    return unet.eval(), controlnet.eval(), model_cfg


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "diffusion_pytorch_model.safetensors"
    if st.is_file():
        return load_file(st)
    binary = folder / "diffusion_pytorch_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin)")


def load_official(path: str | Path):
    """Load an official XPSR checkpoint folder (either layout in the module docstring)."""
    path = Path(path)
    if (path / "official_config.json").is_file():
        config = json.loads((path / "official_config.json").read_text())
        unet_state = load_file(path / "official_unet.safetensors")
        controlnet_state = load_file(path / "official_controlnet.safetensors")
    elif (path / "unet" / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        config = {p: json.loads((path / p / "config.json").read_text()) for p in ("unet", "controlnet")}
        unet_state, controlnet_state = _read_weights(path / "unet"), _read_weights(path / "controlnet")
    else:
        raise FileNotFoundError(
            f"{path} is not an official XPSR checkpoint: expected official_config.json + official_*.safetensors, "
            "or unet/ and controlnet/ subfolders with config.json and diffusion_pytorch_model.safetensors"
        )
    return build_from_official(unet_state, controlnet_state, config)


def export_official(unet, controlnet, model_config: ModelConfig) -> tuple[dict, dict, dict]:
    """Our modules as official-format ``(unet_state, controlnet_state, {"unet": cfg, "controlnet": cfg})``.

    The inverse of :func:`build_from_official`: hands weights trained here to the official code.
    """
    if model_config.fusion_mode not in ("sfa", "content_only"):
        raise ValueError(f"the official code has no fusion mode {model_config.fusion_mode!r}")
    ucfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    n_up = len(ucfg["up_block_types"])
    ucfg.update(up_use_lowlevel_prompt=[model_config.unet_sfa] * (n_up + 1),
                mid_use_lowlevel_prompt=model_config.unet_sfa, down_use_lowlevel_prompt=model_config.unet_sfa)
    ccfg = {k: v for k, v in dict(controlnet.config).items() if not k.startswith("_")}
    ccfg.update(return_rgbs=model_config.dfc_pixel_heads, use_rrdb=model_config.rrdb,
                use_lowlevel_prompt=model_config.fusion_mode == "sfa", use_latent_pred=model_config.dfc_latent_heads)
    unet_state = {to_official_key(k): v for k, v in unet.state_dict().items()}
    cn_state = {to_official_key(k): v for k, v in controlnet.state_dict().items()}
    return unet_state, cn_state, {"unet": ucfg, "controlnet": ccfg}
