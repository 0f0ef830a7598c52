#!/usr/bin/env python
"""Super-resolve (same keys as `xpsr infer --help`).

    python scripts/infer.py --config configs/infer/xpsr_official.yaml input=LR/ output_dir=SR/ weights=W
"""
import sys

from xpsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
