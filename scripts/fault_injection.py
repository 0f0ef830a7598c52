#!/usr/bin/env python
"""Kill -9 fault injection for every stage (docs/reliability.md).

    python scripts/fault_injection.py --stages prepare,caption,infer,eval,train --kills 20 --seed 0 --workdir DIR

Writes DIR/fault_injection.json and DIR/fault_injection.md; exits 1 if any trial failed. Each stage's
inputs, logs and the folders of failing trials are under DIR/STAGE/.
"""
import argparse
import signal
import sys
from pathlib import Path

from xpsr.apps.faults import STAGES, Settings, run_campaign


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    p.add_argument("--kills", type=int, default=20, help="trials per stage killed at an instant uniform over the run")
    p.add_argument("--work-kills", type=int, default=10,
                   help="trials killed at an instant uniform between the first output write and the end")
    p.add_argument("--write-kills", type=int, default=10, help="trials killed right at an output write")
    p.add_argument("--seed", type=int, default=0, help="seeds every drawn instant")
    p.add_argument("--chain-prob", type=float, default=0.25, help="chance that a rerun is killed again")
    p.add_argument("--max-chain", type=int, default=3, help="most kills in one trial")
    p.add_argument("--launcher", choices=["subprocess", "forkserver"], default="subprocess",
                   help="subprocess: `python -m xpsr.cli` per run, imports included; forkserver: runs forked "
                        "from a process that imported the stages once (fast; kills land in the work)")
    p.add_argument("--trials", help="comma-separated trial numbers to run alone (repeat a failure)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="an extra override for one stage's command line (repeatable), e.g. train:max_steps=3")
    p.add_argument("--no-control", action="store_true", help="skip the second uninterrupted run per stage")
    p.add_argument("--workdir", type=Path, required=True, help="where inputs, runs, logs and reports go")
    args = p.parse_args(argv)
    # SIGTERM as an exception, so that the stage process running at that moment is killed on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    overrides: dict[str, list[str]] = {}
    for item in args.set:
        stage, sep, override = item.partition(":")
        if not sep or "=" not in override or stage not in STAGES:
            p.error(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of {', '.join(STAGES)}")
        overrides.setdefault(stage, []).append(override)
    settings = Settings(workdir=args.workdir.resolve(), kills=args.kills, work_kills=args.work_kills,
                        write_kills=args.write_kills, seed=args.seed, chain_prob=args.chain_prob,
                        max_chain=args.max_chain, launcher=args.launcher, control=not args.no_control,
                        overrides=overrides,
                        trials=[int(t) for t in args.trials.split(",")] if args.trials else None)
    report = run_campaign([s for s in args.stages.split(",") if s], settings)
    print((settings.workdir / "fault_injection.md").read_text())
    return 1 if any(s["failures"] or isinstance(s["control"], list) for s in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
