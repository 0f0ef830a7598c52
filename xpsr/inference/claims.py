"""Several `xpsr infer` processes on one output folder: per-image claims, and cleaning of our own temp files.

A claim is an advisory lock (``flock``) on a small file beside the output, ``.tmp-claim-<hash>``. The kernel drops
the lock when its process ends, even by ``kill -9``, so a dead process never blocks the image: the next process
locks the same file and does the image. The protocol, for one output ``target``:

1. open (create) the claim file and try to lock it without waiting; if another process holds it, skip the image;
2. with the lock held, skip the image if ``target`` exists (another process finished it meanwhile);
3. write ``target`` (atomically), then unlink the claim file while still holding its lock, then close it.

A claim file is only unlinked by the holder of its lock and only after the output exists, so a process that
locks a claim file always sees the output of any earlier holder: no image is done twice, and a kill costs at
most the image in flight. Every process also holds a shared lock on ``.xpsr-infer.lock`` in the output folder
while it runs; one that finds itself alone there (exclusive lock granted) removes the temp files and claim
files that killed runs left behind. Locks need a local filesystem or one with working ``flock`` (NFSv4).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: claims always succeed (one process per folder)
    fcntl = None

FOLDER_LOCK = ".xpsr-infer.lock"
CLAIM_PREFIX = ".tmp-claim-"
# save_png_atomic's temp names (tempfile.mkstemp: 8 characters from [a-z0-9_]); nothing else is ever removed
_TEMP_PNG = re.compile(r"^\.tmp-[a-z0-9_]{8}\.png$")


def claim_path(target: Path) -> Path:
    """The claim file of one output (a hash keeps the name short whatever the output's name)."""
    digest = hashlib.sha1(os.fsencode(target.name)).hexdigest()[:16]
    return target.parent / f"{CLAIM_PREFIX}{digest}"


def try_claim(target: Path) -> int | None:
    """A file descriptor holding the claim of ``target``, or None if another live process holds it."""
    fd = os.open(claim_path(target), os.O_CREAT | os.O_RDWR, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release_claim(fd: int, target: Path) -> None:
    """Remove the claim file if it is still the one we hold (see the protocol above), then unlock it."""
    try:
        here, ours = os.stat(claim_path(target)), os.fstat(fd)
        if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):
            os.unlink(claim_path(target))
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def clean_temp_files(folders: Iterable[Path]) -> int:
    """Remove our temp PNGs and claim files in ``folders`` (not recursive); returns how many were removed."""
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and (
                    _TEMP_PNG.match(entry.name) or entry.name.startswith(CLAIM_PREFIX)):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


class FolderSession:
    """Held while a process works in ``out``: ``alone`` says whether no other infer process was there at start,
    in which case the temp files of killed runs in ``folders`` have been removed (``cleaned`` of them)."""

    def __init__(self, out: Path, folders: Iterable[Path]):
        self.out, self.folders = out, list(folders)
        self.alone, self.cleaned, self.fd = True, 0, None

    def __enter__(self) -> FolderSession:
        self.fd = os.open(self.out / FOLDER_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.alone = False
        if self.alone:
            self.cleaned = clean_temp_files(self.folders)
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # others may join now; they will not clean while we run
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
