#!/usr/bin/env python
"""Caption images into the prompt cache (same keys as `xpsr caption --help`).

    python scripts/caption.py --config configs/caption/llava_content.yaml images=pairs/lr cache=prompts.sqlite
    accelerate launch scripts/caption.py ...   # several GPUs/processes, disjoint shards, one cache file
"""
import sys

from xpsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
