#!/usr/bin/env python
"""Train XPSR (same keys as `xpsr train --help`).

    python scripts/train.py --config configs/train/tiny.yaml output_dir=runs/tiny
    accelerate launch --num_processes 8 scripts/train.py --config configs/train/xpsr_sd15.yaml output_dir=runs/xpsr
"""
import sys

from xpsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
