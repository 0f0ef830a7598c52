"""The inference settings weights were trained under, and how a call's settings default to them.

A one-step student is trained at one timestep t* (``onestep.timestep``) from one kind of LR latent
(``onestep.lr_latent``); run with other settings, or through the multi-step sampler, it gives a wrong picture
without an error. So these settings travel with the weights to every face:

- a training run / checkpoint: the ``onestep`` section of the config stored in ``trained.safetensors``;
- an ``xpsr export`` folder (LoRA merged): the ``xpsr_onestep`` entry of ``unet/config.json``;
- in memory: the UNet's ``xpsr_onestep`` attribute (set by the loaders and by one-step training).

``InferConfig.mode``, ``onestep_timestep`` and ``lr_latent`` default to ``None``, meaning "as the weights were
trained"; :func:`resolve_settings` fills them in. A value the user set is kept, except the multi-step sampler on
a student, which is refused unless ``multistep_on_student=true``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from xpsr.config import InferConfig, OneStepConfig
from xpsr.models.checkpoint import STUDENT_SETTINGS, check_student_settings
from xpsr.models.forward import unwrap

# the sampler's LR latent when nothing says otherwise: a posterior sample, as the official XPSR test script
MULTISTEP_LR_LATENT = "sample"


@dataclasses.dataclass(frozen=True)
class TrainedSettings:
    """What weights were trained to be run with. ``mode="multistep"`` (the XPSR sampler, any weights that are
    not a one-step student) leaves the other two ``None``."""

    mode: str = "multistep"
    onestep_timestep: int | None = None
    lr_latent: str | None = None
    source: str = "weights"  # what said so, for messages

    @property
    def is_student(self) -> bool:
        return self.mode == "onestep"


def _student(record: dict[str, Any], source: str) -> TrainedSettings:
    return TrainedSettings("onestep", record["timestep"], record["lr_latent"], source)


def student_record(timestep: int, lr_latent: str) -> dict[str, Any]:
    """The machine-readable record of a one-step student (UNet attribute, ``unet/config.json`` entry)."""
    return check_student_settings({"mode": "onestep", "timestep": int(timestep), "lr_latent": lr_latent},
                                  "one-step settings")


def mark_student(unet, ocfg: OneStepConfig) -> None:
    """Record on ``unet`` that it is a one-step student trained under ``ocfg`` (exports write it out)."""
    setattr(unwrap(unet), STUDENT_SETTINGS, student_record(ocfg.timestep, ocfg.lr_latent))


def settings_of(modules) -> TrainedSettings:
    """The trained-under settings of loaded weights (an ``XPSRModules`` or an ``XPSRPipeline``)."""
    record = getattr(unwrap(modules.unet), STUDENT_SETTINGS, None)  # inside DDP / torch.compile wrappers
    if record is None:
        return TrainedSettings(source="these weights")
    return _student(check_student_settings(record, f"unet.{STUDENT_SETTINGS}"), "these weights")


def _from_stored_config(path: Path) -> TrainedSettings:
    from xpsr.models.checkpoint import read_config

    onestep = read_config(path).get("onestep") or {}
    if not onestep.get("enabled"):
        return TrainedSettings(source=str(path))
    defaults = OneStepConfig()
    record = student_record(onestep.get("timestep", defaults.timestep), onestep.get("lr_latent", defaults.lr_latent))
    return _student(record, f"{path} (onestep section of its training config)")


def trained_settings(weights: str | Path | None) -> TrainedSettings:
    """The settings ``weights`` were trained under, read from their files without building the model: a run dir,
    a checkpoint folder (``checkpoints/step-N``), a ``trained.safetensors``, an ``xpsr export`` /
    ``save_pretrained`` folder or its ``unet/``, an official folder (multi-step), or ``None`` (the fresh model)."""
    if weights is None:
        return TrainedSettings(source="the freshly built model")
    path = Path(weights)
    for inside in ("final/trained.safetensors", "trained.safetensors"):
        if path.is_dir() and (path / inside).is_file():
            return _from_stored_config(path / inside)
    if path.is_file():
        return _from_stored_config(path)
    for config_file in (path / "unet" / "config.json", path / "config.json"):
        if config_file.is_file():
            record = json.loads(config_file.read_text()).get(STUDENT_SETTINGS)
            if record is None:
                return TrainedSettings(source=str(path))
            return _student(check_student_settings(record, str(config_file)), f"{config_file} ({STUDENT_SETTINGS})")
    if not path.exists():
        raise FileNotFoundError(f"weights={path} does not exist")
    return TrainedSettings(source=str(path))  # an official folder: the multi-step XPSR model


def resolve_settings(cfg: InferConfig, trained: TrainedSettings) -> InferConfig:
    """``cfg`` with ``mode``, ``onestep_timestep`` and ``lr_latent`` that were left ``None`` taken from ``trained``
    (for one-step weights that do not say: ``OneStepConfig``'s defaults; for the sampler: a posterior sample)."""
    mode = cfg.mode or trained.mode
    if mode == "multistep" and trained.is_student and not cfg.multistep_on_student:
        raise ValueError(
            f"{trained.source}: a one-step student (t*={trained.onestep_timestep}, lr_latent={trained.lr_latent}), "
            "whose LoRA would change every step of the multi-step sampler: leave mode unset or pass mode=onestep "
            "(or use the teacher's weights; multistep_on_student=true runs the sampler on the student anyway)")
    timestep, lr_latent = cfg.onestep_timestep, cfg.lr_latent
    if mode == "onestep":
        defaults = OneStepConfig()
        if timestep is None:
            timestep = trained.onestep_timestep if trained.onestep_timestep is not None else defaults.timestep
        lr_latent = lr_latent or trained.lr_latent or defaults.lr_latent
    else:
        lr_latent = lr_latent or MULTISTEP_LR_LATENT
    return dataclasses.replace(cfg, mode=mode, onestep_timestep=timestep, lr_latent=lr_latent)
