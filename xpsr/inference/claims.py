"""Several `xpsr infer` processes, on one machine or several, sharing one output folder: per-image claims, and
cleaning of our own temp files.

A claim is a small file beside the output, ``.tmp-claim-<hash>``, holding its owner's record (machine, pid,
start time). It is made with :func:`xpsr.distributed.owners.create_exclusive`: a unique file linked to the claim
name, which the filesystem's server does atomically (``link()`` fails with EEXIST when the name exists, on
local disks and on NFS v2-v4, Lustre, GPFS, CephFS alike), so two processes, wherever they run, never both
win one image. Advisory locks (``flock``) are not used: on a Lustre ``localflock`` or an NFS ``local_lock``
mount they only exclude processes of the same machine. The protocol, for one output ``target``:

1. create the claim file exclusively; if it exists, skip the image unless its claim is *stale* (below);
2. with the claim held, skip the image if ``target`` exists (another process finished it meanwhile);
3. write ``target`` (atomically: temp file + rename), then remove the claim file if it is still ours.

A claim is stale when its owner is a process of this machine that has ended (checked by pid and start time:
``kill -9`` frees an image at once), or, for an owner on another machine, when the claim file was not touched
for ``LEASE_S`` seconds: a thread of the owner touches its claims every ``HEARTBEAT_S`` seconds, and ages are
read on the filesystem's clock (:func:`~xpsr.distributed.owners.fs_now`), so the machines' clocks need not
agree. A stale claim is taken over by renaming it away (atomic: one taker wins) and creating a new one.

Every process also keeps a session file (``.tmp-infer-session-*``, same record, same heartbeat) in the output
folder while it runs; one that finds no other live session there is alone, and removes the temp files and
claim files that killed runs left behind.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from xpsr.distributed import owners
from xpsr.distributed.owners import create_exclusive, fs_now, read_owner, this_owner

FOLDER_LOCK = ".xpsr-infer.lock"  # touched to read the filesystem's clock (name kept from the flock era)
CLAIM_PREFIX = ".tmp-claim-"
SESSION_PREFIX = ".tmp-infer-session-"
LEASE_S = 300.0  # a claim of another machine untouched this long is taken over (its owner died)
HEARTBEAT_S = 30.0  # how often owners touch their claims: well inside the lease, NFS attribute caching included
# save_png_atomic's temp names (tempfile.mkstemp: 8 characters from [a-z0-9_]); nothing else is ever removed
_TEMP_PNG = re.compile(r"^\.tmp-[a-z0-9_]{8}\.png$")

_held: set[int] = set()  # descriptors of our claim and session files, touched by the heartbeat thread
_held_lock = threading.Lock()
_beating: threading.Thread | None = None


def _heartbeat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _held_lock:
            for fd in list(_held):
                try:
                    os.utime(fd)
                except OSError:  # the file was taken over or its folder removed: nothing to keep alive
                    pass


def _hold(fd: int) -> int:
    global _beating
    with _held_lock:
        _held.add(fd)
        if _beating is None:
            _beating = threading.Thread(target=_heartbeat, name="xpsr-claims-heartbeat", daemon=True)
            _beating.start()
    return fd


def _drop(fd: int) -> None:
    with _held_lock:
        _held.discard(fd)
    os.close(fd)


def claim_path(target: Path) -> Path:
    """The claim file of one output (a hash keeps the name short whatever the output's name)."""
    digest = hashlib.sha1(os.fsencode(target.name)).hexdigest()[:16]
    return target.parent / f"{CLAIM_PREFIX}{digest}"


def is_stale(path: Path) -> bool:
    """Whether the claim or session file ``path`` belongs to no live process (see the module's docstring)."""
    return owners.is_stale(path, LEASE_S, path.parent / FOLDER_LOCK)


def _take_over(path: Path, judged: os.stat_result) -> bool:
    """Remove the stale claim ``path`` (``judged``: its stat from *before* it was judged stale) unless another
    process renewed or replaced it meanwhile; True if the name is free now. Renaming is atomic, so of two takers
    only one moves the file; the mover then checks it moved the file it judged, and puts back a claim it moved by
    mistake (another taker's new one)."""
    moved = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return True
    now = os.stat(moved)
    if (now.st_ino, now.st_mtime_ns) != (judged.st_ino, judged.st_mtime_ns):
        try:
            os.link(moved, path)
        except FileExistsError:
            pass
        moved.unlink(missing_ok=True)
        return False
    moved.unlink(missing_ok=True)
    return True


def try_claim(target: Path) -> int | None:
    """A file descriptor holding the claim of ``target``, or None if a live process holds it."""
    path = claim_path(target)
    for _ in range(3):  # a stale claim taken over can be won by another taker: then it is theirs
        fd = create_exclusive(path, this_owner(output=target.name))
        if fd is not None:
            return _hold(fd)
        try:
            judged = os.stat(path)
        except FileNotFoundError:  # released meanwhile: try again
            continue
        if not is_stale(path) or not _take_over(path, judged):
            return None
    return None


def release_claim(fd: int, target: Path) -> None:
    """Remove the claim file if it is still the one we hold (it may have been taken over), then close it."""
    try:
        here, ours = os.stat(claim_path(target)), os.fstat(fd)
        if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):
            os.unlink(claim_path(target))
    except FileNotFoundError:
        pass
    finally:
        _drop(fd)


def clean_temp_files(folders: Iterable[Path]) -> int:
    """Remove our temp PNGs, and the claim files of no live process, in ``folders`` (not recursive); returns
    how many were removed. Called by a process alone in its output folder."""
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if not entry.is_file(follow_symlinks=False):
                continue
            path = Path(entry.path)
            ours = _TEMP_PNG.match(entry.name) or entry.name.startswith(CLAIM_PREFIX) and (
                read_owner(path) is None or is_stale(path))
            if ours:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


class FolderSession:
    """Held while a process works in ``out``: ``alone`` says whether no other infer process was there at start,
    in which case the temp files of killed runs in ``folders`` have been removed (``cleaned`` of them).

    The session file is created *before* the others are listed, so of two processes starting together at least
    one sees the other: never do both believe they are alone."""

    def __init__(self, out: Path, folders: Iterable[Path]):
        self.out, self.folders = out, list(folders)
        self.alone, self.cleaned, self.fd, self.path = True, 0, None, None

    def __enter__(self) -> FolderSession:
        fs_now(self.out / FOLDER_LOCK)
        self.path = self.out / f"{SESSION_PREFIX}{uuid.uuid4().hex[:16]}"
        self.fd = _hold(create_exclusive(self.path, this_owner()))
        others = [p for p in self.out.glob(f"{SESSION_PREFIX}*") if p != self.path]
        dead = [p for p in others if is_stale(p)]
        self.alone = len(dead) == len(others)
        if self.alone:
            for p in dead:
                p.unlink(missing_ok=True)
            self.cleaned = clean_temp_files(self.folders)
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        _drop(self.fd)
