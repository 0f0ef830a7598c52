#!/usr/bin/env python
"""The temporal-stability table of docs/video.md: every stability method on a panned clip (temporal error,
fidelity), a zoom clip (warping error) and across chunk borders (xpsr/video/stability.py).

    python scripts/video_stability.py --demo xpsr_demo --output stability.json
    python scripts/video_stability.py --frames 6 --steps 2        # the tiny random model (what CI runs)
"""
import argparse
import json
from pathlib import Path

import torch

from xpsr.config import InferConfig, load_config
from xpsr.video.run import load_ready_modules
from xpsr.video.stability import measure, table

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "infer"

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", help="an `xpsr demo` output folder: its prior as the base model, its XPSR run as the "
                                  "weights and its sampler (20 DDIM steps, SDEdit from t=400); default: the tiny "
                                  "random model")
    p.add_argument("--methods", default="independent,same,flow,carry")
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--lr-size", type=int, default=32, help="LR frame side in px (output x4)")
    p.add_argument("--step", type=int, default=2, help="pan per frame in LR px (x4 = one latent of the 8x tiny "
                                                        "VAE at 2, of the demo's 4x VAE at 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    p.add_argument("--carry-timestep", type=int, default=None, help="video.carry_timestep (default: the config's)")
    p.add_argument("--chunk-frames", type=int, default=4, help="chunk size of the border measurement (0 = none)")
    p.add_argument("--output", default=None, help="JSON file for the rows (the table is printed)")
    a = p.parse_args()
    if a.demo:
        demo = Path(a.demo).resolve()
        overrides = [f"model.base={demo / 'prior'}", "model.conditioning_channels=[8,16,32]"]
        if (demo / "run" / "final").is_dir():
            overrides.append(f"weights={demo / 'run'}")
        cfg = load_config(InferConfig, CONFIGS / "onestep_demo_teacher.yaml", ["input=x", "output_dir=x", *overrides])
    else:
        cfg = load_config(InferConfig, CONFIGS / "tiny_cpu.yaml", ["input=x", "output_dir=x"])
    if a.steps:
        cfg.num_inference_steps = a.steps
    if a.carry_timestep is not None:
        cfg.video.carry_timestep = a.carry_timestep
    torch.set_grad_enabled(False)
    modules = load_ready_modules(cfg, torch.device("cpu"))
    rows = measure(modules, cfg, a.methods.split(","), a.frames, a.lr_size, a.step, a.chunk_frames)
    print(table(rows))
    if a.output:
        Path(a.output).write_text(json.dumps(rows, indent=1))
