"""Fail before the first step: compare the plan of a setting with the GPU's free memory, and name settings
that would fit. The same one-line message reports a real CUDA out-of-memory error.

Settings that fit come from a ladder of low-memory options applied to the user's setting in order of what
they cost (half-precision frozen parts cost nothing; checkpointing costs a forward; 8-bit moments and cached
latents change the numbers slightly; a smaller batch changes the recipe), each planned (or found among the
shipped planned rows, xpsr/memory/planned.jsonl).
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from pathlib import Path

from xpsr.config import TrainConfig
from xpsr.errors import XPSRError
from xpsr.memory.gpus import GIB, Margin

PLANNED = Path(__file__).with_name("planned.jsonl")
LADDER = (
    ("mixed_precision=bf16 frozen_unet_dtype=mixed_precision",
     lambda c: (setattr(c, "mixed_precision", "bf16"), setattr(c, "frozen_unet_dtype", "mixed_precision"))),
    ("model.gradient_checkpointing=true", lambda c: setattr(c.model, "gradient_checkpointing", True)),
    ("use_8bit_adam=true", lambda c: setattr(c, "use_8bit_adam", True)),
    ("data.latent_cache=DIR", lambda c: setattr(c.data, "latent_cache", "latents")),
)


DEFAULT_MARGIN = Margin()


class MemoryPlanError(XPSRError):
    """The setting will not fit (or did not fit) the GPU; the message names settings that would."""


def train_key(cfg: TrainConfig, preset: str) -> tuple:
    """What a training plan depends on (the key of the shipped planned rows)."""
    return ("train", preset, cfg.data.crop_size, cfg.batch_size, cfg.mixed_precision, cfg.frozen_unet_dtype,
            cfg.model.gradient_checkpointing, cfg.use_8bit_adam, cfg.data.latent_cache is not None, cfg.use_ema)


def _row_key(row: dict) -> tuple:
    return ("train", row["preset"], row["resolution"], row["batch_size"], row["mixed_precision"],
            row["frozen_unet_dtype"], row["gradient_checkpointing"], row["use_8bit_adam"], row["latent_cache"],
            row["use_ema"])


def shipped_peaks() -> dict[tuple, int]:
    """Peak bytes of the planned rows shipped with the package (docs/gpu-memory.md's training table)."""
    if not PLANNED.is_file():
        return {}
    rows = [json.loads(line) for line in PLANNED.read_text().splitlines() if line.strip()]
    return {_row_key(r): r["peak_bytes"] for r in rows if r.get("what") == "train"}


def planned_peak(cfg: TrainConfig, preset: str) -> int:
    """The planned peak of ``cfg``: a shipped row when one matches, else a fresh plan (minutes at SD size)."""
    known = shipped_peaks().get(train_key(cfg, preset))
    if known is not None:
        return known
    from xpsr.memory.train_plan import plan_training

    return plan_training(cfg, preset)["peak_bytes"]


def settings_that_fit(cfg: TrainConfig, preset: str, free_bytes: float, margin: Margin,
                      plan: Callable[[TrainConfig, str], int] = planned_peak, limit: int = 2) -> list[str]:
    """Up to ``limit`` override lines (cumulative low-memory options, then smaller batches) whose plan fits."""
    found, changes, current = [], [], copy.deepcopy(cfg)
    candidates = []
    for text, apply in LADDER:
        apply(current)
        changes.append(text)
        candidates.append((list(changes), copy.deepcopy(current)))
    batch = cfg.batch_size // 2
    while batch >= 1:
        c = copy.deepcopy(current)
        c.batch_size = batch
        candidates.append((changes + [f"batch_size={batch}"], c))
        batch //= 2
    for words, candidate in candidates:
        if margin.needed_gib(plan(candidate, preset)) * GIB <= free_bytes:
            found.append(" ".join(words))
            if len(found) == limit:
                break
    return found


def check_training_fits(cfg: TrainConfig, preset: str, free_bytes: float, margin: Margin = DEFAULT_MARGIN,
                        plan: Callable[[TrainConfig, str], int] = planned_peak) -> int:
    """Raise :class:`MemoryPlanError` (one line) when ``cfg``'s plan with ``margin`` exceeds ``free_bytes``;
    returns the planned peak otherwise."""
    peak = plan(cfg, preset)
    need = margin.needed_gib(peak)
    if need * GIB <= free_bytes:
        return peak
    raise MemoryPlanError(too_big("this setting needs", need, free_bytes, cfg, preset, margin, plan))


def too_big(what: str, need_gib: float | None, free_bytes: float, cfg: TrainConfig, preset: str, margin: Margin,
            plan: Callable[[TrainConfig, str], int]) -> str:
    fits = settings_that_fit(cfg, preset, free_bytes, margin, plan)
    need = f" {need_gib:.1f} GiB (planned peak with margin)" if need_gib is not None else ""
    hint = ("; settings that fit: " + " | ".join(fits)) if fits else "; no setting of the ladder fits (smaller crop?)"
    return f"{what}{need} but the GPU has {free_bytes / GIB:.1f} GiB free{hint} (docs/gpu-memory.md)"


def check_fits(result: dict, free_gib: float, margin: Margin) -> None:
    """`xpsr plan free_gib=...`: one line when the planned setting does not fit."""
    need = margin.needed_gib(result["peak_bytes"])
    if need > free_gib:
        raise MemoryPlanError(f"the plan needs {need:.1f} GiB (peak with margin) but only {free_gib:g} GiB are "
                              f"free; see the low-memory settings in docs/gpu-memory.md")


def preset_of(model_cfg) -> str:
    """The shapes a base model has: tiny, sd21 (text width 1024) or sd15."""
    if model_cfg.base == "tiny":
        return "tiny"
    unet_config = Path(model_cfg.base).expanduser() / "unet" / "config.json"
    if unet_config.is_file():
        return "sd21" if json.loads(unet_config.read_text()).get("cross_attention_dim") == 1024 else "sd15"
    return "sd21" if "2-1" in model_cfg.base or "2.1" in model_cfg.base else "sd15"


@contextlib.contextmanager
def guard_training(cfg: TrainConfig, margin: Margin = DEFAULT_MARGIN):
    """`xpsr train` on CUDA: refuse before the first step when the plan does not fit the free memory, and turn
    a CUDA out-of-memory error into the same one line. On CPU (or ``memory_check=false``) it does nothing."""
    import torch

    if cfg.device == "cpu" or not cfg.memory_check or not torch.cuda.is_available():
        yield
        return
    free, _ = torch.cuda.mem_get_info()
    preset = preset_of(cfg.model)
    check_training_fits(cfg, preset, free, margin, plan=planned_peak)  # looked up now (tests replace it)
    try:
        yield
    except torch.OutOfMemoryError:
        raise MemoryPlanError(too_big("CUDA ran out of memory:", None, free, cfg, preset, margin,
                                      planned_peak)) from None


INFER_LOW_MEMORY = ("dtype=fp16 weights_storage=fp8 offload=model vae_decoder_tile=96 vae_tile_cache_mb=512 "
                    "(or --config configs/infer/xpsr_8gb.yaml)")


@contextlib.contextmanager
def guard_inference(cfg):
    """`xpsr infer`: a CUDA out-of-memory error in one line naming the settings that use less memory. (The
    plan of one image is `xpsr plan what=infer`; the input sizes are only known image by image.)"""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise MemoryPlanError(f"CUDA ran out of memory (dtype={cfg.dtype}, weights_storage={cfg.weights_storage}, "
                              f"offload={cfg.offload}, vae_decoder_tile={cfg.vae_decoder_tile}); settings that use "
                              f"less: {INFER_LOW_MEMORY}; docs/gpu-memory.md has the planned peaks") from None
