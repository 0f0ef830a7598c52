"""Teacher outputs on disk: the frozen multi-step XPSR teacher's SR latents, computed once per input.

Key = sha256 of (teacher hash, input hash, canonical sampler settings). The teacher hash covers its weights
and the settings that shape its forward without being tensors; the input hash covers the exact condition
tensor (LR upscaled, after crop and flip) and both prompts. Any change of any component is a different key,
so an entry is never reused across a change of teacher, input or sampler. One safetensors file per key,
written to a temporary name and renamed (complete or absent after kill -9; ranks that race write the same
bytes and the last rename wins). Each file also stores its key's components, checked on read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# InferConfig keys that decide the teacher's output (paths, device and prompt sources do not)
_NOT_SAMPLER = ("input", "output_dir", "weights", "device", "cache", "caption_first", "caption_missing", "prompts",
                "prompt", "quality_prompt", "model", "multistep_on_student")


def sampler_settings(infer_cfg) -> dict:
    """The canonical (sorted, JSON) settings of the teacher's sampler."""
    values = dataclasses.asdict(infer_cfg)
    return {k: values[k] for k in sorted(values) if k not in _NOT_SAMPLER}


def weights_hash(models: Iterable[torch.nn.Module]) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes) of ``models``, in order."""
    h = hashlib.sha256()
    for i, model in enumerate(models):
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ModelConfig keys the forward does not depend on beyond the weights: where the parts came from, the seed of
# fresh inits (the weights show them) and a training-only switch
_NOT_FORWARD = ("base", "revision", "seed", "gradient_checkpointing")


def teacher_hash(models: Iterable[torch.nn.Module], model_cfg, scheduler_config) -> str:
    """The teacher's identity: every tensor of ``models`` (``weights_hash``) plus what decides their output
    without being a tensor: the XPSR model settings (e.g. ``fusion_mode``: sfa and sequential share every key)
    and the noise scheduler's config (e.g. ``prediction_type``, the beta schedule)."""
    settings = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in _NOT_FORWARD}
    h = hashlib.sha256(weights_hash(models).encode())
    h.update(json.dumps({"model": settings, "scheduler": dict(scheduler_config)}, sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def input_hash(lr_cond: torch.Tensor, content: str, quality: str) -> str:
    """sha256 of one condition image (C, H, W; its float32 bytes and shape) and its two prompts."""
    t = lr_cond.detach().float().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    h.update(json.dumps([content, quality]).encode())
    return h.hexdigest()


def cache_key(teacher: str, image: str, sampler: dict) -> str:
    return hashlib.sha256(json.dumps({"teacher": teacher, "input": image, "sampler": sampler},
                                     sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """``get(lr_cond, content, quality, make)``: the cached teacher latents, or ``make()``'s, stored."""

    def __init__(self, folder: str | Path, teacher_hash: str, sampler: dict):
        self.folder, self.teacher_hash, self.sampler = Path(folder), teacher_hash, sampler
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, lr_cond: torch.Tensor, content: str, quality: str,
            make: Callable[[], torch.Tensor]) -> torch.Tensor:
        image = input_hash(lr_cond, content, quality)
        key = cache_key(self.teacher_hash, image, self.sampler)
        path = self.path(key)
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != key:
                raise ValueError(f"teacher cache entry {path} does not belong to its key (file damaged or moved)")
            self.hits += 1
            return load_file(str(path))["latents"]
        latents = make().detach().float().cpu().contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"latents": latents}, tmp, metadata={"key": key, "teacher": self.teacher_hash, "input": image,
                                                          "sampler": json.dumps(self.sampler, sort_keys=True)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.misses += 1
        return latents
