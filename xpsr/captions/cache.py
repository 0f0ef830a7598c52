"""The prompt cache: one SQLite file of captions, safe for several writer processes of one machine (WAL);
processes on several machines write per-rank shards instead (:mod:`xpsr.captions.shards`).

Key: (image content hash, kind, captioner id, question) -> text, plus model revision, which image was
captioned (LR or HR), its path, and when. Every batch is written in one transaction: a kill at any
moment loses at most the batch in flight and never corrupts the file (SQLite's journal guarantees it).
A file damaged otherwise (bytes flipped, truncated, not SQLite at all) is refused with a :class:`CacheError`
naming it; :mod:`xpsr.captions.repair` salvages its readable rows.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xpsr.errors import DiskFullError, XPSRError, is_disk_full, shown

KINDS = ("content", "quality")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    image_hash TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('content', 'quality')),
    captioner TEXT NOT NULL,
    question TEXT NOT NULL,
    text TEXT NOT NULL,
    model_revision TEXT,
    image_source TEXT,
    image_path TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (image_hash, kind, captioner, question)
);
"""


class CacheError(XPSRError):
    """The prompt cache file cannot be used (damaged, not a SQLite file, unreadable); the message names it."""


@contextlib.contextmanager
def cache_errors(path: Path, timeout_s: float | None = None):
    """SQLite errors of the cache at ``path`` as one-line errors naming the file (and the repair command)."""
    try:
        yield
    except sqlite3.Error as e:
        where = shown(path)
        if is_disk_full(e):
            raise DiskFullError(f"disk full: cannot write the prompt cache {where} ({e}); free space and rerun, "
                                "rows already written are kept") from e
        if "locked" in str(e) or "busy" in str(e):
            raise CacheError(f"prompt cache {where} stayed locked by another process for more than {timeout_s} s "
                             f"({e})") from e
        if "unable to open" in str(e):
            raise CacheError(f"cannot open the prompt cache {where} ({e}): is it a directory, or in a folder "
                             "you cannot write?") from e
        raise CacheError(f"prompt cache {where} is damaged or not a prompt cache ({e}). Salvage its readable rows "
                         f"with `xpsr caption-repair cache={where} output=NEW.sqlite`") from e


@dataclass
class PromptRow:
    image_hash: str
    kind: str
    captioner: str
    question: str
    text: str
    model_revision: str | None = None
    image_source: str | None = None
    image_path: str | None = None
    created: float = field(default_factory=time.time)


class PromptCache:
    """Open (or create) the cache at ``path``. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0, check: bool = True, journal: str | None = None):
        """``check`` runs SQLite's ``quick_check`` (structure of every page, linear in the file size: ~0.1 s per
        100k rows) so a damaged file is reported now, naming it, rather than at some later query.

        ``journal``: None keeps the journal mode a cache already has and makes a new one WAL (many writer
        processes of one machine); ``"delete"`` switches to SQLite's rollback journal, which `caption-merge` gives
        the caches it writes and the per-rank shards use: a WAL file needs shared memory, so WAL caches cannot
        be read from several machines, and readers never switch a cache's mode themselves."""
        self.path, self.timeout_s = Path(path), timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = None
        with self._errors():
            self.db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
            try:
                if journal == "delete":
                    self.db.execute("PRAGMA journal_mode=DELETE")  # stays WAL if another process has it open
                elif self.db.execute("PRAGMA page_count").fetchone()[0] == 0:
                    self._switch_to_wal(timeout_s)
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
                if check:
                    problems = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
                    if problems != ["ok"]:
                        raise sqlite3.DatabaseError("; ".join(problems))
                self.db.executescript(_SCHEMA)
                self._check_columns()
            except BaseException:
                self.db.close()
                raise

    def _errors(self):
        return cache_errors(self.path, self.timeout_s)

    def _check_columns(self) -> None:
        """Another program's SQLite file at the path (a table ``prompts`` with other columns) is refused."""
        columns = [r[1] for r in self.db.execute("PRAGMA table_info(prompts)")]
        if columns != [f.name for f in PromptRow.__dataclass_fields__.values()]:
            raise sqlite3.DatabaseError(f"its table 'prompts' has columns {columns}, not a prompt cache's")

    def _switch_to_wal(self, timeout_s: float) -> None:
        """Several processes may create the cache at once; SQLite answers the journal-mode switch with
        'database is locked' without waiting on the busy handler, so retry until ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> PromptCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def put_many(self, rows: Iterable[PromptRow]) -> int:
        """Insert rows in one transaction; an existing key keeps its first text. Returns rows inserted."""
        rows = list(rows)
        for r in rows:
            if r.kind not in KINDS:
                raise ValueError(f"prompt kind must be one of {KINDS}, got {r.kind!r}")
        values = [(r.image_hash, r.kind, r.captioner, r.question, r.text, r.model_revision, r.image_source,
                   r.image_path, r.created) for r in rows]
        with self._errors():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                before = self.db.total_changes
                self.db.executemany("INSERT OR IGNORE INTO prompts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    self.db.execute("ROLLBACK")
                raise
            return self.db.total_changes - before

    def merge_many(self, rows: Iterable[PromptRow]) -> tuple[int, int]:
        """Insert rows in one transaction; for an existing key the newer row (larger ``created``) wins.
        Returns (rows inserted, rows replaced by a newer one)."""
        values = [(r.image_hash, r.kind, r.captioner, r.question, r.text, r.model_revision, r.image_source,
                   r.image_path, r.created) for r in rows if r.kind in KINDS]
        with self._errors():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                before_rows, before_changes = self.count(), self.db.total_changes
                self.db.executemany(
                    "INSERT INTO prompts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (image_hash, kind, captioner, question) DO UPDATE SET text=excluded.text, "
                    "model_revision=excluded.model_revision, image_source=excluded.image_source, "
                    "image_path=excluded.image_path, created=excluded.created WHERE excluded.created > created",
                    values)
                inserted = self.count() - before_rows
                replaced = self.db.total_changes - before_changes - inserted
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        return inserted, replaced

    def done_hashes(self, kind: str, captioner: str, question: str) -> set[str]:
        with self._errors():
            cur = self.db.execute("SELECT image_hash FROM prompts WHERE kind=? AND captioner=? AND question=?",
                                  (kind, captioner, question))
            return {row[0] for row in cur}

    def lookup(self, image_hash: str, kind: str, captioner: str | None = None) -> str | None:
        """The text for an image and kind; with several captioners, ``captioner`` picks one (else the newest)."""
        sql = "SELECT text FROM prompts WHERE image_hash=? AND kind=?"
        args: list = [image_hash, kind]
        if captioner is not None:
            sql += " AND captioner=?"
            args.append(captioner)
        with self._errors():
            row = self.db.execute(sql + " ORDER BY created DESC LIMIT 1", args).fetchone()
        return row[0] if row else None

    def rows(self) -> Iterator[PromptRow]:
        with self._errors():
            cur = self.db.execute("SELECT image_hash, kind, captioner, question, text, model_revision, "
                                  "image_source, image_path, created FROM prompts ORDER BY image_hash, kind, captioner")
            for r in cur:
                yield PromptRow(*r)

    def count(self, kind: str | None = None) -> int:
        with self._errors():
            if kind is None:
                return self.db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]
            return self.db.execute("SELECT COUNT(*) FROM prompts WHERE kind=?", (kind,)).fetchone()[0]

    def integrity_ok(self) -> bool:
        with self._errors():
            return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # ------------------------------------------------------------ interchange
    def export_jsonl(self, path: str | Path) -> int:
        """All rows as JSON lines; written to a temp file renamed over ``path`` at the end, so a failure
        (damaged cache, full disk) leaves a previous export untouched."""
        return write_jsonl_atomic(self.rows(), path)

    def import_jsonl(self, path: str | Path) -> int:
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(PromptRow(**json.loads(line)))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{i}: not a prompt row ({e})") from e
        return self.put_many(rows)

    def import_official(self, lr_dir: str | Path, content_dir: str | Path | None = None,
                        quality_dir: str | Path | None = None, captioner: str = "official") -> int:
        """Import the official layout: ``highlevel_prompt/NAME.txt`` and ``lowlevel_prompt_q/NAME.txt``
        beside ``LR/NAME.png``; rows are keyed by the LR image's content hash."""
        from xpsr.data.images import file_hash, list_images

        lr_dir = Path(lr_dir)
        content_dir = Path(content_dir) if content_dir else lr_dir.parent / "highlevel_prompt"
        quality_dir = Path(quality_dir) if quality_dir else lr_dir.parent / "lowlevel_prompt_q"
        rows = []
        for img in list_images([lr_dir]):
            h = file_hash(img)
            for kind, folder in (("content", content_dir), ("quality", quality_dir)):
                txt = folder / f"{img.stem}.txt"
                if txt.is_file():
                    rows.append(PromptRow(h, kind, captioner, f"official:{folder.name}",
                                          txt.read_text(encoding="utf-8").strip(), image_source="lr",
                                          image_path=shown(img)))
        return self.put_many(rows)


def write_jsonl_atomic(rows: Iterable[PromptRow], path: str | Path) -> int:
    """Write ``rows`` as JSON lines to ``path`` through a temp file in the same folder (renamed at the end);
    on any error the temp file is removed and ``path`` keeps its previous content. Returns rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".tmp-{path.name}-*"):  # left by a killed export to the same file
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFullError(f"disk full: cannot write {shown(path)} ({e}); the previous file is unchanged") from e
        raise
    return n
