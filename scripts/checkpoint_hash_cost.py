"""What the checkpoint checksum manifest costs: time to write ``checksums.json`` with and without sha256.

Writes random files of the given total size into a temp folder (on the disk of ``--dir``), then times
``write_manifest`` with hashes off and on, twice each (the first pass also flushes the new files to disk,
so the second pair is the one to read). Usage: python scripts/checkpoint_hash_cost.py --mib 512
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from xpsr.training.integrity import write_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="total size of the files, MiB (two files)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to make the temp folder")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="xpsr-hash-cost-", dir=args.dir))
    try:
        for name in ("trained.safetensors", "optimizer.pt"):
            (folder / name).write_bytes(os.urandom((args.mib // 2) << 20))
        for attempt in (1, 2):
            for hashes in (False, True):
                start = time.perf_counter()
                write_manifest(folder, with_hashes=hashes)
                seconds = time.perf_counter() - start
                rate = f", {args.mib * 2**20 / seconds / 1e6:.0f} MB/s" if hashes else ""
                print(f"pass {attempt} hashes={hashes}: {seconds:.2f} s for {args.mib} MiB{rate}")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
