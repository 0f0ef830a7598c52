"""Errors that describe a problem with the user's inputs or setup (the CLI prints them without a traceback)."""


class XPSRError(Exception):
    """Base of our user-facing errors that are not already FileNotFoundError/ValueError/KeyError."""
