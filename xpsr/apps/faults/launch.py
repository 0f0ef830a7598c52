"""Start a stage (`xpsr SUBCOMMAND ...`) as its own process, watch its output folder, SIGKILL it.

Two launchers:

- ``subprocess`` — ``python -m xpsr.cli ...``, exactly what a user runs, imports included (torch and
  diffusers take seconds to import, so some kills land before any work: that is real and counted);
- ``forkserver`` — a server process imports the stages once, then forks one child per run, which calls
  ``xpsr.cli.main``; a run costs milliseconds to start, so every kill lands in the work. The test suite
  uses it to stay fast.

Either way the stage runs in a separate process with its own memory and file descriptors: what a
SIGKILL leaves behind is what the kernel has been given so far, as with any ``kill -9``.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STAGE_MODULES = ["xpsr.cli", "xpsr.data.pairs", "xpsr.captions.run", "xpsr.inference.run", "xpsr.metrics.evaluate",
                 "xpsr.training.loop"]


def stage_environment() -> dict[str, str]:
    """Offline, one thread (the same bytes in every run, and fast on a shared machine), this xpsr."""
    import xpsr

    root = str(Path(xpsr.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)


class Run:
    """One started stage process."""

    def __init__(self, pid: int, poll, kill, wait):
        self.pid, self._poll, self._kill, self._wait = pid, poll, kill, wait
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def poll(self) -> int | None:
        """The exit code, or None while it runs (a SIGKILLed run reports -9)."""
        return self._poll()

    def kill(self) -> bool:
        """SIGKILL the run; False when the kill found the work already done (see :func:`kill_one_rank`)."""
        return self._kill() is not False

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit; returns the exit code, or None if it still runs after ``timeout`` seconds."""
        return self._wait(timeout)


class SubprocessLauncher:
    name = "subprocess"

    def __init__(self):
        self.env = stage_environment()

    def start(self, argv: list[str], log: Path, processes: int = 1) -> Run:
        command = [sys.executable, "-m", "xpsr.cli", *argv]
        if processes > 1:
            command = torchrun_command(processes) + ["-m", "xpsr.cli", *argv]
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

        def wait(timeout):
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None

        def kill():  # the whole session: a stage that spawned workers loses them too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        if processes > 1:
            return Run(proc.pid, proc.poll, lambda: kill_one_rank(proc, kill, log), wait)
        return Run(proc.pid, proc.poll, kill, wait)

    def close(self) -> None:
        pass


LAUNCHER_GRACE_S = 120.0  # how long torchrun may take to stop the job after one of its ranks died


def torchrun_command(processes: int) -> list[str]:
    """torchrun on this machine: ``processes`` CPU ranks, rendezvous on loopback at a free port, no restarts
    (a dead rank must end the job; ``resume=latest`` is what continues it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--max_restarts=0"]


def worker_pids(agent: int) -> list[int]:
    """The processes torchrun started (its children), oldest first."""
    try:
        text = Path(f"/proc/{agent}/task/{agent}/children").read_text()
    except OSError:
        return []
    return sorted(int(pid) for pid in text.split())


def kill_one_rank(proc: subprocess.Popen, kill_all, log: Path) -> None:
    """SIGKILL the newest rank, as a crashed GPU or an OOM killer would, then let the launcher stop the job.
    Before the ranks exist the launcher itself is killed (with its whole session). If torchrun still runs
    after LAUNCHER_GRACE_S, that is a hung job: it is killed and the log says so."""
    workers = worker_pids(proc.pid)
    if not workers:
        kill_all()
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(workers[-1], signal.SIGKILL)
    try:
        # torchrun ending the job cleanly means the rank was already past its work (CI once saw it between its
        # last write and its exit): nothing was interrupted, a miss
        return proc.wait(LAUNCHER_GRACE_S) != 0
    except subprocess.TimeoutExpired:
        kill_all()
        with open(log, "ab") as f:
            f.write(f"\nfault injection: torchrun did not stop the job {LAUNCHER_GRACE_S:.0f}s after rank pid "
                    f"{workers[-1]} was killed\n".encode())
        return True


def _run_cli(argv: list[str], log: str) -> None:
    """Body of a forked run: output to ``log``, then ``xpsr`` as the command line would run it."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import torch

    torch.set_num_threads(1)
    from xpsr.cli import main

    sys.exit(main(argv))


def _nothing() -> None:
    pass


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class ForkServerLauncher:
    """Runs from multiprocessing's fork server, which imports the stage modules once when it starts.

    The server is started here with the stage environment (offline, one thread): every run inherits it."""

    name = "forkserver"

    def __init__(self):
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["xpsr.apps.faults.launch", *STAGE_MODULES])
        with _environ(stage_environment()):
            warm = self.ctx.Process(target=_nothing)
            warm.start()
            warm.join()

    def start(self, argv: list[str], log: Path, processes: int = 1) -> Run:
        if processes > 1:  # torchrun starts its own ranks: it cannot be forked from here
            return SubprocessLauncher().start(argv, log, processes)
        log.write_bytes(b"")  # exists even when the run is killed before it opens it
        proc = self.ctx.Process(target=_run_cli, args=(list(argv), str(log)))
        proc.start()

        def wait(timeout):
            proc.join(timeout)
            return proc.exitcode

        return Run(proc.pid, lambda: proc.exitcode, proc.kill, wait)

    def close(self) -> None:
        pass


def make_launcher(name: str):
    if name == "subprocess":
        return SubprocessLauncher()
    if name == "forkserver":
        return ForkServerLauncher()
    raise ValueError(f"launcher must be 'subprocess' or 'forkserver', got {name!r}")


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of everything under ``root``: two calls that differ saw a write in between."""
    state = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):  # renamed or deleted while we looked
                st = os.stat(path)
                state[path] = (st.st_size, st.st_mtime_ns)
    return state


@dataclass
class Watch:
    """What a run did: when it ended, whether we killed it, and the writes we saw (times from start)."""

    rc: int | None
    killed: bool
    seconds: float
    write_times: list[float]
    timed_out: bool = False


def watch(run: Run, root: Path, kill_at_s: float | None = None, kill_at_write: int | None = None,
          poll_s: float = 0.002, timeout_s: float = 3600.0) -> Watch:
    """Follow ``run`` to its end, counting writes under ``root`` (a file or folder that appears or
    changes size/mtime between two polls); SIGKILL it at ``kill_at_s`` seconds or at the
    ``kill_at_write``-th write seen. A run that ends first, or whose kill reports that it found the work done,
    was not killed (a miss)."""
    try:
        return _follow(run, root, kill_at_s, kill_at_write, poll_s, timeout_s)
    except BaseException:  # the campaign itself interrupted (Ctrl-C, SIGTERM): leave no stage running
        run.kill()
        raise


def _follow(run: Run, root: Path, kill_at_s: float | None, kill_at_write: int | None, poll_s: float,
            timeout_s: float) -> Watch:
    writes: list[float] = []
    before = tree_state(root)
    while True:
        rc = run.poll()
        t = run.elapsed()
        if rc is not None:
            return Watch(rc, False, t, writes)
        if t > timeout_s:
            run.kill()
            return Watch(run.wait(), True, t, writes, timed_out=True)
        now = tree_state(root)
        if now != before:
            writes += [t] * sum(1 for k, v in now.items() if before.get(k) != v)
            before = now
        if (kill_at_write is not None and len(writes) >= kill_at_write) or \
                (kill_at_s is not None and t >= kill_at_s):
            interrupted = run.kill()  # False: the kill found the work done, a miss drawn again by the caller
            return Watch(run.wait(), interrupted, t, writes)
        time.sleep(poll_s)
