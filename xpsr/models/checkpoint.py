"""Checkpoints: only the trained weights, as safetensors, with the resolved config in the metadata."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from xpsr.config import ModelConfig
from xpsr.errors import XPSRError
from xpsr.models.build import apply_gradient_checkpointing, inject_controlnet, inject_unet, unet_trainable_names

FORMAT = "xpsr-trained-v1"


class CheckpointMismatchError(KeyError):
    """A state dict does not fit the model; the message lists missing, unexpected and mis-shaped keys."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# A one-step student's UNet carries the settings it was trained under (mode, t*, LR latent) as this attribute, and
# an exported unet/config.json as this entry, so every face that loads the weights runs them as trained
# (xpsr.inference.trained_settings reads and checks it).
STUDENT_SETTINGS = "xpsr_onestep"


def check_student_settings(value: Any, where: str) -> dict[str, Any]:
    """``value`` as a student record ``{"mode": "onestep", "timestep": 0..999, "lr_latent": "mean"|"sample"}``;
    anything else raises, naming ``where`` and the entry."""
    ok = (isinstance(value, dict) and set(value) == {"mode", "timestep", "lr_latent"} and value["mode"] == "onestep"
          and isinstance(value["timestep"], int) and not isinstance(value["timestep"], bool)
          and 0 <= value["timestep"] <= 999 and value["lr_latent"] in ("mean", "sample"))
    if not ok:
        raise CheckpointMismatchError(f"{where}: bad {STUDENT_SETTINGS!r} entry {value!r}; expected "
                                      '{"mode": "onestep", "timestep": 0..999, "lr_latent": "mean" or "sample"}')
    return dict(value)


_INNER = (".transformer_blocks.", ".proj_in.", ".proj_out.", ".norm.")


def _module_of(key: str) -> str:
    """The module a parameter belongs to, collapsing a transformer's internals into the transformer."""
    cut = min((key.index(m) for m in _INNER if m in key), default=key.rfind("."))
    return key[:cut]


def _listing(title: str, keys: list[str], limit: int = 30) -> str:
    if not keys:
        return ""
    if len(keys) > limit:  # group by module so a whole missing branch reads as one line
        groups: dict[str, int] = {}
        for k in keys:
            groups[_module_of(k)] = groups.get(_module_of(k), 0) + 1
        if len(groups) < len(keys):
            return _listing(f"{title}, by module", [f"{m}.* ({n} keys)" for m, n in groups.items()], limit)
    shown = "\n".join(f"    {k}" for k in keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {title} ({len(keys)}):\n{shown}{more}"


def check_keys(expected: dict[str, torch.Size], given: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``given`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k])}"
                    for k in set(expected) & set(given) if tuple(given[k].shape) != tuple(expected[k]))
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{what} does not match the model:"
            + _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
            + _listing("shape mismatches", shapes)
        )


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` with a readable error when keys or shapes differ."""
    check_keys({k: v.shape for k, v in module.state_dict().items()}, state, what)
    module.load_state_dict(state, strict=True)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        sort_metadata(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors writes them in Rust hash-map order, which is random per process (safetensors issue 584),
    so the same weights and config gave different bytes in two runs. Both serialisers write compact JSON
    with the same escapes, so the sorted header has the same length and the tensor offsets (relative to
    the end of the header) stay valid."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if not header.get("__metadata__"):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:
            raise RuntimeError(f"{path}: the sorted safetensors header is longer than the original")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces too


def trained_state_dict(unet: nn.Module, controlnet: nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes: the whole ControlNet and the UNet's XPSR additions."""
    state = {f"controlnet.{k}": v for k, v in controlnet.state_dict().items()}
    unet_state = unet.state_dict()
    state.update({f"unet.{k}": unet_state[k] for k in unet_trainable_names(unet)})
    return state


def save_trained(path: str | Path, unet: nn.Module, controlnet: nn.Module, config: dict[str, Any]) -> Path:
    """Write the trained weights to ``path`` (one safetensors file), the resolved config in its metadata."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in trained_state_dict(unet, controlnet).items()}
    _atomic_save(tensors, path, {"format": FORMAT, "config": json.dumps(config, sort_keys=True)})
    return path


class UnreadableWeightsError(XPSRError, ValueError):
    """A weights file is truncated or not safetensors; the message names the file."""


def _open_safetensors(path: str | Path):
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:  # its messages name no file
        raise UnreadableWeightsError(f"{path}: not a readable safetensors file, truncated or damaged? ({e})") from e


def read_config(path: str | Path) -> dict[str, Any]:
    """The config stored in a checkpoint written by :func:`save_trained`."""
    with _open_safetensors(path) as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an xpsr checkpoint (format={meta.get('format')!r})")
    try:
        return json.loads(meta["config"])
    except (KeyError, ValueError) as e:
        raise UnreadableWeightsError(f"{path}: the config in its metadata is missing or not JSON ({e})") from e


def load_trained(path: str | Path, unet: nn.Module, controlnet: nn.Module) -> dict[str, Any]:
    """Load weights written by :func:`save_trained` into models built with the same config (strict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    config = read_config(path)
    with _open_safetensors(path) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    expected = {k: v.shape for k, v in trained_state_dict(unet, controlnet).items()}
    check_keys(expected, state, f"checkpoint {path}")
    controlnet.load_state_dict({k[len("controlnet."):]: v for k, v in state.items() if k.startswith("controlnet.")})
    unet.load_state_dict({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}, strict=False)
    return config


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' file names for a model folder
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def with_variant(name: str, variant: str | None) -> str:
    """diffusers' naming of a weights variant: the variant goes before the last extension
    (``diffusion_pytorch_model.fp16.safetensors``, ``....safetensors.index.fp16.json``)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def save_part_weights(tensors: dict[str, torch.Tensor], folder: Path, variant: str | None = None,
                      max_shard_size: int | str | None = None) -> list[str]:
    """Write one model's weights as diffusers lays them out: one safetensors file, or shards of at most
    ``max_shard_size`` plus their index (diffusers' default limit, 10GB, when None). Returns the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    name = with_variant(WEIGHTS_NAME, variant)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size or "10GB",
                                               filename_pattern=name.replace(".safetensors", "{suffix}.safetensors"))
    for filename, keys in split.filename_to_tensors.items():
        _atomic_save({k: tensors[k] for k in keys}, folder / filename, {"format": "pt"})
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        files.append(with_variant(INDEX_NAME, variant))
        (folder / files[-1]).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def read_part_weights(folder: Path, part: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of one model folder, whole or sharded (with its index), of the given variant."""
    single, index = folder / with_variant(WEIGHTS_NAME, variant), folder / with_variant(INDEX_NAME, variant)
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif single.is_file():
        files = [single.name]
    else:
        present = sorted(p.name for p in folder.glob("*.safetensors"))
        raise FileNotFoundError(f"{folder} is not an exported XPSR {part}: it has neither {single.name} nor "
                                f"{index.name} (weights there: {present or 'none'})")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with _open_safetensors(folder / name) as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def export_diffusers(output_dir: str | Path, unet: nn.Module, controlnet: nn.Module, model_config: dict,
                     variant: str | None = None, max_shard_size: int | str | None = None) -> Path:
    """Write ``unet/`` and ``controlnet/`` folders (config.json + diffusion_pytorch_model.safetensors, or its
    ``variant`` / shards as diffusers names them).

    Stock ``ControlNetModel.from_pretrained`` reads the base weights from them (and reports the XPSR keys
    as unexpected); :func:`load_exported` rebuilds the full XPSR modules.
    """
    output_dir = Path(output_dir)
    for name, model, cls in (("unet", unet, "UNet2DConditionModel"), ("controlnet", controlnet, "ControlNetModel")):
        folder = output_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
        config.update({"_class_name": cls, "xpsr": model_config})
        if getattr(model, STUDENT_SETTINGS, None):
            config[STUDENT_SETTINGS] = dict(getattr(model, STUDENT_SETTINGS))
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_part_weights(tensors, folder, variant, max_shard_size)
    return output_dir


def build_exported_part(config: dict[str, Any], part: str, where: str = "config.json"):
    """The XPSR part (``"unet"`` or ``"controlnet"``) a ``config.json`` with an ``xpsr`` section describes,
    freshly initialised. Returns ``(model, model_config)``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    config = dict(config)
    if not isinstance(config.get("xpsr"), dict):
        raise CheckpointMismatchError(f"{where} has no 'xpsr' section: not written by xpsr's export or an XPSR "
                                      "pipeline's part, so the XPSR modules it needs are unknown")
    try:
        model_config = ModelConfig(**config.pop("xpsr"))
    except TypeError as e:
        raise CheckpointMismatchError(f"{where}: bad 'xpsr' section ({e})") from None
    student = config.pop(STUDENT_SETTINGS, None)
    if student is not None:
        student = check_student_settings(student, where)
    if part == "unet":
        model = inject_unet(UNet2DConditionModel.from_config(config), model_config)
    elif part == "controlnet":
        model = inject_controlnet(ControlNetModel.from_config(config), model_config)
    else:
        raise ValueError(f"unknown part {part!r} (unet or controlnet)")
    if student is not None:
        setattr(model, STUDENT_SETTINGS, student)
    return model, model_config


def load_exported_part(folder: str | Path, part: str, dtype: torch.dtype | None = None, variant: str | None = None):
    """Rebuild one part (``"unet"`` or ``"controlnet"``) from its folder written by :func:`export_diffusers`
    (or the part's own ``save_pretrained``): the stock model from ``config.json``, the XPSR modules its
    ``xpsr`` section asks for, then a strict load of its weights. Returns ``(model, model_config)``."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not an exported XPSR {part}: {config_file} is missing")
    model, model_config = build_exported_part(json.loads(config_file.read_text()), part, str(config_file))
    load_strict(model, read_part_weights(folder, part, variant), f"{folder}")
    apply_gradient_checkpointing(model, model_config)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval(), model_config


def load_exported(folder: str | Path):
    """Rebuild ``(unet, controlnet, model_config)`` from a folder written by :func:`export_diffusers`."""
    folder = Path(folder)
    for name in ("unet", "controlnet"):
        if not (folder / name / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not an exported XPSR model: {folder / name / 'config.json'} "
                                    "is missing")
    unet, _ = load_exported_part(folder / "unet", "unet")
    controlnet, model_config = load_exported_part(folder / "controlnet", "controlnet")
    return unet, controlnet, model_config
