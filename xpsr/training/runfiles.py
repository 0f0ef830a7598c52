"""What a run records about where it ran: environment.json (versions, git commit) and the flat tracker config."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def environment(repo: Path) -> dict:
    """Versions and the git commit, saved as environment.json in the run dir."""
    import accelerate
    import diffusers
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "git_commit": commit,
            "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
