#!/usr/bin/env python
"""Make LR/HR pairs: `python scripts/prepare.py --config configs/data/xpsr.yaml inputs=[DIR] output_dir=OUT`."""
import sys

from xpsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
