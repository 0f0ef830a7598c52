"""bitsandbytes only in the commands that use it.

diffusers imports peft when it is installed, and ``peft.helpers`` imports bitsandbytes whenever *that* is
installed (pyiqa declares it as a dependency, so it usually is). On import, bitsandbytes' CPU backend tries to
fetch a kernel from the Hub and, offline, logs "Failed to load CPU gemm_4bit_forward from kernels-community":
noise in the log of every command, none of which uses 4-bit layers. The one user here is ``use_8bit_adam``.

Commands that do not use it run with it hidden: a ``None`` entry in ``sys.modules`` makes
``importlib.util.find_spec`` report it absent (so peft's ``is_bnb_available()`` is False and peft skips its
4-bit helpers) and makes ``import bitsandbytes`` raise ImportError, which peft's own ``try`` expects.
"""
from __future__ import annotations

import sys
from typing import Any

NAME = "bitsandbytes"


def needs_bitsandbytes(command: str, cfg: Any) -> bool:
    """Whether ``xpsr COMMAND`` with ``cfg`` uses bitsandbytes (only training with 8-bit AdamW does)."""
    return command == "train" and bool(getattr(cfg, "use_8bit_adam", False))


def hide_bitsandbytes() -> bool:
    """Make bitsandbytes look not installed for the rest of this process; False if it is already imported."""
    if sys.modules.get(NAME) is not None:
        return False
    sys.modules[NAME] = None  # type: ignore[assignment]  (the documented way to block an import)
    return True


def show_bitsandbytes() -> None:
    """Undo :func:`hide_bitsandbytes` (the CLI's ``main`` called in-process, e.g. by tests, leaves no trace)."""
    if NAME in sys.modules and sys.modules[NAME] is None:
        del sys.modules[NAME]
