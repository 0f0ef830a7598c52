"""Run a campaign over several stages and write its report: ``fault_injection.json`` (every trial, every
kill, every problem) and ``fault_injection.md`` (a table per stage, then each failure with the command
that repeats it)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from xpsr.apps.faults.campaign import LANDINGS, MODES, Settings, run_stage
from xpsr.apps.faults.launch import make_launcher
from xpsr.apps.faults.stages import STAGES

CATEGORIES = ("crash", "data lost, duplicated or different", "temporary files left", "damaged file after a kill")


def category(problem: str) -> str:
    """Which column of the report a problem counts in."""
    if problem.startswith("after kill"):
        return CATEGORIES[3]
    if problem.startswith(("rerun after the kill exited", "run ")):
        return CATEGORIES[0]
    if problem.startswith("temporary files left"):
        return CATEGORIES[2]
    return CATEGORIES[1]


def symptom(problem: str) -> str:
    """A problem without its particulars (numbers, names, details), to count trials that share it."""
    prefix = ""
    if problem.startswith("after kill"):
        prefix, problem = "after a kill: ", problem.split("): ", 1)[-1]
    head = re.split(r"[(\[]", problem, maxsplit=1)[0]
    return prefix + re.sub(r"\d+", "N", head).strip(" :")


def run_campaign(stages: list[str], settings: Settings, progress_bar: bool = True) -> dict:
    """Every stage in turn; writes the JSON and Markdown reports into ``settings.workdir``."""
    from tqdm import tqdm

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {sorted(STAGES)}")
    settings.workdir.mkdir(parents=True, exist_ok=True)
    launcher = make_launcher(settings.launcher)
    per_stage = len(settings.trials) if settings.trials is not None else len(settings.modes)
    report: dict = {"settings": {"launcher": settings.launcher, "seed": settings.seed,
                                 "kills": {"uniform": settings.kills, "work": settings.work_kills,
                                           "write": settings.write_kills},
                                 "chain_prob": settings.chain_prob, "max_chain": settings.max_chain,
                                 "trials": settings.trials, "workdir": str(settings.workdir)},
                    "stages": {}}
    start = time.perf_counter()
    with tqdm(total=per_stage * len(stages), desc="fault injection", unit="trial", disable=not progress_bar) as bar:
        for name in stages:
            report["stages"][name] = run_stage(name, settings, launcher, bar)
            write_reports(report, settings.workdir)  # after every stage: a long campaign shows its progress
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_reports(report, settings.workdir)
    return report


def write_reports(report: dict, folder: Path) -> None:
    (folder / "fault_injection.json").write_text(json.dumps(report, indent=2))
    (folder / "fault_injection.md").write_text(markdown(report))


def stage_row(name: str, s: dict) -> str:
    kills = "/".join(str(s["kills"][m]) for m in MODES)
    landed = "/".join(str(s["landings"][label]) for label in LANDINGS)
    counts = {c: sum(any(category(p) == c for p in f["problems"]) for f in s["failures"]) for c in CATEGORIES}
    control = {"identical": "same", "not run": "not run"}.get(s["control"], "DIFFERS")
    return (f"| {name} | {s['reference']['seconds']} | {s['kills_total']} ({kills}) | {landed} | {s['chained_trials']} "
            f"| {counts[CATEGORIES[0]]} | {counts[CATEGORIES[1]]} | {counts[CATEGORIES[2]]} | {counts[CATEGORIES[3]]} "
            f"| {control} |")


def markdown(report: dict) -> str:
    st = report["settings"]
    lines = ["# Kill -9 fault injection", "",
             f"Launcher `{st['launcher']}`, seed {st['seed']}, trials per stage: {st['kills']['uniform']} uniform "
             f"over the run, {st['kills']['work']} uniform over the work, {st['kills']['write']} at a write; a "
             f"rerun is killed again with probability {st['chain_prob']} (at most {st['max_chain']} kills per trial).",
             "", "Columns: kills delivered (uniform/work/write); where they landed (before the first output / "
             "between writes / mid-write, a temp file left / after the last output); trials with a chain of kills; "
             "then trials with each kind of failure; whether a second uninterrupted run gave the same outputs.", "",
             "| stage | reference run (s) | kills | landed | chained | crashes | data lost, duplicated or different "
             "| temp files left | damaged file after a kill | control run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [stage_row(name, s) for name, s in report["stages"].items()]
    for name, s in report["stages"].items():
        lines += ["", f"## {name}", "", f"{s['summary']}: `{s['command']}`", ""]
        if isinstance(s["control"], list):
            lines += ["Control run differs from the reference: " + "; ".join(s["control"]), ""]
        if s.get("resumed_at_steps"):
            lines += [f"Reruns resumed from checkpoints of steps {s['resumed_at_steps']}.", ""]
        if not s["failures"]:
            lines += [f"No failure in {s['trials']} trials ({s['kills_total']} kills)."]
            continue
        symptoms: dict[str, list[int]] = {}
        for f in s["failures"]:
            for key in sorted({symptom(p) for p in f["problems"]}):
                symptoms.setdefault(key, []).append(f["trial"])
        lines += [f"{s['failed_trials']} of {s['trials']} trials failed. Symptoms (trials):", ""]
        lines += [f"- {key}: {len(trials)} trials {trials[:12]}" for key, trials in sorted(symptoms.items())]
        lines += ["", "First failures in full:", ""]
        for f in s["failures"][:5]:
            kills = "; ".join(f"{k['mode']} kill at {k['at_s']}s ({k['fraction']:.0%} of the reference), "
                              f"{k['landing']}, progress {k['progress']}" for k in f["kills"])
            lines += [f"- trial {f['trial']}: {kills or 'no kill'}", *[f"  - {p}" for p in f["problems"][:6]],
                      f"  - repeat: `{f['repro']}`"]
    return "\n".join(lines) + "\n"
