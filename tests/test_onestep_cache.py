"""The teacher-output cache: keyed by (teacher weights, input, sampler); never reused across a change."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from xpsr.config import InferConfig
from xpsr.onestep.teacher_cache import (
    TeacherCache,
    cache_key,
    input_hash,
    sampler_settings,
    teacher_hash,
    weights_hash,
)


def _counting(value):
    calls = []

    def make():
        calls.append(1)
        return value.clone()

    return make, calls


def test_key_changes_with_each_component():
    lr = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = sampler_settings(InferConfig(input="-", output_dir="-"))
    base = cache_key("w", input_hash(lr, "a cat", "blurry"), sampler)
    flipped = lr.flip(-1)
    nudged = lr.clone()
    nudged[0, 0, 0] += 1e-6
    changed = [
        cache_key("w2", input_hash(lr, "a cat", "blurry"), sampler),
        cache_key("w", input_hash(flipped, "a cat", "blurry"), sampler),
        cache_key("w", input_hash(nudged, "a cat", "blurry"), sampler),
        cache_key("w", input_hash(lr, "a dog", "blurry"), sampler),
        cache_key("w", input_hash(lr, "a cat", "noisy"), sampler),
        cache_key("w", input_hash(lr, "a cat", "blurry"), {**sampler, "num_inference_steps": 19}),
        cache_key("w", input_hash(lr, "a cat", "blurry"), {**sampler, "seed": 1}),
    ]
    assert len({base, *changed}) == len(changed) + 1
    assert base == cache_key("w", input_hash(lr.clone(), "a cat", "blurry"), dict(reversed(sampler.items())))


def test_sampler_settings_ignore_paths_but_not_sampling_keys():
    a = InferConfig(input="x", output_dir="y")
    assert sampler_settings(a) == sampler_settings(dataclasses.replace(a, input="z", output_dir="w", device="cpu"))
    for key, value in (("guidance_scale", 1.5), ("scheduler", "ddim"), ("added_noise_level", 400),
                       ("negative_prompt", "bad"), ("lr_latent", "mean")):
        assert sampler_settings(a) != sampler_settings(dataclasses.replace(a, **{key: value})), key


def test_weights_hash_sees_every_tensor(make_tiny):
    modules = make_tiny()
    parts = (modules.unet, modules.controlnet)
    before = weights_hash(parts)
    assert weights_hash(parts) == before
    with torch.no_grad():
        next(modules.controlnet.parameters()).view(-1)[0] += 1e-3
    assert weights_hash(parts) != before


def test_reused_across_epochs_and_missed_after_any_change(tmp_path):
    lr = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = torch.randn(4, 2, 2)
    sampler = {"steps": 20, "seed": 0}
    cache = TeacherCache(tmp_path, "teacher-a", sampler)
    make, calls = _counting(latents)
    first = cache.get(lr, "c", "q", make)
    again = cache.get(lr, "c", "q", make)  # the next epoch: read back, not recomputed
    assert len(calls) == 1 and torch.equal(first, latents) and torch.equal(again, latents)
    assert (cache.hits, cache.misses) == (1, 1)
    for other in (TeacherCache(tmp_path, "teacher-b", sampler), TeacherCache(tmp_path, "teacher-a", {**sampler,
                                                                                                     "steps": 4})):
        other.get(lr, "c", "q", make)
    cache.get(lr.flip(-1), "c", "q", make)
    cache.get(lr, "c", "other quality", make)
    assert len(calls) == 5
    assert not list(tmp_path.rglob(".tmp-*"))  # written to a temporary name and renamed


def test_an_entry_under_the_wrong_name_is_an_error(tmp_path):
    lr = torch.rand(3, 8, 8)
    cache = TeacherCache(tmp_path, "t", {})
    cache.get(lr, "c", "q", lambda: torch.zeros(1))
    written = next(tmp_path.rglob("*.safetensors"))
    other_key = cache_key("t", input_hash(lr, "c", "other"), {})
    target = cache.path(other_key)
    target.parent.mkdir(parents=True, exist_ok=True)
    written.rename(target)
    with pytest.raises(ValueError, match="does not belong"):
        cache.get(lr, "c", "other", lambda: torch.zeros(1))


def test_training_reads_the_teacher_from_the_cache(tmp_path):
    from onestep_helpers import batch, build, only

    from xpsr.onestep.train import teacher_latents

    _, modules, parts, _, _ = build(tmp_path, *only("distill"))
    b = batch()
    first = teacher_latents(parts, modules, b["lr_cond"][0], "a cat", "blurry")
    assert parts.cache.misses == 1
    again = teacher_latents(parts, modules, b["lr_cond"][0], "a cat", "blurry")
    assert parts.cache.hits == 1 and torch.equal(first, again)
    # the teacher is the multi-step sampler on the frozen weights (adapters off), whatever the student is
    from xpsr.onestep.lora import STUDENT, adapter_parameters

    with torch.no_grad():
        for p in adapter_parameters(modules.unet, STUDENT).values():
            p.normal_(0, 0.05)
    parts.cache.folder = tmp_path / "fresh"
    assert torch.equal(teacher_latents(parts, modules, b["lr_cond"][0], "a cat", "blurry"), first)


def test_teacher_hash_sees_settings_that_are_not_tensors(make_tiny):
    """sfa and sequential fusion share every key, and so do epsilon and v prediction: the weights hash alone
    would reuse one teacher's outputs for the other."""
    from xpsr.config import ModelConfig

    modules = make_tiny()
    parts = (modules.unet, modules.controlnet)
    cfg = ModelConfig()
    scheduler = dict(modules.scheduler.config)
    base = teacher_hash(parts, cfg, scheduler)
    assert base == teacher_hash(parts, cfg, dict(reversed(scheduler.items())))
    # where the parts came from and training-only switches are not part of the teacher
    assert base == teacher_hash(parts, dataclasses.replace(cfg, base="/elsewhere", gradient_checkpointing=True),
                                scheduler)
    changed = [teacher_hash(parts, dataclasses.replace(cfg, fusion_mode="sequential"), scheduler),
               teacher_hash(parts, dataclasses.replace(cfg, pixel_attention=False), scheduler),
               teacher_hash(parts, cfg, {**scheduler, "prediction_type": "v_prediction"})]
    assert len({base, *changed}) == len(changed) + 1
