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
    ("text_encoder_device=cpu", lambda c: setattr(c, "text_encoder_device", "cpu")),
)


DEFAULT_MARGIN = Margin()


class MemoryPlanError(XPSRError):
    """The setting will not fit (or did not fit) the GPU; the message names settings that would."""


def train_key(cfg: TrainConfig, preset: str) -> tuple:
    """What a training plan depends on (the key of the shipped planned rows)."""
    return ("train", preset, cfg.data.crop_size, cfg.batch_size, cfg.mixed_precision, cfg.frozen_unet_dtype,
            cfg.model.gradient_checkpointing, cfg.use_8bit_adam, cfg.data.latent_cache is not None, cfg.use_ema,
            cfg.text_encoder_device)


def _row_key(row: dict) -> tuple:
    return ("train", row["preset"], row["resolution"], row["batch_size"], row["mixed_precision"],
            row["frozen_unet_dtype"], row["gradient_checkpointing"], row["use_8bit_adam"], row["latent_cache"],
            row["use_ema"], row.get("text_encoder_device", "same"))


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
# what an inference plan depends on (weights_storage and offload are not modelled: a plan without them is an
# upper bound for a run with them)
INFER_KEYS = ("mode", "dtype", "latent_tile", "vae_tile", "vae_decoder_tile", "vae_tile_attention",
              "vae_tile_cache_mb")


def shipped_infer_rows(preset: str) -> list[dict]:
    """The planned inference rows shipped for ``preset`` (docs/gpu-memory.md's inference table)."""
    if not PLANNED.is_file():
        return []
    rows = [json.loads(line) for line in PLANNED.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("what") == "infer" and r["preset"] == preset]


def infer_peak(cfg, preset: str, side: int, rows: list[dict]) -> dict | None:
    """The smallest planned row of ``cfg``'s setting whose square output holds a ``side`` px processing size (an
    upper bound of the image's own peak: tiles keep the model's share fixed, only whole-image tensors grow)."""
    same = [r for r in rows if all(r[k] == getattr(cfg, k) for k in INFER_KEYS) and r["output_size"] >= side]
    return min(same, key=lambda r: r["output_size"], default=None)


def check_inference_fits(cfg, preset: str, side: int, free_bytes: float, margin: Margin = DEFAULT_MARGIN,
                         rows: list[dict] | None = None) -> str | None:
    """Raise :class:`MemoryPlanError` (one line naming shipped settings that fit) when the planned peak of a
    ``side`` px image exceeds ``free_bytes``; returns a note when no planned row covers the setting, else None."""
    rows = shipped_infer_rows(preset) if rows is None else rows
    row = infer_peak(cfg, preset, side, rows)
    if row is None:
        return (f"memory check: no planned row of this setting covers {side} px on {preset} (docs/gpu-memory.md); "
                f"`xpsr plan what=infer preset={preset} output_size={side} infer_config=YOUR.yaml` plans it")
    need = margin.needed_gib(row["peak_bytes"])
    if need * GIB <= free_bytes:
        return None
    fits = sorted({r["row"].split("/")[2] for r in rows if r["output_size"] >= side
                   and margin.needed_gib(r["peak_bytes"]) * GIB <= free_bytes})
    hint = ("; planned settings that fit: " + " | ".join(fits)) if fits else \
        f"; settings that use less: {INFER_LOW_MEMORY}"
    raise MemoryPlanError(f"an image processed at {side} px needs {need:.1f} GiB (planned peak with margin, "
                          f"{row['output_size']} px row) but the GPU has {free_bytes / GIB:.1f} GiB free{hint} "
                          "(docs/gpu-memory.md; memory_check=false skips this check)")


def inference_preset(modules) -> str | None:
    """sd15 / sd21 by the UNet's text width; None for other shapes (tiny), which have no planned rows."""
    return {768: "sd15", 1024: "sd21"}.get(modules.unet.config.cross_attention_dim)


def check_inference_memory(cfg, modules, sizes: list[tuple[int, int]], device, margin: Margin = DEFAULT_MARGIN,
                           free_bytes: float | None = None) -> None:
    """`xpsr infer`'s hook before the first image: on CUDA (or with ``free_bytes`` given, as tests do) the largest
    image's plan against the memory this process can still use (free + what it already holds)."""
    import torch

    preset = inference_preset(modules)
    if not cfg.memory_check or not sizes or preset is None:
        return
    if free_bytes is None:
        if torch.device(device).type != "cuda":
            return
        free_bytes = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    note = check_inference_fits(cfg, preset, max(max(s) for s in sizes), free_bytes, margin)
    if note:
        print(note)


@contextlib.contextmanager
def guard_inference(cfg):
    """`xpsr infer`: a CUDA out-of-memory error in one line naming the settings that use less memory (the check
    before the first image is :func:`check_inference_memory`)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise MemoryPlanError(f"CUDA ran out of memory (dtype={cfg.dtype}, weights_storage={cfg.weights_storage}, "
                              f"offload={cfg.offload}, vae_decoder_tile={cfg.vae_decoder_tile}); settings that use "
                              f"less: {INFER_LOW_MEMORY}; docs/gpu-memory.md has the planned peaks") from None
