#!/usr/bin/env python
"""Several training runs in ONE multi-process launch, one after another (the launcher and the imports are
paid once; tests/test_ddp.py uses it):

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/ddp_jobs.py JOBS.json

JOBS.json: ``[{"config": "configs/train/x.yaml", "overrides": ["key=value", ...]}, ...]``. Each job is
exactly what ``scripts/train.py --config X key=value ...`` runs, in the same process group.
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState

from xpsr.config import TrainConfig, load_config
from xpsr.training.loop import run_training

if __name__ == "__main__":
    # One process group for all jobs: end_training would destroy it, and a new one on the same store can
    # read the old group's addresses (gloo then connects to a closed port). accelerate's per-run state
    # (mixed precision, accumulation) is reset between jobs.
    AcceleratorState.destroy_process_group = lambda self, group=None: None
    for job in json.loads(Path(sys.argv[1]).read_text()):
        summary = run_training(load_config(TrainConfig, job["config"], job["overrides"]))
        rank = f"[rank {os.environ.get('RANK')}/{os.environ.get('WORLD_SIZE')}]"
        print(f"job done {rank}: {job['config']} {summary['steps']} steps", flush=True)
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    dist.destroy_process_group()
