#!/usr/bin/env python
"""Load official-format XPSR weights through our importer, run our forward, compare with the golden outputs.

    python scripts/verify_official_equivalence.py --golden tests/data/golden/official_tiny

Prints a per-tensor table; exits 1 if any tensor exceeds 1e-4 x max(1, max|expected|).
"""
import argparse
import sys

from xpsr.models.verify import compare, format_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", required=True, help="folder with official_*.safetensors, official_config.json, "
                        "inputs.safetensors and outputs.safetensors")
    parser.add_argument("--rel-tol", type=float, default=1e-4)
    args = parser.parse_args()
    rows = compare(args.golden, args.rel_tol)
    print(format_table(rows))
    failed = [r.name for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)}/{len(rows)} tensors match" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
