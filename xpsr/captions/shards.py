"""Per-rank cache shards and their merge (`xpsr caption-merge`): a prompt cache that ranks on several machines
fill over a network filesystem.

SQLite is safe with one writer per file, or with several writers of one machine (their locks meet in one
kernel); several machines writing one file over NFS depend on its lock daemon, which SQLite's documentation
warns against, and a WAL file cannot be shared between machines at all. So a captioning job on W > 1 ranks
never writes the cache itself: rank r writes only its own shard, ``CACHE.shards/KIND-rank-0000r-of-0000W.sqlite``
(rollback journal: a kill rolls back the batch in flight), and merges it into the cache when it finishes. A merge
runs under an exclusive lock file (made with ``link()``, atomic on NFS: one merger at a time whatever machine it
runs on), copies each shard aside and checks it, inserts its rows in one transaction (newest ``created`` wins
for a key already there), checks the cache, and only then deletes the shard. A kill at any moment leaves the
shard in place and the cache as before or after that transaction: the next merge does it again, and since rows
are keyed (image hash, kind, captioner, question) nothing is duplicated.

Rule: one captioning job per cache and kind at a time (shard names are per rank and kind, so two jobs of
the same kind would share shards), and `xpsr caption-merge` while no job writes into the cache.
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from xpsr.captions.cache import KINDS, CacheError, PromptCache, PromptRow
from xpsr.distributed.owners import create_exclusive, owner_alive, read_owner, this_owner
from xpsr.errors import shown

_SHARD = re.compile(r"^(content|quality)-rank-(\d{5})-of-(\d{5})\.sqlite$")
_COLUMNS = "image_hash, kind, captioner, question, text, model_revision, image_source, image_path, created"


def shard_dir(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".shards")


def shard_path(cache: str | Path, kind: str, rank: int, world: int) -> Path:
    return shard_dir(cache) / f"{kind}-rank-{rank:05d}-of-{world:05d}.sqlite"


def list_shards(cache: str | Path, kind: str | None = None) -> list[Path]:
    """The shards of ``cache`` (of one ``kind``, or all), in name order."""
    folder = shard_dir(cache)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (m := _SHARD.match(p.name)) and kind in (None, m.group(1)))


def shard_world(path: Path) -> int:
    """The number of ranks of the job that wrote the shard ``path``."""
    return int(_SHARD.match(path.name).group(3))


@dataclass
class MergeResult:
    shards: int = 0
    rows: int = 0             # rows read from the shards
    inserted: int = 0         # keys new to the cache
    replaced: int = 0         # keys the cache had, whose shard row was newer
    damaged: list[str] = field(default_factory=list)  # shards set aside as NAME.damaged (readable rows merged)


def read_shard(shard: Path) -> tuple[list[PromptRow], str | None]:
    """The rows of ``shard`` and None, or (salvaged rows, the problem) when it is damaged. The shard is read
    from a copy (with its journal, which SQLite then rolls back there), so the file itself is never written."""
    from xpsr.captions.repair import salvage_rows

    with tempfile.TemporaryDirectory(prefix="xpsr-merge-") as tmp:
        copy = Path(tmp) / "shard.sqlite"
        shutil.copyfile(shard, copy)
        for side in ("-journal", "-wal"):
            if Path(f"{shard}{side}").is_file():
                shutil.copyfile(f"{shard}{side}", f"{copy}{side}")
        db = sqlite3.connect(str(copy), isolation_level=None)
        try:
            problems = [r[0] for r in db.execute("PRAGMA integrity_check(5)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems))
            rows = [PromptRow(*r) for r in db.execute(f"SELECT {_COLUMNS} FROM prompts")]
            return rows, None
        except sqlite3.Error as e:
            problem = str(e)
        finally:
            db.close()
    return salvage_rows(shard).rows, problem


class MergeLock:
    """``CACHE.shards/.merge.lock``, held by one merger at a time on any machine. A lock left by a killed merger
    of this machine is taken over; one of another machine is waited for up to ``timeout_s``."""

    def __init__(self, cache: Path, timeout_s: float):
        self.path, self.timeout_s, self.fd = shard_dir(cache) / ".merge.lock", timeout_s, None

    def __enter__(self) -> MergeLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        while (fd := create_exclusive(self.path, this_owner())) is None:
            owner = read_owner(self.path)
            if owner_alive(owner) is False:
                self.path.unlink(missing_ok=True)  # a killed merger of this machine: nothing else can hold it
                continue
            if time.monotonic() > deadline:
                raise CacheError(f"another caption-merge holds {shown(self.path)} (process {owner}) for more than "
                                 f"{self.timeout_s:.0f} s; if no merge runs on any machine, delete that file")
            time.sleep(0.2)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def merge_shards(cache: str | Path, shards: list[Path] | None = None, kind: str | None = None,
                 timeout_s: float = 600.0) -> MergeResult:
    """Merge ``shards`` (default: every shard of ``cache``, or of one ``kind``) into ``cache``; each shard is
    deleted once its rows are committed and the cache checked. Safe to repeat and to interrupt."""
    cache = Path(cache)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or null, got {kind!r}")
    result = MergeResult()
    if not [s for s in (list_shards(cache, kind) if shards is None else shards) if s.is_file()]:
        return result  # nothing to do: no lock taken, nothing created
    with MergeLock(cache, timeout_s):
        todo = [s for s in (list_shards(cache, kind) if shards is None else shards) if s.is_file()]
        with PromptCache(cache, journal="delete") as target:
            for shard in todo:
                rows, problem = read_shard(shard)
                inserted, replaced = target.merge_many(rows)
                # quick_check: every page's structure, without the index cross-check that makes integrity_check
                # several times slower on a large cache (each rank's merge runs it)
                if target.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise CacheError(f"prompt cache {shown(cache)} failed its integrity check after merging "
                                     f"{shown(shard)}; the shard is kept")
                result.shards += 1
                result.rows, result.inserted, result.replaced = (result.rows + len(rows), result.inserted + inserted,
                                                                 result.replaced + replaced)
                # the journal first: a journal left without its shard would be "rolled back" into the next
                # shard of that name
                Path(f"{shard}-journal").unlink(missing_ok=True)
                if problem is None:
                    shard.unlink()
                else:  # set aside (its rows are merged) so its rank does not reopen a damaged file
                    os.replace(shard, shard.with_name(shard.name + ".damaged"))
                    result.damaged.append(f"{shown(shard)}: {problem}")
    return result
