#!/usr/bin/env python
"""Several training runs in ONE multi-process launch, one after another (the launcher and the imports are
paid once; tests/test_ddp.py uses it):

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/ddp_jobs.py JOBS.json

JOBS.json: ``[{"config": "configs/train/x.yaml", "overrides": ["key=value", ...]}, ...]``. Each job is
exactly what ``scripts/train.py --config X key=value ...`` runs; between jobs accelerate's process-wide state
is reset, so the next job starts its own process group as a fresh launch would.
"""
import json
import os
import sys
from pathlib import Path

from accelerate.state import AcceleratorState

from xpsr.config import TrainConfig, load_config
from xpsr.training.loop import run_training

if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        summary = run_training(load_config(TrainConfig, job["config"], job["overrides"]))
        rank = f"[rank {os.environ.get('RANK')}/{os.environ.get('WORLD_SIZE')}]"
        print(f"job done {rank}: {job['config']} {summary['steps']} steps", flush=True)
        AcceleratorState._reset_state(reset_partial_state=True)  # end_training destroyed the process group
