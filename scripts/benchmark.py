#!/usr/bin/env python
"""Time one XPSR training step or one super-resolution; JSON on stdout. Same keys as `xpsr bench --help`.

    python scripts/benchmark.py preset=tiny resolution=64
    python scripts/benchmark.py --config configs/bench/sd15_gpu.yaml dtype=bf16 gradient_checkpointing=true
    python scripts/benchmark.py what=flops preset=sd15 resolution=512 inference_steps=20   # meta device, no GPU
    python scripts/benchmark.py --gpu-suite OUT.md      # the GPU measurements docs/speed.md still lacks

``--gpu-suite`` runs, one process each (so every peak-memory figure is its own), the commands below at SD 1.5
shapes with random weights on ``cuda`` (speed and memory need no trained weights), and writes a Markdown
table of what it measured beside what we *expect*: figures derived from counted FLOPs or from the
weights' sizes, never measured by us (no GPU has been lent to this project). About 6 minutes on one H100,
plus the memory rows first: each plans its step on fake tensors (minutes on one CPU core) and runs it on the GPU
(planned peak beside max_memory_allocated / reserved; docs/gpu-memory.md).
"""
import json
import subprocess
import sys
import time

from xpsr.cli import main

TRAIN = ["--config", "configs/bench/sd15_gpu.yaml"]
INFER = ["what=infer", "preset=sd15", "device=cuda", "lr_size=128", "dtype=fp16", "steps=3"]
# (label, overrides, expected; "EXPECTED" marks every figure that is not a measurement)
SUITE = [
    ("train 512 px x 2, bf16, frozen UNet fp32 (official)", TRAIN, "EXPECTED: the baseline of the rows below"),
    ("train, frozen UNet bf16", TRAIN + ["frozen_unet_dtype=mixed_precision"],
     "EXPECTED: peak memory ~1.6 GiB lower (859.5 M frozen weights at 2 instead of 4 bytes); step time within "
     "a few % of the baseline"),
    ("train, fp32", TRAIN + ["dtype=fp32"], "EXPECTED: slower than bf16 (no tensor-core half precision)"),
    ("train, gradient checkpointing", TRAIN + ["gradient_checkpointing=true"],
     "EXPECTED: lower peak memory, ~20-35 % slower (one more forward of the trainable ControlNet)"),
    ("train, deterministic=true", TRAIN + ["deterministic=true"],
     "EXPECTED: slower by an amount PyTorch does not state; this row is the measurement"),
    ("infer 128 -> 512 px, 20 steps + CFG, fp16", INFER + ["inference_steps=20", "mode=multistep"],
     "EXPECTED: a few seconds per image"),
    ("infer 128 -> 512 px, one-step student, fp16", INFER + ["mode=onestep"],
     "EXPECTED: 10-15x faster than the row above (13.8x fewer FLOPs counted on the meta device); in the order "
     "of 0.1 s per image (OSEDiff's published ~0.1 s on an A100)"),
]


# Planned beside measured (docs/gpu-memory.md): our training step at SD 1.5 shapes, its plan on fake tensors and
# torch.cuda.max_memory_allocated of the same step on the GPU. The stated margin is x1.10 + 1 GiB.
MEMORY = [
    ("memory: train 512 px x 1, official (fp16, frozen UNet fp32)", ["mixed_precision=fp16", "batch_size=1"]),
    ("memory: train 512 px x 8, bf16 frozen parts + checkpointing + 8-bit AdamW",
     ["mixed_precision=bf16", "frozen_unet_dtype=mixed_precision", "model.gradient_checkpointing=true",
      "use_8bit_adam=true", "batch_size=8"]),
]


def memory_rows() -> list[tuple[str, str, str]]:
    rows = []
    for label, overrides in MEMORY:
        proc = subprocess.run([sys.executable, "-m", "xpsr.memory.validate", "sd15", "data.crop_size=512",
                               *overrides], capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append((label, f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", ""))
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((label, f"peak allocated {r['measured'] / 2**30:.2f} GiB, reserved {r['reserved'] / 2**30:.2f} "
                     f"GiB, process {r['used_by_process'] / 2**30:.2f} GiB",
                     f"PLANNED: {r['planned'] / 2**30:.2f} GiB ({r['error'] * 100:+.1f} % vs allocated)"))
    return rows


def gpu_suite(out_path: str) -> int:
    rows = memory_rows()
    for label, overrides, expected in SUITE:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "xpsr.cli", "bench", *overrides], capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            rows.append((label, f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
                         expected))
            continue
        result = json.loads(proc.stdout)  # stdout is the JSON alone
        speed = (f"{result['step_s_mean'] * 1e3:.0f} ms/step" if "step_s_mean" in result
                 else f"{result['seconds_per_image']:.3f} s/image")
        memory = result.get("peak_mem_mb")
        rows.append((label, f"{speed}, peak {memory / 1024:.2f} GiB" if memory else speed, expected))
        print(f"{label}: {rows[-1][1]} ({wall:.0f} s)", file=sys.stderr)
    lines = ["| command | measured | expected (not measured) |", "| --- | --- | --- |"]
    lines += [f"| {label} | {measured} | {expected} |" for label, measured, expected in rows]
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return int(any(measured.startswith("failed") for _, measured, _ in rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gpu-suite"]:
        if len(sys.argv) != 3:
            sys.exit("usage: python scripts/benchmark.py --gpu-suite OUT.md")
        sys.exit(gpu_suite(sys.argv[2]))
    sys.exit(main(["bench", *sys.argv[1:]]))
