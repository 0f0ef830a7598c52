"""Errors that describe a problem with the user's inputs or setup (the CLI prints them without a traceback)."""
from __future__ import annotations

import errno
import os


class XPSRError(Exception):
    """Base of our user-facing errors that are not already FileNotFoundError/ValueError/KeyError."""


class OutputError(XPSRError, OSError):
    """An output cannot be written (read-only or missing folder, a file where a folder should be, disk full).

    Also an OSError with the cause's ``errno``, so code that already handles OSError (a full disk) keeps
    working."""

    @classmethod
    def of(cls, message: str, cause: OSError) -> "OutputError":
        error = cls(message)
        error.errno, error.strerror, error.filename = cause.errno, cause.strerror, cause.filename
        return error

    def __str__(self) -> str:  # our message, not OSError's "[Errno N] strerror: filename" built from the fields
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def shown(path: str | os.PathLike | bytes | object) -> str:
    """``path`` as a message or record shows it: as is when printable UTF-8; bytes that are not UTF-8 (kept
    by Python as lone surrogates, which cannot be printed, stored in SQLite or written as UTF-8) become
    ``\\xNN`` escapes, and newlines or other control characters are escaped so a message stays one line."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)  # or a named stream
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return text if text.isprintable() else one_line(text)


def one_line(text: str) -> str:
    """``text`` with every line break or other non-printable character escaped, so a message stays one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class DiskFullError(XPSRError):
    """A write failed because the disk (or quota) is full; the message names the file being written."""


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT anywhere in the exception's cause/context chain, safetensors' "os error 28"
    and SQLite's 'database or disk is full'."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text:
            return True
        if type(e).__module__ == "sqlite3" and "disk is full" in text:
            return True
        e = e.__cause__ or e.__context__
    return False
