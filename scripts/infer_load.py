#!/usr/bin/env python
"""`xpsr infer` under load: several processes share one input and output folder, one is killed with SIGKILL
part way, a replacement joins, and the script checks that every image was written exactly once, that the kill
cost at most the image in flight, and that memory stayed flat (peak RSS of each process after 100 images and
at the end).

    OMP_NUM_THREADS=1 python scripts/infer_load.py --images 2000 --size 16 --processes 2 --work /tmp/infer_load

Each worker is the real `run_inference` (tiny model, CPU, configs/infer/tiny_cpu.yaml) with the per-image step
wrapped to append lines to a shared log ("start" once an image is claimed, "written" once its output is renamed
into place; pid, name, ru_maxrss, time), so the script can tell which process did what and when. The result
(JSON on stdout and in WORK/load_result.json) has: ``written_once`` (every image written exactly once),
``duplicates``, ``missing``, ``lost_in_kill`` (images the killed process had claimed but not written: the work
the kill cost), ``peak_rss_mb`` per process at its 100th image and at its end, ``final_pass`` (a last run
alone: nothing redone, temp/claim files of the killed process cleaned).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "infer" / "tiny_cpu.yaml"

# Worker: the real run_inference, its writes logged with the process's peak RSS (kB on Linux) at that moment.
WORKER = """
import os, resource, sys, time
import xpsr.inference.run as run_mod
from xpsr.config import InferConfig, load_config
log, pause, config, overrides = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
def note(word, path):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(log, "a") as f:  # one short O_APPEND write per line: lines of several processes never mix
        f.write(f"{word} {os.getpid()} {os.path.basename(str(path))} {rss} {time.time():.3f}\\n")
real_one, real_save = run_mod._super_resolve_one, run_mod.save_png_atomic
def one(modules, prompts, path, target, *args):
    note("start", target)  # claimed, about to read and super-resolve it
    return real_one(modules, prompts, path, target, *args)
def save(array, path):
    real_save(array, path)
    note("written", path)
    time.sleep(pause)  # to make sure a kill lands mid-run in short tests on fast machines
run_mod._super_resolve_one, run_mod.save_png_atomic = one, save
run_mod.run_inference(load_config(InferConfig, config, overrides))
"""


def make_inputs(folder: Path, count: int, size: int, seed: int = 0) -> list[str]:
    """``count`` random ``size`` x ``size`` PNGs (seeded); returns their names."""
    from xpsr.data.images import save_png_atomic

    rng = np.random.default_rng(seed)
    names = [f"{i:05d}.png" for i in range(count)]
    for name in names:
        if not (folder / name).is_file():
            save_png_atomic(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), folder / name)
    return names


def read_log(log: Path) -> list[tuple[str, int, str, int, float]]:
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:  # a line cut by the kill (never seen with O_APPEND, but harmless) is ignored
            rows.append((parts[0], int(parts[1]), parts[2], int(parts[3]), float(parts[4])))
    return rows


def start_worker(log: Path, src: Path, out: Path, steps: int, pause: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = [f"input={src}", f"output_dir={out}", f"num_inference_steps={steps}"]
    # stderr to a file, not a pipe: a pipe nobody reads until the end fills up (tqdm) and blocks the worker
    err = log.with_name(f"worker-{time.time_ns()}.err")
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(log), str(pause), str(TINY), *args],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    proc.err_path = err
    return proc


def _tail(proc: subprocess.Popen) -> str:
    return proc.err_path.read_text(errors="replace")[-2000:]


def peak_rss(rows, pid: int, after: int) -> float | None:
    """Peak RSS (MB) of ``pid`` when it had written ``after`` images (None if it wrote fewer)."""
    mine = [rss for word, p, _, rss, _ in rows if word == "written" and p == pid]
    return round(mine[after - 1] / 1024, 1) if len(mine) >= after else None


def run_load(work: Path, images: int, size: int, processes: int, kill_at: float, steps: int,
             pause: float = 0.0, timeout: float = 3600) -> dict:
    src, out, log = work / "lr", work / "sr", work / "log.txt"
    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)
    names = make_inputs(src, images, size)
    start = time.perf_counter()
    workers = [start_worker(log, src, out, steps, pause) for _ in range(processes)]
    victim, replacement = workers[0], None
    deadline = time.time() + timeout
    while time.time() < deadline and any(w.poll() is None for w in workers):
        written = sum(1 for row in read_log(log) if row[0] == "written")
        if replacement is None and kill_at > 0 and written >= kill_at * images and victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            replacement = start_worker(log, src, out, steps, pause)  # joins while the others are still working
            workers.append(replacement)
        time.sleep(0.05)
    for w in workers:
        if w.poll() is None:
            w.kill()
            raise RuntimeError(f"worker {w.pid} still running after {timeout}s")
    seconds = time.perf_counter() - start
    failed = [(w.pid, w.returncode, _tail(w)) for w in workers if w is not victim and w.returncode]
    if failed:
        raise RuntimeError(f"workers failed: {failed}")
    rows = read_log(log)
    written = [name for word, _, name, _, _ in rows if word == "written"]
    counts = {n: written.count(n) for n in set(written)}
    started_by_victim = {n for w, p, n, _, _ in rows if w == "start" and p == victim.pid}
    written_by_victim = {n for w, p, n, _, _ in rows if w == "written" and p == victim.pid}
    leftovers_before_final = sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-"))

    final = start_worker(log, src, out, steps)  # alone now: redoes nothing, cleans what the kill left
    if final.wait(timeout=timeout):
        raise RuntimeError(f"final pass failed: {_tail(final)}")
    final_report = json.loads((out / "infer_report.json").read_text())
    per_process = {}
    for w in workers:
        mine = [rss for word, p, _, rss, _ in rows if word == "written" and p == w.pid]
        per_process[str(w.pid)] = {
            "role": "killed" if w is victim and kill_at > 0 else "replacement" if w is replacement else "worker",
            "written": len(mine), "peak_rss_mb_at_100": peak_rss(rows, w.pid, 100),
            "peak_rss_mb_at_end": round(mine[-1] / 1024, 1) if mine else None}
    times = [t for word, _, _, _, t in rows if word == "written"]
    return {
        "images": images, "size": size, "processes": processes, "steps": steps, "kill_at": kill_at,
        "seconds": round(seconds, 1), "images_per_s": round(images / seconds, 2),
        # throughput of all processes together between the first and the last write (model loading excluded)
        "images_per_s_writing": round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else None,
        "written_once": sorted(counts) == sorted(names) and all(c == 1 for c in counts.values()),
        "duplicates": sorted(n for n, c in counts.items() if c > 1), "missing": sorted(set(names) - set(counts)),
        "lost_in_kill": sorted(started_by_victim - written_by_victim),
        "temp_files_before_final_pass": leftovers_before_final, "per_process": per_process,
        "final_pass": {"done": final_report["done"], "skipped_existing": final_report["skipped_existing"],
                       "failed": final_report["failed"],
                       "temp_files_left": sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-"))},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/xpsr_infer_load"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16, help="input side in px (outputs are x4)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction written when one process is killed "
                                                                   "(0: no kill)")
    parser.add_argument("--steps", type=int, default=1, help="num_inference_steps")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds each worker sleeps after each image")
    args = parser.parse_args()
    result = run_load(args.work, args.images, args.size, args.processes, args.kill_at, args.steps, args.pause)
    text = json.dumps(result, indent=2)
    (args.work / "load_result.json").write_text(text)
    print(text)
    ok = result["written_once"] and len(result["lost_in_kill"]) <= 1 and result["final_pass"]["done"] == 0 \
        and not result["final_pass"]["temp_files_left"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
