"""Same seed, same bytes: seeding of every process-wide random generator, and the GPU `deterministic` switch.

Why the global generators are seeded although training draws its noise from its own generator: torch
2.14 starts every process with a *random* default seed (``torch.initial_seed()`` differs between two
``python -c`` runs), as Python's ``random`` and NumPy's legacy generator always did. Their states go into
checkpoints, so unseeded they made two runs of the same command write different checkpoints, and any
library code drawing from them (dropout, DataLoader worker seeds) would differ between processes.
"""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

CUBLAS_WORKSPACE = ":4096:8"  # one of the two settings cuBLAS documents as reproducible (:16:8 is the other)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python's ``random``, NumPy's legacy generator and torch's CPU and CUDA generators with
    ``seed + rank`` (a different stream per DDP process, the same on every run); returns that seed."""
    value = seed + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device's generator
    return value


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """While active and ``enabled``: deterministic torch algorithms (an op without one raises), cuDNN
    deterministic with autotuning off, and cuBLAS with a fixed workspace. Restores the torch settings on
    exit, so an in-process caller (tests, notebooks) is left as it was.

    ``CUBLAS_WORKSPACE_CONFIG`` is read when a process creates its first cuBLAS handle, i.e. on the first
    CUDA matmul. ``xpsr train`` calls this before any CUDA work, so setting the variable here is in time;
    if CUDA was already used in this process and the variable was not set from the start, we cannot know
    whether cuBLAS saw it, and we refuse rather than promise determinism we may not have.
    """
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    workspace = previous[-1]
    if workspace not in (None, ":4096:8", ":16:8"):
        raise ValueError(f"deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8, but the environment "
                         f"sets {workspace!r}")
    if workspace is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError("deterministic=true: CUDA was already used in this process before "
                           "CUBLAS_WORKSPACE_CONFIG was set; start the process with "
                           f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE}")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace or CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
        if workspace is None and not torch.cuda.is_initialized():
            # once CUDA ran, cuBLAS handles created under the setting live on: keep it, so the
            # process stays consistent (and a later deterministic session here is allowed)
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

