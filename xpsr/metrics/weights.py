"""Offline-first metric weights: every download pyiqa/torchvision would make is redirected to a local
folder; a missing file raises :class:`MissingMetricWeights` naming the metric, the file and the folder.
Weights are never silently replaced by random ones, and files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from xpsr.errors import XPSRError, shown

ENV_VAR = "XPSR_METRIC_WEIGHTS"


class MissingMetricWeights(FileNotFoundError):
    def __init__(self, metric: str, filename: str, folder: Path, url: str | None = None):
        self.metric, self.filename, self.folder = metric, filename, folder
        where = f" (published at {url})" if url else ""
        self.message = (f"metric '{metric}' needs the weights file {filename}{where}; put it in {folder} "
                        f"(weights_dir=DIR or ${ENV_VAR}). Nothing is downloaded and no random weights are used.")
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class DamagedMetricWeights(XPSRError):
    """A metric weights file is there but empty, unreadable, or not the published file (hash mismatch)."""


# torchvision publishes its ImageNet weights at download.pytorch.org with the first hex digits of the file's
# SHA-256 in the name (alexnet-owt-7be5be79.pth), the convention torch.hub's check_hash relies on
HASHED_HOSTS = ("download.pytorch.org",)
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_checked: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, so a file is hashed once


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _checked[key] = digest.hexdigest()
    return _checked[key]


def check_weights_file(metric: str, path: Path, url: str | None = None) -> None:
    """Refuse an empty file, and a file whose published SHA-256 prefix (in a torchvision file name) differs."""
    where = f"; replace it with the published file ({url})" if url else "; replace it with the published file"
    if path.stat().st_size == 0:
        raise DamagedMetricWeights(f"metric '{metric}': the weights file {shown(path)} is empty (0 bytes){where}")
    expected = _NAME_HASH.search(path.name)
    if url and expected and urlparse(url).hostname in HASHED_HOSTS:
        actual = _sha256(path)
        if not actual.startswith(expected.group(1)):
            raise DamagedMetricWeights(f"metric '{metric}': {shown(path)} is not the published file (its sha256 "
                                       f"starts {actual[:len(expected.group(1))]}, its name says "
                                       f"{expected.group(1)}: damaged or another file){where}")


def unreadable(metric: str, path: Any, error: BaseException) -> DamagedMetricWeights:
    """The one-line error for a weights file torch.load cannot read (random bytes, cut short, not a checkpoint);
    torch's own text would suggest weights_only=False, which is never the fix for a damaged file."""
    reason = "it ends early (cut short?)" if isinstance(error, EOFError) else f"{type(error).__name__}"
    return DamagedMetricWeights(f"metric '{metric}': the weights file {shown(path)} cannot be read as PyTorch "
                                f"weights ({reason}); it is damaged or not a weights file: replace it with the "
                                "published file")


def weights_dir(configured: str | None) -> Path:
    path = configured or os.environ.get(ENV_VAR) or str(Path(torch.hub.get_dir()) / "xpsr_metric_weights")
    return Path(path).expanduser()


def _find(folder: Path, filename: str) -> Path | None:
    for candidate in (folder / filename, folder / "checkpoints" / filename, folder / "pyiqa" / filename):
        if candidate.is_file():
            return candidate
    return None


@contextlib.contextmanager
def offline_weights(metric: str, folder: Path):
    """Within this block pyiqa/torchvision read weights from ``folder`` only, with weights_only loading."""
    def local_file(url: str, model_dir=None, progress=True, file_name=None, *args, **kwargs) -> str:
        name = file_name or os.path.basename(urlparse(url).path)
        found = _find(folder, name)
        if found is None:
            raise MissingMetricWeights(metric, name, folder, url)
        check_weights_file(metric, found, url)
        return str(found)

    real_load = torch.load

    def safe_load(f, *args, **kwargs):
        kwargs["weights_only"] = True  # never unpickle arbitrary objects from a weights file
        try:
            return real_load(f, *args, **kwargs)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
            raise unreadable(metric, f if isinstance(f, (str, os.PathLike)) else "(an open file)", e) from None

    def local_state_dict(url: str, model_dir=None, map_location=None, progress=True, check_hash=False,
                         file_name=None, weights_only=True):
        return safe_load(local_file(url, file_name=file_name), map_location=map_location or "cpu")

    def local_clip(url: str, root: str | None = None) -> str:
        """pyiqa's CLIP loader downloads OpenAI's archives itself; take them from ``folder``, checksum checked."""
        path = local_file(url)
        expected = url.rstrip("/").split("/")[-2]
        actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if len(expected) == 64 and actual != expected:
            raise ValueError(f"metric '{metric}': {path} is not the published file (sha256 {actual[:12]}..., "
                             f"expected {expected[:12]}...; {url})")
        return path

    if metric.startswith("clipiqa"):
        import pyiqa.archs.clip_model  # noqa: F401  (imported lazily by pyiqa; patched below)
    patches = [(torch.hub, "load_state_dict_from_url", local_state_dict), (torch, "load", safe_load)]
    if metric.startswith("maniqa"):
        # MANIQA's checkpoint holds the whole network, ViT backbone included, and pyiqa loads it strictly, so
        # timm's separate ImageNet download of the backbone is skipped (a missing key would still fail loudly).
        import timm

        real_create = timm.create_model

        def create_without_download(*args, **kwargs):
            kwargs["pretrained"] = False
            return real_create(*args, **kwargs)

        patches.append((timm, "create_model", create_without_download))
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("pyiqa", "torchvision.models")):
            continue
        if hasattr(module, "load_file_from_url"):
            patches.append((module, "load_file_from_url", local_file))
        if hasattr(module, "load_state_dict_from_url"):
            patches.append((module, "load_state_dict_from_url", local_state_dict))
        if name.endswith("clip_model") and hasattr(module, "_download"):
            patches.append((module, "_download", local_clip))
    saved = [(m, a, getattr(m, a)) for m, a, _ in patches]
    try:
        for m, a, f in patches:
            setattr(m, a, f)
        yield
    finally:
        for m, a, f in saved:
            setattr(m, a, f)
