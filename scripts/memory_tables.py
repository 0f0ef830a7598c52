#!/usr/bin/env python
"""Plan the rows of docs/gpu-memory.md's tables (SD 1.5 / 2.1, training and inference), one JSON line per row.

    python scripts/memory_tables.py OUT.jsonl [--only sd15] [--worker I/N]   # minutes per row on one CPU core
    python scripts/memory_tables.py OUT.jsonl --markdown                    # the tables from the rows
    python scripts/memory_tables.py OUT.jsonl --shipped xpsr/memory/planned.jsonl   # the rows `xpsr train`
                                                     # and `xpsr infer` look up before their first step

Rows already in OUT.jsonl are skipped, so an interrupted run continues; ``--worker I/N`` takes every N-th row.
"""
import argparse
import json
import sys
from pathlib import Path

from xpsr.config import PlanConfig
from xpsr.memory.fit import INFER_KEYS
from xpsr.memory.plan import run_plan
from xpsr.memory.tables import INFER_SETTINGS, ROWS, TRAIN_SETTINGS, markdown

SETTINGS = {"train": TRAIN_SETTINGS, "infer": INFER_SETTINGS}
TRAIN_KEYS = ("resolution", "batch_size", "mixed_precision", "frozen_unet_dtype", "gradient_checkpointing",
              "use_8bit_adam", "latent_cache", "use_ema")


def shipped_row(row: dict) -> dict:
    """What the check before the first step reads of a planned row (xpsr.memory.fit)."""
    keys = TRAIN_KEYS if row["what"] == "train" else ("output_size", *INFER_KEYS)
    out = {"what": row["what"], "preset": row["preset"], **{k: row[k] for k in keys}}
    if row["what"] == "train":
        out["text_encoder_device"] = row.get("text_encoder_device", "same")  # rows planned before the key
    return {**out, "peak_bytes": row["peak_bytes"], "row": row["row"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON-lines file of planned rows (appended; rows already there are skipped)")
    parser.add_argument("--markdown", action="store_true", help="print the tables of the rows in OUT instead")
    parser.add_argument("--shipped", help="write the keys and peaks of the rows in OUT to this file instead")
    parser.add_argument("--only", help="plan only the rows whose name starts with this (e.g. sd15)")
    parser.add_argument("--worker", default="0/1", help="I/N: plan every N-th row from the I-th")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.shipped:
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        Path(args.shipped).write_text("".join(json.dumps(shipped_row(r)) + "\n" for r in rows
                                              if r["row"].split("/")[2] in SETTINGS[r["what"]]))
        return 0
    if args.markdown:
        print(markdown([json.loads(line) for line in out.read_text().splitlines() if line.strip()]))
        return 0
    only = args.only
    worker, workers = (int(x) for x in args.worker.split("/"))
    done = set()
    if out.exists():
        done = {json.loads(line)["row"] for line in out.read_text().splitlines() if line.strip()}
    for i, (name, overrides) in enumerate(ROWS):
        if i % workers != worker or name in done or (only and not name.startswith(only)):
            continue
        from xpsr.config import load_config

        result = run_plan(load_config(PlanConfig, None, overrides))
        result["row"] = name
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{name}: {result['peak_bytes'] / 2**30:.2f} GiB ({result['plan_seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
