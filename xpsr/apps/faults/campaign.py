"""Kill -9 campaigns: per stage, an uninterrupted reference run, then trials that SIGKILL the stage at a
drawn instant (possibly again in the rerun), rerun it to completion and compare with the reference.

Kill modes (each trial uses one; the instants are drawn from the seed, so a trial is repeatable up to
the machine's timing):

- ``uniform`` — at a time drawn uniformly over the reference run's duration, start-up included;
- ``work`` — uniformly between the reference's first write and its end (the stage's own work);
- ``write`` — at the k-th write seen in the output folder (k uniform over the reference's writes), so
  the kill lands right at an output write, a temp file, a checkpoint folder, a SQLite commit.

After each kill the folder is inspected as the kill left it (where it landed; files under final names
must be whole, SQLite intact); after the final clean run it must equal the reference (outputs.py).
"""
from __future__ import annotations

import dataclasses
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from xpsr.apps.faults.launch import watch
from xpsr.apps.faults.outputs import Snapshot, compare, progress, snapshot
from xpsr.apps.faults.stages import STAGES, Stage

MODES = ("uniform", "work", "write")
LANDINGS = ("before first output", "between writes", "mid-write (temp file left)", "after last output")
KEEP_FAILED = 5  # failing trials whose folders are kept for inspection, per stage


@dataclass
class Reference:
    seconds: float
    first_write_s: float
    writes: int
    snapshot: Snapshot


@dataclass
class Kill:
    mode: str
    value: float  # seconds after start (uniform, work) or the number of the write to kill at (write)


@dataclass
class Settings:
    workdir: Path
    kills: int = 20  # uniform kills per stage
    work_kills: int = 0
    write_kills: int = 0
    seed: int = 0
    chain_prob: float = 0.25  # chance that a rerun is killed again (up to max_chain kills per trial)
    max_chain: int = 3
    launcher: str = "subprocess"
    control: bool = True  # a second uninterrupted run: the stage must be deterministic for the test to mean much
    trials: list[int] | None = None  # run only these trial numbers
    poll_s: float = 0.002
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> extra `key=value` arguments
    modes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.modes = ["uniform"] * self.kills + ["work"] * self.work_kills + ["write"] * self.write_kills

    def command(self, stage: str, trial: int | None = None) -> str:
        """The command line that reruns this campaign (or one trial of it)."""
        cmd = (f"python scripts/fault_injection.py --stages {stage} --kills {self.kills} "
               f"--work-kills {self.work_kills} --write-kills {self.write_kills} --seed {self.seed} "
               f"--chain-prob {self.chain_prob} --max-chain {self.max_chain} --launcher {self.launcher} "
               f"--workdir {self.workdir}" + "".join(f" --set {stage}:{o}" for o in self.overrides.get(stage, [])))
        return cmd + (f" --trials {trial}" if trial is not None else "")


def draw(rng: random.Random, mode: str, ref: Reference) -> Kill:
    end = 0.97 * ref.seconds  # the last instants often find the process already gone
    if mode == "uniform":
        return Kill(mode, rng.uniform(0.0, end))
    if mode == "work":
        return Kill(mode, rng.uniform(min(ref.first_write_s, end), end))
    return Kill(mode, float(rng.randint(1, max(1, ref.writes))))


def plan(settings: Settings, stage: str, trial: int, ref: Reference, attempt: int = 0) -> list[Kill]:
    """The kills of one trial: the first, then each rerun killed again with probability ``chain_prob``."""
    rng = random.Random(f"{settings.seed}/{stage}/{trial}/{attempt}")
    n = 1
    while n < settings.max_chain and rng.random() < settings.chain_prob:
        n += 1
    return [draw(rng, settings.modes[trial], ref) for _ in range(n)]


def landing(state: Snapshot, ref: Snapshot) -> str:
    if state.temp:
        return LANDINGS[2]
    done, total = progress(state, ref)
    return LANDINGS[0] if done == 0 else LANDINGS[3] if done >= total else LANDINGS[1]


class StageRunner:
    """Runs the reference and the trials of one stage in ``workdir/STAGE``; the output folder is always
    ``workdir/STAGE/run`` because outputs record their own paths (configs saved in checkpoints, reports)."""

    def __init__(self, stage: Stage, settings: Settings, launcher):
        self.stage, self.settings, self.launcher = stage, settings, launcher
        self.root = settings.workdir / stage.name
        self.inputs, self.run_dir, self.logs = self.root / "inputs", self.root / "run", self.root / "logs"
        self.kept = 0
        self.timeout_s = 3600.0

    @property
    def argv(self) -> list[str]:
        return self.stage.argv(self.inputs, self.run_dir) + list(self.settings.overrides.get(self.stage.name, []))

    def setup(self) -> None:
        if not (self.inputs / ".complete").is_file():
            shutil.rmtree(self.inputs, ignore_errors=True)
            self.stage.make_inputs(self.inputs)
            (self.inputs / ".complete").touch()
        self.logs.mkdir(parents=True, exist_ok=True)

    def reset(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)

    def start(self, name: str, kill: Kill | None = None):
        run = self.launcher.start(self.argv, self.logs / f"{name}.log", processes=self.stage.processes)
        return watch(run, self.run_dir, kill_at_s=kill.value if kill and kill.mode != "write" else None,
                     kill_at_write=int(kill.value) if kill and kill.mode == "write" else None,
                     poll_s=self.settings.poll_s, timeout_s=self.timeout_s)

    def log_tail(self, name: str, lines: int = 6) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def reference(self) -> tuple[Reference, list[str]]:
        """An uninterrupted run (timed, its writes counted) and, with ``control``, a second one that must
        give the same outputs (else the stage is not deterministic and no comparison can hold)."""
        self.reset()
        w = self.start("reference")
        if w.rc != 0:
            raise RuntimeError(f"{self.stage.name}: the uninterrupted run failed (exit {w.rc}): "
                               f"{self.log_tail('reference')}")
        ref = Reference(w.seconds, w.write_times[0] if w.write_times else 0.0, len(w.write_times),
                        snapshot(self.run_dir, self.stage.rules))
        self.timeout_s = max(300.0, 20 * w.seconds)
        problems = list(ref.snapshot.problems) + [f"reference: temporary files left: {ref.snapshot.temp}"] * bool(
            ref.snapshot.temp)
        if self.settings.control:
            self.reset()
            w = self.start("control")
            problems += [f"control run exit {w.rc}: {self.log_tail('control')}"] * (w.rc != 0)
            problems += [f"control run: {p}" for p in compare(ref.snapshot, snapshot(self.run_dir, self.stage.rules))]
        return ref, problems

    def trial(self, index: int, ref: Reference) -> dict:
        """Kill (a chain of kills), rerun to completion, compare. Returns the trial's record."""
        timing = ref
        for attempt in range(4):  # a first kill that finds the run already finished is drawn again,
            kills = plan(self.settings, self.stage.name, index, timing, attempt)
            record = self._attempt(index, kills, ref)
            if record["kills"]:
                record["misses"] = attempt
                return record
            # over the duration of the run that was missed: a reference timed on a busier machine (or with
            # a colder cache) draws instants past the end of a faster run again and again
            faster = min(1.0, record.pop("finished_s") / ref.seconds)
            timing = dataclasses.replace(timing, seconds=ref.seconds * faster,
                                         first_write_s=ref.first_write_s * faster)
        record["misses"] = attempt + 1
        return record

    def _attempt(self, index: int, kills: list[Kill], ref: Reference) -> dict:
        self.reset()
        record: dict = {"trial": index, "mode": kills[0].mode, "kills": [], "problems": [], "crashed": False}
        completed = False
        for i, kill in enumerate(kills):
            name = f"trial-{index:03d}-run-{i}"
            w = self.start(name, kill)
            if w.timed_out:
                record["problems"].append(f"run {i} hung: killed after {w.seconds:.0f}s")
                record["crashed"] = True
                return record
            if not w.killed:
                if i == 0:
                    record["finished_s"] = w.seconds
                    return record  # a miss: nothing was interrupted
                completed = self._check_exit(record, name, w.rc)
                break
            state = snapshot(self.run_dir, self.stage.rules, after_kill=True)
            done, total = progress(state, ref.snapshot)
            record["kills"].append({"mode": kill.mode, "planned": round(kill.value, 3), "at_s": round(w.seconds, 3),
                                    "fraction": round(w.seconds / ref.seconds, 3), "writes_seen": len(w.write_times),
                                    "landing": landing(state, ref.snapshot), "progress": f"{done}/{total}",
                                    "temp": state.temp[:3], "resumed_at": self._resumed_at(name)})
            record["problems"] += [f"after kill {i + 1} (before the rerun): {p}" for p in state.problems]
        if not completed:
            name = f"trial-{index:03d}-final"
            w = self.start(name)
            completed = self._check_exit(record, name, w.rc)
            record["final_resumed_at"] = self._resumed_at(name)
        if completed:
            record["problems"] += compare(ref.snapshot, snapshot(self.run_dir, self.stage.rules))
        if record["problems"]:
            self._keep(index)
        return record

    def _check_exit(self, record: dict, name: str, rc: int | None) -> bool:
        if rc == 0:
            return True
        record["crashed"] = True
        record["problems"].append(f"rerun after the kill exited {rc}: {self.log_tail(name)}")
        return False

    def _resumed_at(self, name: str) -> int | None:
        """The step a training run resumed from, as it printed it."""
        found = re.findall(r"resumed from \S+ at step (\d+)", (self.logs / f"{name}.log").read_text(errors="replace"))
        return int(found[-1]) if found else None

    def _keep(self, index: int) -> None:
        if self.kept < KEEP_FAILED:
            target = self.root / "failed" / f"trial-{index:03d}"
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.run_dir, target, symlinks=True)
            self.kept += 1


def run_stage(name: str, settings: Settings, launcher, bar=None) -> dict:
    """Reference, control and every trial of one stage; returns its section of the report."""
    stage = STAGES[name]
    runner = StageRunner(stage, settings, launcher)
    runner.setup()
    ref, control_problems = runner.reference()
    trials = settings.trials if settings.trials is not None else range(len(settings.modes))
    records = []
    for index in trials:
        records.append(runner.trial(index, ref))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(stage=name, failed=sum(bool(r["problems"]) for r in records))
    return summarize(stage, settings, runner, ref, control_problems, records)


def summarize(stage: Stage, settings: Settings, runner: StageRunner, ref: Reference, control_problems: list[str],
              records: list[dict]) -> dict:
    kills = [k for r in records for k in r["kills"]]
    failures = [{"trial": r["trial"], "mode": r["mode"], "kills": r["kills"], "problems": r["problems"],
                 "crashed": r["crashed"], "repro": settings.command(stage.name, r["trial"])}
                for r in records if r["problems"]]
    resumed = [k.get("resumed_at") for k in kills] + [r.get("final_resumed_at") for r in records]
    return {
        "summary": stage.summary, "command": "xpsr " + " ".join(runner.argv),
        "reference": {"seconds": round(ref.seconds, 2), "first_write_s": round(ref.first_write_s, 2),
                      "writes_seen": ref.writes, "files": len(ref.snapshot.files)},
        "control": control_problems or ("identical" if settings.control else "not run"),
        "trials": len(records), "trials_without_kill": sum(not r["kills"] for r in records),
        "kills": {m: sum(k["mode"] == m for k in kills) for m in MODES}, "kills_total": len(kills),
        "chained_trials": sum(len(r["kills"]) > 1 for r in records), "misses": sum(r["misses"] for r in records),
        "landings": {label: sum(k["landing"] == label for k in kills) for label in LANDINGS},
        "resumed_at_steps": sorted({s for s in resumed if s is not None}),
        "crashes": sum(r["crashed"] for r in records),
        "failed_trials": len(failures), "failures": failures, "records": records,
    }
