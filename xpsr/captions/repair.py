"""Salvage the readable rows of a damaged prompt cache into a new cache or a JSONL file (`xpsr caption-repair`).

The damaged file is never modified: it is copied (with its WAL, so committed rows not yet checkpointed count)
into a temporary folder and read there. A full scan is tried first; if SQLite stops on a damaged page, every
rowid up to the largest one is looked up on its own, so one bad page costs only the rows stored on it, and the
file's table-leaf pages are also decoded directly (`xpsr.captions.pages`): that finds the rows of a truncated
file, whose surviving pages SQLite can no longer reach. Rows found twice are kept once (the newest `created`).
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from xpsr.captions.cache import KINDS, CacheError, PromptCache, PromptRow, write_jsonl_atomic
from xpsr.errors import shown

_COLUMNS = "image_hash, kind, captioner, question, text, model_revision, image_source, image_path, created"
_WIDTH = len(_COLUMNS.split(","))  # values in one prompt row


@dataclass
class Salvage:
    rows: list[PromptRow] = field(default_factory=list)
    unreadable: int = 0          # rowids that raised (damaged page, text that is not UTF-8, ...)
    invalid: int = 0             # rows read but not a valid prompt row (damaged values)
    full_scan: bool = True       # False: the table could not be scanned in one go
    notes: list[str] = field(default_factory=list)


def _row(values: tuple) -> PromptRow | None:
    row = PromptRow(*values)
    ok = (row.kind in KINDS and all(isinstance(v, str) for v in (row.image_hash, row.captioner, row.question,
                                                                  row.text))
          and isinstance(row.created, (int, float)))
    return row if ok else None


def _largest_rowid(db: sqlite3.Connection, path: Path) -> int:
    try:
        top = db.execute("SELECT max(rowid) FROM prompts").fetchone()[0]
        return int(top or 0)
    except sqlite3.Error:
        # every row takes at least ~20 bytes of the file, so there cannot be more rowids than this
        return max(path.stat().st_size // 20, 1)


def salvage_rows(cache: str | Path) -> Salvage:
    """Every row of ``cache`` that SQLite can still read."""
    cache = Path(cache)
    result = Salvage()
    with tempfile.TemporaryDirectory(prefix="xpsr-repair-") as tmp:
        copy = Path(tmp) / "cache.sqlite"
        shutil.copyfile(cache, copy)
        if Path(f"{cache}-wal").is_file():
            shutil.copyfile(f"{cache}-wal", f"{copy}-wal")
        db = sqlite3.connect(str(copy), isolation_level=None)
        try:
            _scan(db, copy, result)
        finally:
            db.close()
    return result


def _scan(db: sqlite3.Connection, copy: Path, result: Salvage) -> None:
    try:
        rows = [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM prompts ORDER BY rowid")]
    except sqlite3.Error as e:
        if "no such table" in str(e) or "not a database" in str(e) or "malformed database schema" in str(e):
            result.notes.append(f"no prompt table can be read ({e})")
            return
        result.full_scan = False
        result.notes.append(f"the full scan stopped ({e}); rows were then read one by one")
        rows = []
        for rowid in range(1, _largest_rowid(db, copy) + 1):
            try:
                found = db.execute(f"SELECT {_COLUMNS} FROM prompts WHERE rowid=?", (rowid,)).fetchone()
            except sqlite3.Error:
                result.unreadable += 1
                continue
            if found is not None:
                rows.append(_row(found))
        rows += _from_pages(copy, result)
    result.invalid = sum(r is None for r in rows)
    newest: dict[tuple, PromptRow] = {}
    for r in rows:
        if r is not None:
            key = (r.image_hash, r.kind, r.captioner, r.question)
            if key not in newest or r.created > newest[key].created:
                newest[key] = r
    result.rows = list(newest.values())


def _from_pages(copy: Path, result: Salvage) -> list[PromptRow | None]:
    """The prompt rows on the file's table-leaf pages (rows of other shapes are not prompt rows: left out)."""
    from xpsr.captions.pages import leaf_records

    try:
        records = list(leaf_records(copy))
    except ValueError as e:
        result.notes.append(f"the pages could not be read ({e})")
        return []
    result.unreadable += sum(values is None for _, values in records)
    found = [_row(values) for _, values in records if values is not None and len(values) == _WIDTH]
    result.notes.append(f"{sum(r is not None for r in found)} prompt rows decoded from the file's pages")
    return found


def repair_cache(cache: str | Path, output: str | Path) -> Salvage:
    """Salvage ``cache`` into ``output``: a new prompt cache (``.sqlite``/``.db``) or JSON lines (``.jsonl``).

    The output is written under a temporary name and renamed at the end; an existing output is never merged
    into, and ``output`` may not be the damaged file itself."""
    cache, output = Path(cache), Path(output)
    if not cache.is_file():
        raise FileNotFoundError(f"prompt cache {shown(cache)} does not exist")
    if output.exists():
        raise ValueError(f"output={shown(output)} exists; give a new file (the damaged cache is kept unchanged, "
                         "and an existing file is never overwritten by a salvage)")
    result = salvage_rows(cache)
    if not result.rows and result.notes:
        raise CacheError(f"nothing could be salvaged from {shown(cache)}: {result.notes[-1]}")
    if output.suffix == ".jsonl":
        write_jsonl_atomic(result.rows, output)
        return result
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".tmp-{output.name}-*"):  # left by a killed repair to the same file
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".tmp-{output.name}-"))
    try:
        with PromptCache(tmp / "cache.sqlite") as fresh:
            for i in range(0, len(result.rows), 10_000):
                fresh.put_many(result.rows[i:i + 10_000])
            fresh.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            fresh.db.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to rename
        os.replace(tmp / "cache.sqlite", output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
