"""`xpsr caption` and the prompt cache under hostile inputs: decompression bombs and names that are not UTF-8 in
a batch (skipped per file, counts true), a damaged cache (a one-line error naming it), `caption-repair`
(readable rows salvaged), and an export that fails half way (the previous file kept)."""
import errno
import json
import os

import numpy as np
import pytest
from conftest import REPO, write_png_bomb

import xpsr.captions.cache as cache_mod
from xpsr.captions.cache import CacheError, PromptCache, PromptRow
from xpsr.captions.repair import repair_cache
from xpsr.captions.run import run_captioning
from xpsr.config import CaptionConfig, load_config
from xpsr.data.images import save_png_atomic
from xpsr.errors import DiskFullError


def _img(seed):
    return np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)


def test_bombs_broken_files_and_non_utf8_names_are_skipped_per_file_with_true_counts(tmp_path):
    src = tmp_path / "lr"
    save_png_atomic(_img(0), src / "a.png")
    latin1 = src / os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: not UTF-8, kept by Python as a lone surrogate
    save_png_atomic(_img(1), latin1)
    write_png_bomb(src / "bomb.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cfg = load_config(CaptionConfig, None, [f"images={src}", f"cache={tmp_path / 'p.sqlite'}", "batch_size=8"])
    stats = run_captioning(cfg)
    assert stats["images"] == 4 and stats["captioned"] == 2 and stats["already_cached"] == 0
    assert len(stats["skipped"]) == 2
    bomb, broken = sorted(stats["skipped"])
    assert bomb.startswith(str(src / "bomb.png")) and "decompression" in bomb.lower()
    assert broken.startswith(str(src / "broken.jpg"))
    with PromptCache(tmp_path / "p.sqlite") as cache:
        paths = sorted(r.image_path for r in cache.rows())
    assert paths == [str(src / "a.png"), str(src / "caf\\xe9.png")]  # the name stored printable, byte escaped
    again = run_captioning(cfg)  # resume: the two good images are cached, the two bad ones skipped again
    assert again["captioned"] == 0 and again["already_cached"] == 2 and len(again["skipped"]) == 2


def _cache_with_rows(path, n):
    with PromptCache(path) as cache:
        cache.put_many(PromptRow(f"h{i:05d}", "content", "c", "q", f"caption number {i} " + "x" * 200)
                       for i in range(n))
        cache.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_a_damaged_or_foreign_cache_is_a_one_line_error_naming_it_and_repair_salvages_rows(tmp_path):
    not_sqlite = tmp_path / "notes.sqlite"
    not_sqlite.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(CacheError, match="notes.sqlite is damaged or not a prompt cache.*caption-repair"):
        PromptCache(not_sqlite)
    assert not_sqlite.read_text().startswith("these are my notes")  # never modified
    cache = tmp_path / "p.sqlite"
    _cache_with_rows(cache, 400)
    data = bytearray(cache.read_bytes())
    page = 4096
    middle = (len(data) // page // 2) * page  # one data page in the middle of the table
    data[middle:middle + page] = b"\xa5" * page
    cache.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="p.sqlite is damaged"):
        PromptCache(cache)
    result = repair_cache(cache, tmp_path / "fixed.sqlite")
    assert not result.full_scan and 300 < len(result.rows) < 400
    with PromptCache(tmp_path / "fixed.sqlite") as fixed:
        assert fixed.count() == len(result.rows) and fixed.integrity_ok()
        assert fixed.lookup(result.rows[0].image_hash, "content").startswith("caption number")
    assert cache.read_bytes() == bytes(data)  # the damaged file is left as it was
    with pytest.raises(ValueError, match="exists"):
        repair_cache(cache, tmp_path / "fixed.sqlite")
    assert len(repair_cache(cache, tmp_path / "fixed.jsonl").rows) == len(result.rows)
    assert sum(1 for _ in open(tmp_path / "fixed.jsonl")) == len(result.rows)


def test_an_export_that_fails_half_way_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    cache, out = tmp_path / "p.sqlite", tmp_path / "prompts.jsonl"
    _cache_with_rows(cache, 50)
    with PromptCache(cache) as c:
        assert c.export_jsonl(out) == 50
    before = out.read_bytes()
    real_dumps, calls = json.dumps, []

    def dumps_until_full(*args, **kwargs):
        calls.append(1)
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(cache_mod.json, "dumps", dumps_until_full)
    with PromptCache(cache) as c, pytest.raises(DiskFullError, match="prompts.jsonl.*previous file is unchanged"):
        c.export_jsonl(out)
    assert len(calls) == 21 and out.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_truncated_cache_is_named_and_repair_salvages_the_rows_on_its_surviving_pages(tmp_path):
    cache = tmp_path / "p.sqlite"
    _cache_with_rows(cache, 400)
    with PromptCache(cache) as c:
        original = {r.image_hash: r for r in c.rows()}
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2 + 1000])  # a copy cut short, mid-page
    with pytest.raises(CacheError, match="p.sqlite is damaged.*caption-repair"):
        with PromptCache(cache) as c:
            c.count()
    result = repair_cache(cache, tmp_path / "fixed.sqlite")
    # SQLite reaches none of them (the table's interior pages are gone): they come from the leaf pages
    assert not result.full_scan and 100 < len(result.rows) < 400, result.notes
    assert all(r == original[r.image_hash] for r in result.rows)  # salvaged rows are exact, none invented
    with PromptCache(tmp_path / "fixed.sqlite") as fixed:
        assert fixed.count() == len(result.rows) and fixed.integrity_ok()


def test_the_page_reader_decodes_every_row_of_an_intact_cache_with_overflow_and_wal(tmp_path):
    from xpsr.captions.pages import leaf_records

    cache = tmp_path / "p.sqlite"
    _cache_with_rows(cache, 300)
    with PromptCache(cache) as c:  # rows longer than a page (overflow chains), left in the WAL
        c.put_many([PromptRow("long0", "content", "c", "q", "é" * 9000), PromptRow("long1", "quality", "c", "q", "")])
        expected = sorted((r.image_hash, r.kind, r.text, r.created) for r in c.rows())
        assert (tmp_path / "p.sqlite-wal").stat().st_size > 0
        decoded = sorted((v[0], v[1], v[4], v[8]) for _, v in leaf_records(cache) if v is not None and len(v) == 9)
    assert decoded == expected


def test_disk_full_while_captioning_is_one_line_keeps_the_rows_written_and_a_rerun_completes(tmp_path, monkeypatch,
                                                                                             capsys):
    """SQLite's page limit raises exactly what a full disk raises (SQLITE_FULL, 'database or disk is full')."""
    import sqlite3

    from xpsr.cli import main

    src = tmp_path / "lr"
    for i in range(40):
        save_png_atomic(_img(i), src / f"{i:02d}.png")
    cache = tmp_path / "p.sqlite"
    args = ["caption", "--config", "configs/caption/heuristic_quality.yaml", f"images={src}", f"cache={cache}",
            "batch_size=4", "device=cpu"]
    real_connect = sqlite3.connect

    def small_disk(*a, **k):
        db = real_connect(*a, **k)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {max(pages, 2) + 2}")
        return db

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(cache_mod.sqlite3, "connect", small_disk)
    assert main(args) == 1
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "disk full" in line]  # the rest is the progress bar
    assert len(said) == 1 and str(cache) in said[0] and "Traceback" not in err, err
    monkeypatch.setattr(cache_mod.sqlite3, "connect", real_connect)  # space freed
    with PromptCache(cache) as c:
        kept = c.count()
        assert 0 < kept < 40 and c.integrity_ok()  # the transactions before the full disk are whole
    assert main(args) == 0
    with PromptCache(cache) as c:
        assert c.count() == 40 and len({r.image_hash for r in c.rows()}) == 40
