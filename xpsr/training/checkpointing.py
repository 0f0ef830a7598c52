"""Training checkpoints: trained weights (our safetensors format), optimizer, LR schedule, EMA, RNG, position.

Each checkpoint is written to a temp folder and renamed, so `checkpoints/step-N` is complete or absent.
Nothing is unpickled on load: optimizer/scheduler states are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xpsr.models.checkpoint import load_trained, save_trained


@dataclass
class TrainState:
    step: int = 0
    samples: int = 0  # samples this process has consumed (the data position)
    max_steps: int | None = None  # the run's target when saved: a resume with another target may change the LR


class EMA:
    """Exponential moving average of the trainable weights (fp32 copies)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def swap(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Exchange live and EMA weights (call twice to undo)."""
        for k, p in params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[k].to(p.dtype))
            self.shadow[k].copy_(tmp.float())


def save_checkpoint(folder: Path, unet, controlnet, config: dict, optimizer, lr_scheduler, state: TrainState,
                    generator: torch.Generator, ema: EMA | None) -> Path:
    """Write everything a resume needs into ``folder`` atomically."""
    tmp = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trained(tmp / "trained.safetensors", unet, controlnet, config)
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    np_state = np.random.get_state()
    (tmp / "state.json").write_text(json.dumps({
        **asdict(state), "python_random": repr(random.getstate()),
        "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_checkpoint(folder: Path, unet, controlnet, optimizer, lr_scheduler, generator: torch.Generator,
                    ema: EMA | None) -> TrainState:
    import ast

    for name in ("trained.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "state.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} is incomplete: {name} is missing")
    load_trained(folder / "trained.safetensors", unet, controlnet)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    if ema is not None:
        if not (folder / "ema.safetensors").is_file():
            raise FileNotFoundError(f"use_ema is on but {folder} has no ema.safetensors")
        ema.shadow = load_file(str(folder / "ema.safetensors"))
    rng = load_file(str(folder / "rng.safetensors"))
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available() and "cuda_0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in rng])
    meta = json.loads((folder / "state.json").read_text())
    random.setstate(ast.literal_eval(meta["python_random"]))
    kind, keys, *rest = meta["numpy_random"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return TrainState(step=meta["step"], samples=meta["samples"], max_steps=meta.get("max_steps"))


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """``resume='latest'``: the newest complete checkpoint under output_dir (None if there is none)."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint folder")
        return path
    found = sorted((p for p in (output_dir / "checkpoints").glob("step-*") if p.is_dir()),
                   key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    found = sorted((p for p in (output_dir / "checkpoints").glob("step-*") if p.is_dir()),
                   key=lambda p: int(p.name.split("-")[1]))
    for old in found[:-keep] if keep > 0 else found:
        shutil.rmtree(old)


def warn_if_schedule_changes(scheduler_name: str, saved_max_steps: int | None, max_steps: int) -> str | None:
    """Resuming with another ``max_steps``: a constant schedule continues exactly; linear and cosine
    schedules are functions of ``max_steps``, so from the next step on the LR follows the curve for the
    new ``max_steps`` (a jump at the resume step, not a stretched continuation). Warns; returns the message."""
    if saved_max_steps is None or saved_max_steps == max_steps or scheduler_name.startswith("constant"):
        return None
    message = (f"resumed a run saved with max_steps={saved_max_steps} with max_steps={max_steps}: the "
               f"{scheduler_name} LR schedule depends on max_steps, so from here the LR follows the schedule "
               f"for {max_steps} steps (it jumps at the resume step)")
    warnings.warn(message, stacklevel=2)
    return message
