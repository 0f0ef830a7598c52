"""Captioning on several processes and nodes: per-rank cache shards, `xpsr caption-merge`, and a two-node loopback
run (two torchrun launches) in which one rank is killed with SIGKILL, then rerun: nothing lost, nothing twice."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from node_helpers import children as _children
from node_helpers import free_port as _free_port

from xpsr.captions import shards as shards_mod
from xpsr.captions.cache import CacheError, PromptCache, PromptRow
from xpsr.captions.shards import MergeLock, list_shards, merge_shards, shard_dir, shard_path
from xpsr.cli import main
from xpsr.data.images import save_png_atomic
from xpsr.distributed.owners import create_exclusive, this_owner

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _row(h, text, created, kind="quality"):
    return PromptRow(h, kind, "heuristic", "q", text, created=created)


def _shard(cache, rank, world, rows, kind="quality"):
    with PromptCache(shard_path(cache, kind, rank, world), journal="delete") as s:
        s.put_many(rows)


def _texts(cache):
    with PromptCache(cache) as c:
        return {(r.image_hash, r.kind): r.text for r in c.rows()}


def test_merge_is_idempotent_newest_wins_and_an_interrupted_merge_loses_nothing(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "prompts.sqlite"
    with PromptCache(cache) as c:
        c.put_many([_row("a", "a in the cache", 10.0)])
    _shard(cache, 0, 2, [_row("a", "a newer", 20.0), _row("b", "b", 20.0)])
    _shard(cache, 1, 2, [_row("a", "a older", 5.0), _row("c", "c", 20.0), _row("c", "c content", 1.0, "content")])
    real_read = shards_mod.read_shard

    def killed_at_second_shard(shard):
        if "rank-00001" in shard.name:
            raise KeyboardInterrupt  # what a kill between two shards leaves: the first merged, the second kept
        return real_read(shard)

    monkeypatch.setattr(shards_mod, "read_shard", killed_at_second_shard)
    with pytest.raises(KeyboardInterrupt):
        merge_shards(cache)
    assert [p.name for p in list_shards(cache)] == ["quality-rank-00001-of-00002.sqlite"]
    assert _texts(cache) == {("a", "quality"): "a newer", ("b", "quality"): "b"}
    assert not (shard_dir(cache) / ".merge.lock").exists()
    monkeypatch.setattr(shards_mod, "read_shard", real_read)
    assert main(["caption-merge", f"cache={cache}"]) == 0
    assert "1 shards" in capsys.readouterr().out
    expected = {("a", "quality"): "a newer", ("b", "quality"): "b", ("c", "quality"): "c",
                ("c", "content"): "c content"}
    assert _texts(cache) == expected and list_shards(cache) == []
    assert merge_shards(cache).shards == 0 and _texts(cache) == expected  # again: nothing to do, nothing changes
    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # readable from several machines
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    PromptCache(cache).close()  # a reader (training, inference) never switches it back to WAL
    assert sqlite3.connect(cache).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_damaged_shard_gives_its_readable_rows_and_is_set_aside(tmp_path, capsys):
    cache = tmp_path / "prompts.sqlite"
    _shard(cache, 0, 1, [_row(f"h{i:03d}", "text " * 40, 1.0) for i in range(60)])
    shard = shard_path(cache, "quality", 0, 1)
    data = bytearray(shard.read_bytes())
    middle = (len(data) // 4096 // 2) * 4096  # one data page in the middle of the table
    data[middle:middle + 4096] = b"\xa5" * 4096
    shard.write_bytes(bytes(data))
    assert main(["caption-merge", f"cache={cache}", "kind=quality"]) == 0
    assert "damaged shard" in capsys.readouterr().out
    assert not shard.exists() and shard.with_name(shard.name + ".damaged").is_file()
    assert 30 <= len(_texts(cache)) < 60


def test_the_merge_lock_of_a_dead_merger_is_taken_over_a_live_one_is_waited_for(tmp_path):
    cache = tmp_path / "prompts.sqlite"
    _shard(cache, 0, 2, [_row("a", "a", 1.0)])
    lock = shard_dir(cache) / ".merge.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.close(create_exclusive(lock, {**this_owner(), "pid": int(dead.stdout), "start": None}))
    assert merge_shards(cache).inserted == 1 and not lock.exists()
    _shard(cache, 1, 2, [_row("b", "b", 1.0)])
    with MergeLock(cache, 1.0), pytest.raises(CacheError, match=r"another caption-merge holds .*\.merge\.lock"):
        merge_shards(cache, timeout_s=0.3)
    assert len(list_shards(cache)) == 1


# ---------------------------------------------------------------- two nodes on loopback, one rank killed

def _two_nodes(images, cache, *extra):
    """The launch lines of the docs: one torchrun per node, 1 process each, rendezvous on 127.0.0.1."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                              "--master_port", str(port), "--nproc_per_node", "1", str(REPO / "scripts" / "caption.py"),
                              f"images={images}", f"cache={cache}", "batch_size=1", "device=cpu", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for node in (0, 1)]


def _rows_in(path: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def test_two_nodes_caption_once_and_a_killed_rank_then_a_rerun_lose_and_duplicate_nothing(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "lr"
    for i in range(12):
        save_png_atomic(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8), images / f"im{i:02d}.png")
    cache = tmp_path / "prompts.sqlite"
    nodes = _two_nodes(images, cache, "captioner=heuristic", "kind=quality", "pause_s=0.5")
    shard = shard_path(cache, "quality", 1, 2)
    deadline = time.time() + 240
    while _rows_in(shard) < 2 and time.time() < deadline and nodes[1].poll() is None:
        time.sleep(0.1)
    workers = _children(nodes[1].pid)
    assert workers, "no worker under the node-1 launcher"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    nodes[1].wait(timeout=120)
    deadline = time.time() + 240
    while _children(nodes[0].pid) and time.time() < deadline:  # rank 0 finishes its share, merges it, exits
        time.sleep(0.2)
    nodes[0].kill()  # as a scheduler ends the job: torchrun would wait 300 s at its exit barrier for node 1
    outs = [p.communicate(timeout=120)[0] for p in nodes]
    assert nodes[1].returncode != 0, outs[1]
    kept = _rows_in(shard)
    assert 2 <= kept < 6, outs  # rank 1 (6 images) was stopped part-way; its committed rows are in its shard
    assert "caption [0/2]: 6 new quality prompts" in outs[0], outs[0]

    # the rerun, and beside it a job of the other kind into the same cache (their merges take turns)
    nodes = _two_nodes(images, cache, "captioner=heuristic", "kind=quality")
    nodes += _two_nodes(images, cache, "captioner=fixed", "kind=content", "fixed_text=a photo")
    outs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0, 0, 0], outs
    assert "caption [0/2]: 0 new" in outs[0] and f"caption [1/2]: {6 - kept} new" in outs[1], outs
    assert "caption [0/2]: 6 new content" in outs[2] and "caption [1/2]: 6 new content" in outs[3], outs

    assert list_shards(cache) == [] and not (shard_dir(cache) / ".merge.lock").exists()
    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    per_key = db.execute("SELECT kind, COUNT(DISTINCT image_hash), COUNT(*) FROM prompts GROUP BY kind").fetchall()
    assert sorted(per_key) == [("content", 12, 12), ("quality", 12, 12)]
