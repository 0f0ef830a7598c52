#!/usr/bin/env python
"""Caption images into the prompt cache (same keys as `xpsr caption --help`).

    python scripts/caption.py --config configs/caption/llava_content.yaml images=pairs/lr cache=prompts.sqlite
    torchrun --nproc_per_node 8 scripts/caption.py ...   # 8 processes (also --nnodes N): per-rank cache shards,
                                                          # merged into the cache as each rank finishes
"""
import sys

from xpsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
