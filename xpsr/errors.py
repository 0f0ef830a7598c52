"""Errors that describe a problem with the user's inputs or setup (the CLI prints them without a traceback)."""
from __future__ import annotations

import errno
import os
from pathlib import Path


class XPSRError(Exception):
    """Base of our user-facing errors that are not already FileNotFoundError/ValueError/KeyError."""


class DiskFullError(XPSRError):
    """A write failed because the disk (or quota) is full; the message names the file being written."""


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT and SQLite's 'database or disk is full'."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return type(e).__module__ == "sqlite3" and "disk is full" in str(e)


def shown(path: str | Path) -> str:
    """``path`` as printable text: bytes that are not UTF-8 (kept by Python as lone surrogates, which cannot be
    printed, stored in SQLite or written as UTF-8) appear as ``\\xNN`` escapes, so messages and records name it."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
