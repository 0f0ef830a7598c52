"""The ``manifest.jsonl`` of a pair folder: durable appends, torn-line repair, the report, recipe versions.

Shared by `prepare` (:mod:`xpsr.data.pairs`), the paired-set import (:mod:`xpsr.data.paired_import`)
and the dataset, so none of them has to import another.

Recipe versions. Every line `prepare` writes names the recipe that made its LR image:

- ``usm-then-degrade/v2`` — the crop is USM-sharpened and the *sharpened* crop is degraded (official
  ``utils_data/make_train.py``, Real-ESRGAN's ``realesrgan_model.py``); the default.
- ``degrade-then-usm/v2`` — the plain crop is degraded, only the saved HR is sharpened (ablation key
  ``degradation.degrade_sharpened=false``).
- ``no-usm/v2`` — no sharpening at all (``degradation.usm_gt=false``).
- ``imported`` — an existing paired set brought in with ``paired_hr``/``paired_lr``.

Lines without the field that hold a ``degradation`` record were written by the first recipe (the plain
crop degraded; stage-1 resize by explicit size; OpenCV JPEG): :func:`record_recipe` calls them ``.../v1``.
Lines without either (hand-made manifests) have no known recipe.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import warnings
from pathlib import Path

from xpsr.errors import XPSRError

RECIPE_VERSION = 2


class NothingUsableError(XPSRError, RuntimeError):
    """Not one input produced a pair."""


class RecipeMismatchError(XPSRError):
    """A pair folder holds pairs of another recipe than the one asked for."""


def recipe_name(usm_gt: bool, degrade_sharpened: bool, version: int = RECIPE_VERSION) -> str:
    """The recipe string `prepare` writes for these settings."""
    if not usm_gt:
        order = "no-usm"
    else:
        order = "usm-then-degrade" if degrade_sharpened else "degrade-then-usm"
    return f"{order}/v{version}"


def record_recipe(record: dict) -> str | None:
    """The recipe of one manifest line; ``.../v1`` for lines of the first recipe, None when unknown."""
    if "recipe" in record:
        return record["recipe"]
    if "degradation" in record:  # written by `prepare` before recipes were recorded: the plain crop degraded
        return recipe_name(bool(record.get("usm", True)), degrade_sharpened=False, version=1)
    return None


def is_old_recipe(recipe: str | None) -> bool:
    """True for recipes of an earlier `prepare` version than this one."""
    if recipe is None or "/v" not in recipe:
        return False
    return int(recipe.rsplit("/v", 1)[1]) < RECIPE_VERSION


class ManifestError(XPSRError, ValueError):
    """Lines of a ``manifest.jsonl`` that cannot be used; the message names the file and each line."""


class ManifestBusyError(XPSRError):
    """Another process holds the manifest's write lock (two `prepare` runs into one folder)."""


class DiskFullError(XPSRError):
    """A write failed for lack of space; what was finished before stays valid."""


@contextlib.contextmanager
def reporting_disk_full(path: str | Path):
    """Turn an out-of-space error while writing ``path`` into a :class:`DiskFullError` that names it."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(f"disk full while writing {path} ({e.strerror}): the pairs finished before are "
                            "kept; free some space and rerun the same command to finish") from e


# Keys every line needs, and the types of the optional keys that some stage reads.
REQUIRED_KEYS = {"id": str, "hr": str, "lr": str, "scale": int}
OPTIONAL_KEYS = {"hr_hash": str, "lr_hash": str, "source_hash": str, "source": str, "recipe": str,
                 "settings_hash": str, "share_draws_every": int, "crop_box": list, "degradation": dict,
                 "notes": list, "usm": bool, "seed": int, "crop_index": int, "variant": int}
HASH_RE = re.compile(r"[0-9a-f]{16,64}")


def _type_problem(key: str, value, expected: type) -> str | None:
    # bool is an int to Python but not a scale or a count to us
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return None
    return f"{key} must be {expected.__name__}, got {type(value).__name__} {json.dumps(value)[:40]}"


def _schema_problem(record) -> str | None:
    """What is wrong with a parsed line's keys and types (paths are checked by :class:`_PathCheck`)."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for key, expected in (REQUIRED_KEYS | OPTIONAL_KEYS).items():
        problem = _type_problem(key, record[key], expected) if key in record else None
        if problem:
            return problem
    if not record["id"]:
        return "id is empty"
    if record["scale"] < 1:
        return f"scale must be >= 1, got {record['scale']}"
    for key in ("hr_hash", "lr_hash"):
        if key in record and not HASH_RE.fullmatch(record[key]):
            return f"{key} must be 16-64 lowercase hex digits (sha256), got {record[key][:70]!r}"
    return None


class _PathCheck:
    """Pair paths must name regular files inside the folder: relative, normalised, no symlink leading out."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)
        self.dirs: dict[str, str] = {}  # resolved parent folders (few distinct ones: hr/, lr/)

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def problem(self, key: str, rel: str) -> str | None:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or re.match(r"[A-Za-z]:", rel) or "\\" in rel or "\0" in rel:
            return f"{key} {rel!r} must be a relative path with / separators"
        if any(p in ("", ".", "..") for p in parts):
            return f"{key} {rel!r} is not a normalised path inside the folder (no '..', '.' or '//')"
        full = os.path.join(self.root, *parts)
        parent = os.path.dirname(full)
        if parent not in self.dirs:
            self.dirs[parent] = os.path.realpath(parent)
        if not self._inside(self.dirs[parent]):
            return f"{key} {rel!r} leads outside {self.root} through a symlinked folder"
        try:
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(full)
                if not self._inside(real):
                    return f"{key} {rel!r} is a symlink to {real}, outside {self.root}"
                st = os.stat(real)
        except FileNotFoundError:
            return f"{key} {rel!r} does not exist"
        except OSError as e:
            return f"{key} {rel!r} cannot be read ({e.strerror})"
        return None if stat.S_ISREG(st.st_mode) else f"{key} {rel!r} is not a regular file"


def _line_problem(line: bytes, paths: _PathCheck, seen: dict[str, int]) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at character {e.pos + 1})"
    except UnicodeDecodeError:
        return None, "not valid JSON (not UTF-8 text)"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    problem = _schema_problem(record)
    for key in ("hr", "lr"):
        problem = problem or paths.problem(key, record[key])
    if problem is None and record["id"] in seen:
        problem = f"duplicate id {record['id']!r} (first on line {seen[record['id']]})"
    return record, problem


def _bad_lines_message(path: Path, bad: list[tuple[int, str]], hint: str) -> str:
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:10])
    more = f"; ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    return f"{path}: {len(bad)} bad line(s) ({', '.join(str(n) for n, _ in bad[:50])}): {shown}{more}. {hint}"


FIX_HINT = ("Fix or delete those lines (rerunning `xpsr prepare` with the same settings remakes deleted pairs)")


def read_manifest_lines(path: str | Path, repair: bool = False, bad_lines: str = "error",
                        hint: str = FIX_HINT) -> list[tuple[int, dict]]:
    """``(line number, record)`` of every valid line of a manifest; nothing is read outside its folder.

    Each line must be a JSON object with the required keys and types, whose ``hr``/``lr`` are regular files
    inside the manifest's folder, and whose id is new. Bad lines raise :class:`ManifestError` naming each
    one (``bad_lines="skip"``: a warning naming them, and they are left out). Blank lines carry no pair and
    are passed over. The bytes after the last newline are a *torn* line when they are not valid JSON: the
    mark of a run killed mid-append. Only the writer (``repair=True``, `prepare` holding the lock) cuts
    them off — or adds the missing newline to a complete line; a reader never changes the file.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: b"" in a whole file
    paths, seen, good, bad = _PathCheck(path.parent), {}, [], []
    for number, line in enumerate(lines + ([tail] if tail.strip() else []), 1):
        if not line.strip():
            continue
        record, problem = _line_problem(line, paths, seen)
        if number > len(lines) and record is None and repair:
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
            warnings.warn(f"{path}: cut off torn line {number} ({len(tail)} bytes, no newline) left by an "
                          "interrupted run; its pair is made again", stacklevel=2)
            break
        if number > len(lines) and record is None:
            problem += " - a torn last line: an interrupted `xpsr prepare`? rerunning it repairs the file"
        if problem:
            bad.append((number, problem))
            continue
        if number > len(lines) and repair:  # complete record, only its newline missing
            with open(path, "ab") as f:
                f.write(b"\n")
        seen[record["id"]] = number
        good.append((number, record))
    if bad and bad_lines != "skip":
        raise ManifestError(_bad_lines_message(path, bad, hint))
    if bad:
        warnings.warn(_bad_lines_message(path, bad, "They are skipped (bad_manifest_lines=skip)."), stacklevel=2)
    return good


def read_manifest(path: str | Path, repair: bool = False, bad_lines: str = "error",
                  hint: str = FIX_HINT) -> list[dict]:
    """The records of a manifest (see :func:`read_manifest_lines`)."""
    return [record for _, record in read_manifest_lines(path, repair, bad_lines, hint)]


def check_resume_recipe(manifest: Path, records: list[dict], recipe: str, extra: dict | None = None) -> None:
    """Refuse to append pairs of ``recipe`` (and ``extra`` settings) to a manifest made otherwise.

    A resumed run must not turn a folder into a mix of two recipes that nobody can tell apart later.
    """
    for r in records:
        found = record_recipe(r)
        if found is not None and found != recipe:
            raise RecipeMismatchError(
                f"{manifest} holds pairs made with recipe {found!r} (e.g. {r.get('id')}) but this run makes "
                f"{recipe!r}; write to a new output_dir, or delete the folder to regenerate it"
            )
        for key, value in (extra or {}).items():
            if found is not None and r.get(key, value) != value:
                raise RecipeMismatchError(
                    f"{manifest} holds pairs made with {key}={r.get(key)!r} (e.g. {r.get('id')}) but this run "
                    f"has {key}={value!r}; resume with the settings of that run (see its report.json) or write "
                    "to a new output_dir"
                )


class ManifestWriter:
    """Appends records durably, one JSON line each (written, then fsynced), under an exclusive lock.

    The lock (``flock``, dropped by the kernel when the process dies, even by ``kill -9``) keeps two
    `prepare` runs from appending to one folder — that would duplicate lines. A failed write (disk full)
    is cut back to the previous end of the file, so the manifest never keeps half a line.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ManifestBusyError(f"{self.path} is being written by another process (another `xpsr prepare` "
                                    f"into {self.path.parent}?): wait for it to end") from None

    def write(self, record: dict) -> None:
        line = memoryview((json.dumps(record, sort_keys=True) + "\n").encode())
        end = os.fstat(self.fd).st_size
        with reporting_disk_full(self.path):
            try:
                while line:
                    line = line[os.write(self.fd, line):]
                os.fsync(self.fd)
            except OSError:
                # a cut that fails too leaves a torn line, which the next `prepare` cuts off (read_manifest_lines)
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, end)
                raise

    def close(self) -> None:
        os.close(self.fd)  # also drops the lock


TEMP_PATTERNS = {"hr": ".tmp-*", "lr": ".tmp-*", ".": ".report.json.tmp"}


def remove_temp_files(out: Path) -> int:
    """Delete the temp files that a killed run left in ``out`` (images half-written, an unfinished report).

    Call it only while holding the manifest's lock: temp files then belong to no live writer.
    """
    removed = 0
    for folder, pattern in TEMP_PATTERNS.items():
        for tmp in (out / folder).glob(pattern):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def is_temp_file(path: Path) -> bool:
    """Our own temp files, which are never inputs of a stage."""
    return path.name.startswith(".tmp-") or path.name == ".report.json.tmp"


def write_report(out: Path, entries: list[dict], stats: dict, config: dict) -> None:
    """``report.json``: stats, one entry per converted/skipped input, the resolved config (atomic write)."""
    report = {"stats": stats, "entries": entries, "config": config}
    tmp = out / ".report.json.tmp"
    with reporting_disk_full(out / "report.json"):
        try:
            tmp.write_text(json.dumps(report, indent=2))
            os.replace(tmp, out / "report.json")
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
