"""Checkpoint integrity: a checksum manifest written last, its verification, durable writes, a full disk.

A checkpoint folder holds ``checksums.json`` (size and sha256 of every file), written after the files
and flushed to disk before the folder gets its final name, so a folder named ``step-N`` was complete
when renamed; damage that happens later (a truncated copy, a disk error, an edited file) is caught by
:func:`verify_checkpoint` before anything is loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

from xpsr.errors import DiskFullError, XPSRError, is_disk_full  # noqa: F401 (re-exported)

MANIFEST = "checksums.json"
MANIFEST_FORMAT = "xpsr-checkpoint-v1"
REQUIRED = ("trained.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "state.json")
STEP_NAME = re.compile(r"step-(\d+)")
_CHUNK = 8 << 20


class DamagedCheckpointError(XPSRError):
    """A checkpoint folder is incomplete or damaged; the message names the file and what is wrong."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, ignored or could not be fully verified."""


@contextlib.contextmanager
def disk_full_is_an_error(what: str):
    """Turn a full disk inside the block into :class:`DiskFullError` naming ``what``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(f"disk full while writing {what}: free some space, then rerun (with resume=latest "
                                f"to continue from the last checkpoint)") from e
        raise


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``.tmp-<name>`` beside ``path``, flush it to disk and rename it over ``path``: a
    kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # half a file helps nobody; the error being raised says why
        raise


def _hash_and_sync(path: Path, with_hash: bool) -> str | None:
    """sha256 of a file (None without ``with_hash``), and its data flushed to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if with_hash:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest() if with_hash else None


def write_manifest(folder: Path, with_hashes: bool = True) -> dict:
    """Flush every file of ``folder`` to disk and record its size (and sha256) in ``checksums.json``, last."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        files[path.name] = {"size": path.stat().st_size, "sha256": _hash_and_sync(path, with_hashes)}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    with open(folder / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)
    return manifest


def _damaged(path: Path, reason: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"{path}: {reason}")


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not all(
                isinstance(e["size"], int) and (e["sha256"] is None or isinstance(e["sha256"], str))
                for e in files.values()):
            raise ValueError(f"not an {MANIFEST_FORMAT} manifest")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise _damaged(path, f"unreadable checksum manifest ({e})") from e
    return files


def _check_listed_files(folder: Path, files: dict, hashes: bool) -> None:
    for name in REQUIRED:
        if name not in files:
            raise _damaged(folder / MANIFEST, f"does not list {name}")
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise _damaged(path, "missing (listed in checksums.json)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise _damaged(path, f"{size} bytes, checksums.json says {entry['size']} (truncated or replaced)")
        if hashes and entry["sha256"] is not None and _hash_and_sync(path, True) != entry["sha256"]:
            raise _damaged(path, "sha256 differs from checksums.json (the file was altered or the disk damaged it)")


def _check_structure(folder: Path) -> None:
    """Cheap checks that also catch damage in checkpoints without a manifest: every required file is
    there, safetensors headers cover their files, torch files are whole zip archives, state.json parses."""
    from safetensors import SafetensorError, safe_open

    for name in REQUIRED:
        if not (folder / name).is_file():
            raise _damaged(folder / name, "missing")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise _damaged(path, f"unreadable safetensors file ({e})") from e
    for path in sorted(folder.glob("*.pt")):
        if not zipfile.is_zipfile(path):
            raise _damaged(path, "not a complete torch archive (truncated?)")
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_text())
        step, samples = state["step"], state["samples"]
        if not (isinstance(step, int) and isinstance(samples, int)):
            raise ValueError("step and samples must be integers")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise _damaged(state_path, f"unreadable training state ({e})") from e
    named = STEP_NAME.fullmatch(folder.name)
    if named and int(named.group(1)) != step:
        raise _damaged(state_path, f"says step {step}, but the folder is named {folder.name}")


def verify_checkpoint(folder: Path, hashes: bool = True) -> list[str]:
    """Raise :class:`DamagedCheckpointError` naming the file unless ``folder`` is a complete checkpoint
    whose files match ``checksums.json`` (sizes always, sha256 with ``hashes``). Returns notes on what
    could not be checked (a checkpoint from before manifests, or one saved without hashes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _damaged(folder, "not a folder")
    files = _read_manifest(folder)
    notes = []
    if files is None:
        notes.append(f"{folder} has no {MANIFEST} (written by an older xpsr): its files were checked for "
                     f"completeness but cannot be checked against sizes and hashes")
    else:
        _check_listed_files(folder, files, hashes)
        if hashes and any(e["sha256"] is None for e in files.values()):
            notes.append(f"{folder} was saved with checkpoint_hashes=false: only file sizes were checked")
    _check_structure(folder)
    return notes
