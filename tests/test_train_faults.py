"""Training under faults: kill -9 at random instants, damaged checkpoints, a full disk, logs after a resume.

Each run is a real process running the `xpsr train` CLI (``xpsr.cli.main``) on one thread, forked from
the test process so the imports are paid once (a fresh interpreter costs ~10 s of CPU here); runs that
are killed get SIGKILL. A checkpoint's saved config names the run dir, so runs compared byte for byte
are made in the same folder one after another (see tests/test_determinism.py) and moved aside after.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO

from xpsr.training import checkpointing

STEPS = 6
CHECKPOINT_FILES = ("trained.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "state.json",
                    "checksums.json")


@dataclass
class Lab:
    root: Path
    work: Path  # every compared run happens here
    argv: list[str]
    straight: Path  # the uninterrupted run, moved aside

    def fresh(self) -> Path:
        if self.work.exists():
            shutil.rmtree(self.work)
        return self.work

    def start(self, *extra: str, before=None) -> int:
        """Fork a process running ``xpsr train`` in ``work``; its stdout and stderr go to ``log``."""
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.log, "ab")
        pid = os.fork()
        if pid:
            log.close()
            return pid
        code = 70
        try:  # the child: never returns into pytest
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            warnings.resetwarnings()  # pytest records warnings; a user sees them on stderr
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(m, c, f, n, line))
            torch.set_num_threads(1)
            if before is not None:
                before()
            from xpsr.cli import main

            code = main([*self.argv, *extra])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    @property
    def log(self) -> Path:
        return self.root / "child.log"

    def wait(self, pid: int, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"xpsr train did not finish in {timeout} s:\n{self.read_log()}")

    def run(self, *extra: str, before=None) -> tuple[int, str]:
        self.log.unlink(missing_ok=True)
        code = self.wait(self.start(*extra, before=before))
        return code, self.read_log()

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _import_what_training_imports() -> None:
    """Import (and build once) here what `xpsr train` needs, so every forked run starts with it loaded:
    a cold run spent about 20 of its 35 s importing diffusers and accelerate."""
    import accelerate  # noqa: F401
    import diffusers.optimization  # noqa: F401
    from conftest import tiny_config

    import xpsr.cli  # noqa: F401
    import xpsr.training.dataset  # noqa: F401
    import xpsr.training.loop  # noqa: F401
    from xpsr.models.build import build_xpsr

    build_xpsr(tiny_config())  # touches diffusers' lazily imported model classes


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    from xpsr.training.demo_data import make_demo_data

    _import_what_training_imports()
    root = tmp_path_factory.mktemp("faults")
    demo = make_demo_data(root / "data", crop_size=64)
    work = root / "run"
    argv = ["train", "--config", str(REPO / "configs" / "train" / "tiny.yaml"), f"output_dir={work}",
            "demo_data=false", f"data.pairs=[{demo.pairs[0]}]", f"data.cache={demo.cache}", "report_to=none",
            "validation.every=0", "seed=11", f"max_steps={STEPS}", "checkpoint_every=1",
            "checkpoints_total_limit=null", "log_every=1", "num_workers=0", "resume=latest"]
    lab = Lab(root, work, argv, root / "straight")
    code, log = lab.run()
    assert code == 0, log[-3000:]
    shutil.move(str(work), str(lab.straight))
    return lab


def _losses(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "logs" / "losses.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]  # the one wall-clock field


def _assert_equals_straight(lab: Lab, steps=range(1, STEPS + 1)) -> None:
    run, straight = lab.work, lab.straight
    assert (run / "final" / "trained.safetensors").read_bytes() == \
           (straight / "final" / "trained.safetensors").read_bytes(), "final weights"
    for step in steps:
        for name in CHECKPOINT_FILES:
            a, b = run / "checkpoints" / f"step-{step}" / name, straight / "checkpoints" / f"step-{step}" / name
            assert a.read_bytes() == b.read_bytes(), f"step-{step}/{name}"
    losses = _losses(run)
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1)), "each step logged once"
    assert losses == _losses(straight)
    assert not [p for p in run.rglob(".tmp-*")], "temp files left behind"


def _copy_checkpoints(lab: Lab, steps, with_log_until: int | None = None) -> Path:
    """A run dir holding the straight run's checkpoints ``steps`` (and its log rows up to a step)."""
    work = lab.fresh()
    for step in steps:
        shutil.copytree(lab.straight / "checkpoints" / f"step-{step}", work / "checkpoints" / f"step-{step}")
    if with_log_until is not None:
        (work / "logs").mkdir()
        rows = (lab.straight / "logs" / "losses.jsonl").read_text().splitlines()[:with_log_until]
        (work / "logs" / "losses.jsonl").write_text("".join(r + "\n" for r in rows))
    return work


def _kill_when(lab: Lab, condition, delay=0.0, before=None, timeout=300.0) -> bool:
    """Start a run and SIGKILL it ``delay`` s after ``condition()`` first holds; False if it ended first."""
    pid = lab.start(before=before)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, lab.read_log()[-3000:]
            return False
        if condition():
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the condition never held:\n{lab.read_log()}")


def _slow(module, name: str, seconds: float):
    """For the child only: make ``module.name`` pause first, so a kill can land inside that phase."""
    def patch():
        original = getattr(module, name)

        def slowed(*args, **kwargs):
            time.sleep(seconds)
            return original(*args, **kwargs)

        setattr(module, name, slowed)
    return patch


def test_kill_9_at_random_instants_then_resume_latest_equals_the_straight_run(lab):
    rng = random.Random(2024)
    work = lab.fresh()
    ckpts = work / "checkpoints"

    def temp_folder():
        return ckpts.is_dir() and any(p.name.startswith(".tmp-step-") for p in ckpts.iterdir())

    def steps_done():
        return len(list(ckpts.glob("step-*"))) if ckpts.is_dir() else 0

    start, baseline = time.monotonic(), 0
    kills = [
        ("at startup", lambda: time.monotonic() - start > rng.uniform(0.5, 3.0), 0.0, None),
        ("while writing the files of a checkpoint", temp_folder, rng.uniform(0.0, 0.15),
         _slow(torch, "save", 0.2)),
        ("mid-step after a new checkpoint", lambda: steps_done() > baseline, rng.uniform(0.0, 0.3), None),
        ("after the files, before the checksum manifest", temp_folder, rng.uniform(0.0, 0.2),
         _slow(checkpointing, "write_manifest", 0.3)),
    ]
    killed = []
    for what, condition, delay, before in kills:
        start, baseline = time.monotonic(), steps_done()
        if _kill_when(lab, condition, delay, before):
            killed.append(what)
    assert len(killed) >= 3, f"only these kills landed before the run ended: {killed}"
    code, log = lab.run()
    assert code == 0, log[-3000:]
    _assert_equals_straight(lab)


def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_ends_as_the_straight_run(lab):
    work = _copy_checkpoints(lab, (2, 3, 4), with_log_until=4)
    damaged = work / "checkpoints" / "step-4" / "trained.safetensors"
    os.truncate(damaged, damaged.stat().st_size // 2)
    code, log = lab.run()
    assert code == 0, log[-3000:]
    assert f"skipped damaged checkpoint step-4: {damaged}" in log and "resumed from" in log
    assert "step-3 at step 3" in log
    # the damaged folder is kept for salvage under another name, never deleted
    kept = work / "checkpoints" / "step-4.damaged" / "trained.safetensors"
    assert kept.is_file() and kept.stat().st_size < (lab.straight / "checkpoints" / "step-4" /
                                                     "trained.safetensors").stat().st_size
    _assert_equals_straight(lab, steps=(2, 3, 4, 5, 6))


def test_resume_path_to_a_damaged_checkpoint_fails_naming_the_file(lab):
    work = _copy_checkpoints(lab, (3, 4))
    broken = work / "checkpoints" / "step-4" / "optimizer.pt"
    os.truncate(broken, 1000)
    code, log = lab.run(f"resume={work / 'checkpoints' / 'step-4'}")
    assert code == 1, log[-3000:]
    assert f"xpsr train: {broken}: 1000 bytes, checksums.json says" in log
    assert "Traceback" not in log
    assert not (work / "final").exists() and broken.stat().st_size == 1000  # nothing trained, nothing deleted


def test_after_a_resume_the_loss_log_holds_each_step_once(lab):
    # a kill after step 6 was logged but before its checkpoint, mid-way through writing the next row
    work = _copy_checkpoints(lab, (4, 5), with_log_until=6)
    with open(work / "logs" / "losses.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.')
    code, log = lab.run()
    assert code == 0, log[-3000:]
    assert "dropped 1 rows after step 5" in log and "1 unreadable rows" in log
    _assert_equals_straight(lab, steps=(5, 6))


def test_disk_full_while_writing_a_checkpoint_stops_cleanly_and_a_rerun_completes(lab, monkeypatch):
    real_open = open

    class FillingFile:
        """A file on a disk that fills up after 5 MB (half of optimizer.pt)."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > 5_000_000:
                self.f.write(bytes(data)[:5_000_000 - self.f.tell()])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if Path(path).name == "optimizer.pt" and Path(path).parent.name == ".tmp-step-3":
            return FillingFile(f)
        return f

    lab.fresh()
    monkeypatch.setattr(checkpointing, "open", open_on_a_full_disk, raising=False)  # inherited by the child
    code, log = lab.run()
    monkeypatch.undo()
    ckpts = lab.work / "checkpoints"
    assert code == 1, log[-3000:]
    assert f"xpsr train: disk full while writing checkpoint {ckpts / 'step-3'}" in log and "Traceback" not in log
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1", "step-2"]  # no partial files left
    for name in CHECKPOINT_FILES:
        assert (ckpts / "step-2" / name).read_bytes() == (lab.straight / "checkpoints" / "step-2" / name).read_bytes()
    code, log = lab.run()  # space was freed
    assert code == 0, log[-3000:]
    _assert_equals_straight(lab)


class _ShortWrites:
    """A raw file on a disk that fills up: each write stores half the bytes and says so."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        return self.f.write(bytes(data)[:len(data) // 2])

    def __getattr__(self, name):
        return getattr(self.f, name)


def _loss_log_on_a_full_disk():
    from xpsr.training import loop

    def open_loss_log(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return _ShortWrites(f) if Path(path).name == "losses.jsonl" else f

    loop.open = open_loss_log


def test_disk_full_while_logging_stops_naming_the_log_and_the_torn_row_is_dropped_on_resume(lab):
    work = _copy_checkpoints(lab, (4, 5), with_log_until=5)
    code, log = lab.run(before=_loss_log_on_a_full_disk)
    assert code == 1, log[-3000:]
    assert f"xpsr train: disk full while writing {work / 'logs' / 'losses.jsonl'}" in log and "Traceback" not in log
    assert (work / "logs" / "losses.jsonl").read_text().count("\n") == 5  # rows 1-5 and half of row 6
    code, log = lab.run()
    assert code == 0, log[-3000:]
    assert "dropped 0 rows after step 5 (this session logs them again) and 1 unreadable rows" in log
    _assert_equals_straight(lab, steps=(5, 6))
