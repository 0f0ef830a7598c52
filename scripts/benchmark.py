#!/usr/bin/env python
"""Time one XPSR training step; JSON on stdout. Same keys as `xpsr bench --help`.

    python scripts/benchmark.py preset=tiny resolution=64
    python scripts/benchmark.py --config configs/bench/sd15_gpu.yaml dtype=bf16 gradient_checkpointing=true
"""
import sys

from xpsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
