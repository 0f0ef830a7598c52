"""What a stage left in its output folder, reduced to what must not change between runs.

After a kill and a rerun to completion, a stage's folder must hold the same outputs as an uninterrupted
run. "The same" is byte for byte, except where a file legitimately carries something of the session:

- SQLite files are compared by their logical rows (page layout differs between runs that wrote the
  same rows in other transactions) and must pass ``PRAGMA integrity_check``;
- JSON / JSON-lines files are compared as parsed values, without the fields a stage declares volatile
  (wall-clock times, per-session counters such as "made this session");
- every other file by its bytes.

A row that appears twice (by the key fields a stage declares) is a duplicate; a file named like a
temporary (``.tmp-*``, ``*.tmp``, ``*.partial``, a SQLite rollback ``-journal``) is a leftover.
SQLite's own ``-wal``/``-shm`` files are part of their database and are read with it, never alone.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
SQLITE_SIDE_FILES = ("-wal", "-shm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def is_temp(name: str) -> bool:
    """Whether a file or folder name is one of the temporary names our writers use before a rename."""
    return (name.startswith(".tmp") or ".tmp-" in name or name.endswith((".tmp", ".partial", "-journal")))


@dataclass
class Rules:
    """How a stage's outputs are compared. Patterns are globs relative to the output folder."""

    volatile: dict[str, tuple[str, ...]] = field(default_factory=dict)  # file -> dotted keys / columns ignored
    unique: dict[str, tuple[str, ...]] = field(default_factory=dict)  # jsonl/sqlite file -> fields of a row's key

    def lookup(self, table: dict[str, tuple[str, ...]], rel: str) -> tuple[str, ...]:
        return next((v for pattern, v in table.items() if fnmatch.fnmatch(rel, pattern)), ())


@dataclass
class Snapshot:
    """Digest of every output file (by relative path), leftovers, and problems found while reading."""

    files: dict[str, object]
    temp: list[str]
    problems: list[str]
    units: dict[str, int]  # how much of each file exists: rows of a table or lines of a jsonl, 1 for a file


def walk(root: Path) -> tuple[list[str], list[str]]:
    """(output files, temporary leftovers) under ``root`` as sorted relative paths.

    A temporary folder is listed once, not with its content; SQLite side files are left out."""
    files, temp = [], []
    for folder, dirs, names in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        for d in list(dirs):
            if is_temp(d):
                temp.append((rel_folder / d).as_posix())
                dirs.remove(d)
        for name in names:
            rel = (rel_folder / name).as_posix()
            if is_temp(name):
                temp.append(rel)
            elif not name.endswith(SQLITE_SIDE_FILES):
                files.append(rel)
    return sorted(files), sorted(temp)


def _drop(value: object, dotted: str) -> None:
    """Remove ``a.b.c`` from nested dicts in place (missing keys are fine)."""
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(value, dict):
            return
        value = value.get(key)
    if isinstance(value, dict):
        value.pop(last, None)


def _sha(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _duplicates(rows: list[dict], key: tuple[str, ...], rel: str) -> list[str]:
    if not key:
        return []
    seen: dict[tuple, int] = {}
    for row in rows:
        k = tuple(row.get(f) for f in key)
        seen[k] = seen.get(k, 0) + 1
    dup = {k: n for k, n in seen.items() if n > 1}
    if not dup:
        return []
    example = ", ".join(f"{f}={v!r}" for f, v in zip(key, next(iter(dup))))
    return [f"{rel}: {sum(dup.values()) - len(dup)} duplicate rows ({len(dup)} keys repeated, e.g. {example})"]


def read_jsonl(path: Path, rel: str, rules: Rules, torn_tail_ok: bool) -> tuple[object, int, list[str]]:
    """Digest, row count, problems of a JSON-lines file (a torn last line is fine right after a kill:
    the stage's reader repairs it on the next run)."""
    raw = path.read_bytes().split(b"\n")
    tail = raw.pop()  # b"" when the file ends with a newline
    rows, problems = [], []
    for i, line in enumerate(raw, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            problems.append(f"{rel}: line {i} is not JSON ({line[:60]!r})")
    if tail and not torn_tail_ok:
        problems.append(f"{rel}: last line is cut off ({tail[:60]!r})")
    for row in rows:
        for key in rules.lookup(rules.volatile, rel):
            _drop(row, key)
    problems += _duplicates(rows, rules.lookup(rules.unique, rel), rel)
    return {"rows": [_sha(r) for r in rows]}, len(rows), problems


def read_sqlite(path: Path, rel: str, rules: Rules) -> tuple[object, int, list[str]]:
    """Digest (rows per table), row count and problems of a SQLite file, read from a copy (with its
    ``-wal``) so that inspecting a crashed run's file changes nothing the rerun will see."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copy2(path, copy)
        for side in SQLITE_SIDE_FILES:
            if Path(f"{path}{side}").is_file():
                shutil.copy2(f"{path}{side}", f"{copy}{side}")
        db = sqlite3.connect(str(copy))
        try:
            problems = []
            check = [r[0] for r in db.execute("PRAGMA integrity_check")]
            if check != ["ok"]:
                problems.append(f"{rel}: PRAGMA integrity_check says {check[:3]}")
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
            digest, total = {}, 0
            volatile = set(rules.lookup(rules.volatile, rel))
            for table in tables:
                cur = db.execute(f'SELECT * FROM "{table}"')
                names = [d[0] for d in cur.description]
                rows = [{k: v for k, v in zip(names, r) if k not in volatile} for r in cur]
                rows.sort(key=lambda r: json.dumps(r, sort_keys=True, default=str))
                problems += _duplicates(rows, rules.lookup(rules.unique, rel), f"{rel}:{table}")
                digest[table] = {"rows": sorted(_sha(r) for r in rows)}
                total += len(rows)
            return digest, total, problems
        except sqlite3.DatabaseError as e:
            return {"error": str(e)}, 0, [f"{rel}: not a readable SQLite database ({e})"]
        finally:
            db.close()


def read_image(path: Path, rel: str) -> list[str]:
    """A file under an image's final name must decode completely (no half-written images)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # any decoder error means the file is damaged; the message names it
        return [f"{rel}: image does not decode ({type(e).__name__}: {e})"]
    return []


def snapshot(root: Path, rules: Rules, after_kill: bool = False) -> Snapshot:
    """Digest every output under ``root``. ``after_kill``: the state a SIGKILL left (torn jsonl tails
    allowed, images decoded); otherwise the final state after a clean run."""
    files, temp = walk(root)
    digests: dict[str, object] = {}
    units: dict[str, int] = {}
    problems: list[str] = []
    for rel in files:
        path = root / rel
        if rel.endswith(SQLITE_SUFFIXES):
            digests[rel], units[rel], found = read_sqlite(path, rel, rules)
        elif rel.endswith(".jsonl"):
            digests[rel], units[rel], found = read_jsonl(path, rel, rules, torn_tail_ok=after_kill)
        elif rel.endswith(".json"):
            digests[rel], units[rel], found = _read_json(path, rel, rules)
        else:
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            units[rel] = 1
            found = read_image(path, rel) if after_kill and rel.lower().endswith(IMAGE_SUFFIXES) else []
        problems += found
    return Snapshot(digests, temp, problems, units)


def _read_json(path: Path, rel: str, rules: Rules) -> tuple[object, int, list[str]]:
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        return {"error": "not JSON"}, 0, [f"{rel}: not valid JSON, half-written? ({e})"]
    for key in rules.lookup(rules.volatile, rel):
        _drop(value, key)
    return {"json": value}, 1, []


def compare(reference: Snapshot, final: Snapshot) -> list[str]:
    """Every way ``final`` differs from the uninterrupted ``reference`` (empty: the guarantee holds)."""
    problems = list(final.problems)
    if final.temp:
        problems.append(f"temporary files left: {final.temp[:5]}" + (" ..." if len(final.temp) > 5 else ""))
    missing = sorted(set(reference.files) - set(final.files))
    extra = sorted(set(final.files) - set(reference.files))
    if missing:
        problems.append(f"{len(missing)} files missing (data lost): {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} files the uninterrupted run does not have: {extra[:5]}")
    for rel in sorted(set(reference.files) & set(final.files)):
        a, b = reference.files[rel], final.files[rel]
        if a != b:
            problems.append(f"{rel}: differs from the uninterrupted run ({difference(a, b)})")
    return problems


def difference(a: object, b: object, path: str = "") -> str:
    """Where two digests differ, in a few words: the first JSON key, or rows missing/extra/changed."""
    if isinstance(a, dict) and isinstance(b, dict):
        if "rows" in a and "rows" in b:
            ra, rb = a["rows"], b["rows"]
            lost, extra = len(set(ra) - set(rb)), len(set(rb) - set(ra))
            where = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
            where_file = path.rstrip(".") + ": " if path else ""
            return (f"{where_file}{len(ra)} rows in the reference, {len(rb)} here: {lost} missing or changed, "
                    f"{extra} new or changed, first difference at row {where + 1}")
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                if key not in a or key not in b:
                    return f"{path}{key}: only in {'the reference' if key in a else 'this run'}"
                return difference(a[key], b[key], f"{path}{key}." if key != "json" else path)
    if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
        return f"{path.rstrip('.')}: {len(a)} items in the reference, {len(b)} here"
    if isinstance(a, list) and isinstance(b, list):
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return difference(a[i], b[i], f"{path}{i}.")
    return f"{path.rstrip('.') or 'bytes'}: reference {str(a)[:60]!r}, here {str(b)[:60]!r}"


def progress(state: Snapshot, reference: Snapshot) -> tuple[int, int]:
    """(units done, units in the reference): rows for tables and jsonl files, 1 per other file."""
    total = sum(max(1, n) for n in reference.units.values())
    done = sum(min(state.units.get(rel, 0), max(1, n)) for rel, n in reference.units.items())
    return done, total
