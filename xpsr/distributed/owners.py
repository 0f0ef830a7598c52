"""Who owns a file on a shared folder, whether that owner still lives, and an exclusive create that holds on NFS.

Several processes on several machines coordinate through files in a folder that may be a network filesystem
(NFS, Lustre, GPFS, CephFS). Advisory locks (``flock``/``fcntl``) are not dependable there: Lustre mounted
``localflock`` and NFS mounted ``nolock``/``local_lock=all`` keep them per machine, so two nodes both "hold"
the same lock. What every one of these filesystems does make atomic is a single namespace operation done by
the server: ``link()`` of an existing file to a new name fails with EEXIST when the name exists (the classic
NFS lock-file recipe of open(2)'s manual), and ``rename()`` replaces or moves a name in one step. So:

- :func:`create_exclusive` writes the owner record into a unique file, then links it to the wanted name: the
  name appears atomically *with* its content, and only one process can win it. When the server's reply to a
  successful link is lost and the retransmission answers EEXIST, the link count of our unique file (2) still
  tells the truth. Filesystems without hard links fall back to ``O_CREAT | O_EXCL`` (atomic on NFSv3 and
  later, which implement exclusive create on the server).
- An owner record names the machine (host name, boot id, pid namespace) and the process (pid and start
  time). On the same machine :func:`owner_alive` answers for sure (a dead or recycled pid is dead). For an owner
  on another machine nobody can tell; callers then use the age of the file's modification time, which the
  owner refreshes (a lease), measured against the filesystem's own clock (:func:`fs_now`), so clocks of the
  machines need not agree.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import uuid
from functools import cache
from pathlib import Path


@cache
def machine() -> dict:
    """This machine as other processes see it: two containers that share a host name and a kernel still
    differ in their pid namespace, so a pid is only compared where it means the same process."""
    boot = ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return {"host": socket.gethostname(), "boot": boot, "pidns": pidns}


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat): tells a recycled pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def this_owner(**extra) -> dict:
    """The owner record of this process (plus ``extra`` fields, e.g. a rank)."""
    return {**machine(), "pid": os.getpid(), "start": _start_ticks(os.getpid()), **extra}


def owner_alive(owner: dict | None) -> bool | None:
    """True/False when ``owner`` is a process of this machine (alive or not), None when it cannot be known
    here (another machine or container, or no readable record)."""
    if not owner or any(owner.get(k) != v for k, v in machine().items()) or not machine()["boot"]:
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    start = _start_ticks(pid)
    return start is None or owner.get("start") in (None, start)


def read_owner(path: Path) -> dict | None:
    """The owner record in ``path``; None when it is missing, empty or not ours."""
    try:
        record = json.loads(path.read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_stale(path: Path, lease_s: float, probe: Path) -> bool:
    """Whether the owned file ``path`` belongs to no live process: for sure when its owner is of this machine,
    else when it was not touched for ``lease_s`` seconds of the filesystem's clock (read by touching ``probe``).
    A file without a readable owner record (an older version's, or half written) is judged by its age."""
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return True
    alive = owner_alive(read_owner(path))
    if alive is not None:
        return not alive
    return fs_now(probe) - mtime > lease_s


def fs_now(probe: Path) -> float:
    """The filesystem's clock: touch ``probe`` (created if missing) and read its modification time. On NFS a
    touch without explicit times is stamped by the server, the same clock that stamps every other file there."""
    fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.utime(fd)
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def create_exclusive(path: Path, record: dict) -> int | None:
    """Create ``path`` holding ``record`` (JSON) if no file has that name; returns an open descriptor of it
    (for :func:`os.utime` heartbeats and an identity check), or None if the name exists."""
    unique = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.new")
    fd = os.open(unique, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    won = False
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)  # the record is on the server before the name that others read points to it
        try:
            os.link(unique, path)
            won = True
        except FileExistsError:
            won = os.fstat(fd).st_nlink == 2  # our link did succeed, only the server's reply was lost
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            return _create_excl(path, record)  # no hard links here (some FUSE or SMB mounts)
        return fd if won else None
    finally:
        if not won:
            os.close(fd)
        Path(unique).unlink(missing_ok=True)


def _create_excl(path: Path, record: dict) -> int | None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
    return fd
