"""Errors that describe a problem with the user's inputs or setup (the CLI prints them without a traceback)."""
from __future__ import annotations

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
    """``path`` as a message shows it: as is when printable, else Python's quoted, escaped form.

    A file name may hold bytes that are not UTF-8 (kept by Python as lone surrogates, which a UTF-8 stderr
    cannot print), newlines that would split a one-line error, or other control characters."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)  # or a named stream
    return text if text.isprintable() else repr(text)


def one_line(text: str) -> str:
    """``text`` with every line break or other non-printable character escaped, so a message stays one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
