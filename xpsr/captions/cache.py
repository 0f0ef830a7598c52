"""The prompt cache: one SQLite file (WAL) of captions, safe for several writer processes.

Key: (image content hash, kind, captioner id, question) -> text, plus model revision, which image was
captioned (LR or HR), its path, and when. Every batch is written in one transaction: a kill at any
moment loses at most the batch in flight and never corrupts the file (SQLite's journal guarantees it).
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        self._switch_to_wal(timeout_s)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        self.db.executescript(_SCHEMA)

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
        self.db.close()

    def put_many(self, rows: Iterable[PromptRow]) -> int:
        """Insert rows in one transaction; an existing key keeps its first text. Returns rows inserted."""
        rows = list(rows)
        for r in rows:
            if r.kind not in KINDS:
                raise ValueError(f"prompt kind must be one of {KINDS}, got {r.kind!r}")
        values = [(r.image_hash, r.kind, r.captioner, r.question, r.text, r.model_revision, r.image_source,
                   r.image_path, r.created) for r in rows]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.db.total_changes
            self.db.executemany("INSERT OR IGNORE INTO prompts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.db.total_changes - before

    def done_hashes(self, kind: str, captioner: str, question: str) -> set[str]:
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
        row = self.db.execute(sql + " ORDER BY created DESC LIMIT 1", args).fetchone()
        return row[0] if row else None

    def rows(self) -> Iterator[PromptRow]:
        cur = self.db.execute("SELECT image_hash, kind, captioner, question, text, model_revision, image_source, "
                              "image_path, created FROM prompts ORDER BY image_hash, kind, captioner")
        for r in cur:
            yield PromptRow(*r)

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return self.db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM prompts WHERE kind=?", (kind,)).fetchone()[0]

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # ------------------------------------------------------------ interchange
    def export_jsonl(self, path: str | Path) -> int:
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            for row in self.rows():
                f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
                n += 1
        return n

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
                                          image_path=str(img)))
        return self.put_many(rows)
