#!/usr/bin/env python
"""Evaluate SR images: `python scripts/evaluate.py sr=SR/ hr=HR/ output_dir=EVAL/ metrics=[psnr,ssim]`."""
import sys

from xpsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
