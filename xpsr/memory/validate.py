"""The plan against reality on CPU: the same training step on real tensors, its peak measured by the CPU
allocator's own records (torch.profiler with ``profile_memory=True``: every allocation and free the allocator
makes while the step runs, whatever made it), independently of our counter.

measured peak = bytes alive before the step (weights, optimizer state, the batch: their storages' sizes)
               + the highest running sum of the allocator's records during the step.
"""
from __future__ import annotations

import torch

from xpsr.config import TrainConfig
from xpsr.memory.build import build_modules, cast_for_training
from xpsr.memory.tracker import LiveBytes
from xpsr.memory.train_plan import StepParts, plan_training


def allocator_peak(prof) -> int:
    """Highest running sum of the allocator's [memory] records of a profile (bytes above where it started)."""
    records = [(e.start_ns(), i, e.nbytes()) for i, e in enumerate(prof.profiler.kineto_results.events())
               if e.name() == "[memory]"]
    live = peak = 0
    for _, _, nbytes in sorted(records):
        live += nbytes
        peak = max(peak, live)
    return peak


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_training(cfg: TrainConfig, preset: str) -> dict:
    """Peak bytes of one real training step on CPU, by the allocator (``measured``) and by our counter on the
    same real tensors (``counted``)."""
    from torch.profiler import ProfilerActivity, profile

    modules = build_modules(preset, cfg.model, device="cpu")
    cast_for_training(modules, cfg.mixed_precision, cfg.frozen_unet_dtype, cfg.text_encoder_device)
    step = StepParts(modules, cfg)
    step.run(None)  # warm-up: lazily made buffers (oneDNN, autocast) exist before the measured step
    before = unique_bytes([t for t, _, _ in step.state_tensors()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.run(None)
    measured = before + allocator_peak(prof)
    tracker = LiveBytes()
    step.register(tracker)
    step.run(tracker)
    return {"measured": measured, "counted": tracker.peak.bytes, "before": before}


def compare_training(cfg: TrainConfig, preset: str) -> dict:
    """Planned (fake tensors) against measured (real tensors, allocator records): bytes and relative error."""
    planned = plan_training(cfg, preset)["peak_bytes"]
    real = measure_training(cfg, preset)
    return {"planned": planned, **real, "error": planned / real["measured"] - 1}


def measure_inference(cfg, preset: str, output_size: int) -> dict:
    """Peak bytes of one real super-resolution on CPU (random weights at ``preset`` shapes), by the allocator."""
    from torch.profiler import ProfilerActivity, profile

    from xpsr.memory.infer_plan import Sampling

    run = Sampling(cfg, preset, output_size, device="cpu")
    lr_cond = torch.rand(1, 3, *run.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run.sample(lr_cond, LiveBytes())  # warm-up, as for training
        weights = [t for m in run.roots.values() for t in list(m.parameters()) + list(m.buffers())]
        before = unique_bytes(weights + [lr_cond])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run.sample(lr_cond, LiveBytes())
        counter = LiveBytes()  # our counter on the same real tensors: what the plan sees of this run
        counter.register_module_weights(**run.roots)
        counter.register(lr_cond, "inputs", "(condition)")
        with counter, counter.modules(**run.roots):
            run.sample(lr_cond, counter)
    # measured - counted: what kernels allocate inside themselves and free before returning (CPU scratch such
    # as the im2col columns of the bf16 convolution fallback), invisible to any op-level count
    return {"measured": before + allocator_peak(prof), "counted": counter.peak.bytes, "before": before}


def compare_inference(cfg, preset: str, output_size: int) -> dict:
    """Planned (fake tensors) against measured (real tensors, allocator records) for one super-resolution."""
    from xpsr.memory.infer_plan import plan_inference

    planned = plan_inference(cfg, preset, output_size)["peak_bytes"]
    real = measure_inference(cfg, preset, output_size)
    return {"planned": planned, **real, "error": planned / real["measured"] - 1}


def measure_training_cuda(cfg: TrainConfig, preset: str) -> dict:
    """On a GPU: the planned peak beside ``torch.cuda.max_memory_allocated`` of the same step (after a warm-up
    step) and the memory reserved by the caching allocator (what fragmentation adds)."""
    planned = plan_training(cfg, preset)["peak_bytes"]
    device = torch.device("cuda")
    with torch.device(device):
        modules = build_modules(preset, cfg.model, device="cuda")
        cast_for_training(modules, cfg.mixed_precision, cfg.frozen_unet_dtype, cfg.text_encoder_device)
        step = StepParts(modules, cfg)
        step.run(None)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step.run(None)
        torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"planned": planned, "measured": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.max_memory_reserved(), "used_by_process": total - free,
            "error": planned / torch.cuda.max_memory_allocated() - 1}


if __name__ == "__main__":  # `python -m xpsr.memory.validate PRESET key=value ...` (TrainConfig keys), on a GPU
    import json
    import sys

    from xpsr.config import load_config

    args = sys.argv[1:]
    train_cfg = load_config(TrainConfig, None, ["output_dir=-", *args[1:]])
    print(json.dumps(measure_training_cuda(train_cfg, args[0])))
