#!/usr/bin/env python
"""Plan the rows of docs/gpu-memory.md's tables (SD 1.5 / 2.1, training and inference), one JSON line per row.

    python scripts/memory_tables.py OUT.jsonl [--only sd15] [--worker I/N]   # minutes per row on one CPU core
    python scripts/memory_tables.py --markdown OUT.jsonl                    # the tables from the rows

Rows already in OUT.jsonl are skipped, so an interrupted run continues; ``--worker I/N`` takes every N-th row.
"""
import json
import sys
from pathlib import Path

from xpsr.config import PlanConfig
from xpsr.memory.plan import run_plan
from xpsr.memory.tables import ROWS, markdown


def main(argv: list[str]) -> int:
    if argv[:1] == ["--markdown"]:
        rows = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
        print(markdown(rows))
        return 0
    out = Path(argv[0])
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    worker, workers = (int(x) for x in argv[argv.index("--worker") + 1].split("/")) if "--worker" in argv else (0, 1)
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
