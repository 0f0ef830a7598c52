"""The caption runner: images -> prompts in the cache; resumable, runs on N processes and nodes, OOM-tolerant.

    python scripts/caption.py images=pairs/lr cache=prompts.sqlite kind=content captioner=llava
    torchrun --nproc_per_node N scripts/caption.py ...   # N processes: disjoint shares, per-rank cache shards
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL.Image import DecompressionBombError  # not an OSError: caught per file as well
from tqdm import tqdm

from xpsr.captions.cache import PromptCache, PromptRow
from xpsr.captions.captioners import (
    PAPER_CONTENT_QUESTION,
    PAPER_QUALITY_QUESTION,
    Captioner,
    FixedCaptioner,
    HeuristicCaptioner,
    MLLMCaptioner,
)
from xpsr.captions.shards import MergeLock, list_shards, merge_shards, shard_path, shard_world
from xpsr.config import CaptionConfig
from xpsr.data.images import ImageError, file_hash, list_images, load_rgb
from xpsr.errors import shown


def make_captioner(cfg: CaptionConfig, device: str) -> Captioner:
    if cfg.captioner == "heuristic":
        if cfg.kind != "quality":
            raise ValueError("the heuristic captioner describes quality; use kind=quality")
        return HeuristicCaptioner()
    if cfg.captioner in ("fixed", "empty"):
        return FixedCaptioner(cfg.fixed_text if cfg.captioner == "fixed" else "")
    question = cfg.question or (PAPER_CONTENT_QUESTION if cfg.kind == "content" else PAPER_QUALITY_QUESTION)
    return MLLMCaptioner(cfg.model, question, kind="llava" if cfg.captioner == "llava" else "auto",
                         template=cfg.template, dtype=cfg.dtype, device=device, max_new_tokens=cfg.max_new_tokens,
                         num_beams=cfg.num_beams, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def caption_with_backoff(captioner: Captioner, images: list, batch_size: int) -> tuple[list[str], int]:
    """Caption ``images``; on out-of-memory retry with half the batch. Returns texts and the batch size that fit."""
    while True:
        try:
            texts = []
            for i in range(0, len(images), batch_size):
                texts += captioner.caption(images[i:i + batch_size])
            return texts, batch_size
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not _is_oom(e) or batch_size == 1:
                raise
            batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"caption: out of memory, retrying with batch size {batch_size}")


def _reason(path, e: BaseException) -> str:
    """Why ``path`` was skipped, starting with its name (printable even when the name is not UTF-8)."""
    message = shown(str(e))
    return message if message.startswith(shown(path)) else f"{shown(path)}: {message}"


def _prepare_shard(cfg: CaptionConfig, state) -> Path:
    """On W > 1 ranks: merge what a crashed run of this job left (this rank's own shard; rank 0 also the shards
    of runs on another number of ranks), so every rank then reads the complete cache. Returns this rank's shard.
    Two barriers keep the cache single-writer: merges, then reads, then (after captioning) each rank's merge."""
    rank, world = state.process_index, state.num_processes
    own = shard_path(cfg.cache, cfg.kind, rank, world)
    merge_shards(cfg.cache, [own])
    if rank == 0:
        merge_shards(cfg.cache, [s for s in list_shards(cfg.cache, cfg.kind) if shard_world(s) != world])
        if Path(cfg.cache).is_file():  # rollback journal: readable from every machine (under the lock: others
            with MergeLock(Path(cfg.cache), 600.0):  # may be merging their own shards right now)
                PromptCache(cfg.cache, journal="delete").close()
    state.wait_for_everyone()
    return own


def _done_hashes(cfg: CaptionConfig, captioner: Captioner) -> set[str]:
    if not Path(cfg.cache).is_file():
        return set()
    with PromptCache(cfg.cache) as cache:
        return cache.done_hashes(cfg.kind, captioner.id, captioner.question)


def _todo(images: list, done: set[str], skipped: list[str]) -> list:
    """(path, hash) of the images not in ``done``; unreadable files are added to ``skipped``."""
    todo = []
    for path in images:
        try:
            h = file_hash(path)
        except OSError as e:  # vanished, unreadable (permissions), a FIFO...: this file only
            skipped.append(_reason(path, e))
            continue
        if h not in done:
            todo.append((path, h))
            done.add(h)  # identical files are captioned once
    return todo


def run_captioning(cfg: CaptionConfig) -> dict:
    """Caption this process's share of ``cfg.images`` into ``cfg.cache``; returns counts and speed.

    One process writes the cache itself. W > 1 processes (torchrun, accelerate) each write their own shard
    (:mod:`xpsr.captions.shards`) and merge it into the cache at the end; a crashed job's shards are merged by
    the next run, or by `xpsr caption-merge`."""
    from accelerate import PartialState

    # On CPU, accelerate only forms a process group when told so (`accelerate launch --cpu`, torchrun env).
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    device = str(state.device) if cfg.device == "auto" else cfg.device
    images = list_images([cfg.images])[rank::world]  # disjoint shares: no two processes caption one image
    captioner = make_captioner(cfg, device)
    if world == 1:  # shards a crashed multi-process run of this kind left: their images are done
        merge_shards(cfg.cache, kind=cfg.kind)
    shard = _prepare_shard(cfg, state) if world > 1 else None
    skipped: list[str] = []
    todo = _todo(images, _done_hashes(cfg, captioner), skipped)
    unhashed = len(skipped)
    if shard is not None:
        state.wait_for_everyone()  # nobody reads the cache any more: merges may write it
    start = time.perf_counter()
    with PromptCache(shard or cfg.cache, journal="delete" if shard else None) as cache:
        written = _caption_todo(cfg, captioner, cache, todo, skipped, f"[{rank}/{world}]", rank == 0)
    seconds = time.perf_counter() - start
    if shard is not None:
        merge_shards(cfg.cache, [shard])
    stats = {"rank": rank, "world": world, "images": len(images), "captioned": written,
             "already_cached": len(images) - len(todo) - unhashed, "skipped": skipped, "seconds": round(seconds, 3),
             "images_per_s": round(written / seconds, 2) if seconds > 0 else None, "captioner": captioner.id}
    print(f"caption [{rank}/{world}]: {written} new {cfg.kind} prompts ({stats['images_per_s']} img/s), "
          f"{stats['already_cached']} already cached, {len(skipped)} unreadable"
          + (f"; merged into {shown(cfg.cache)}" if shard else ""))
    for reason in skipped:
        print(f"  skipped: {reason}")
    return stats


def _caption_todo(cfg: CaptionConfig, captioner: Captioner, cache: PromptCache, todo: list, skipped: list[str],
                  tag: str, show: bool) -> int:
    """Caption ``todo`` in batches, one transaction per batch; returns the rows written."""
    batch_size, written, start = cfg.batch_size, 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"caption {cfg.kind} {tag}", unit="img", disable=not show)
    for i in range(0, len(todo), cfg.batch_size):
        chunk, pixels = [], []
        for path, h in todo[i:i + cfg.batch_size]:
            try:
                pixels.append(load_rgb(path)[0])
                chunk.append((path, h))
            except (ImageError, DecompressionBombError, OSError) as e:  # this file only; named in the message
                skipped.append(_reason(path, e))
        if chunk:
            texts, batch_size = caption_with_backoff(captioner, pixels, batch_size)
            written += cache.put_many(
                PromptRow(h, cfg.kind, captioner.id, captioner.question, text, captioner.revision,
                          cfg.image_source, shown(path)) for (path, h), text in zip(chunk, texts))
        bar.update(len(todo[i:i + cfg.batch_size]))
        bar.set_postfix(img_per_s=f"{written / max(time.perf_counter() - start, 1e-9):.1f}")
        if cfg.pause_s:
            time.sleep(cfg.pause_s)
    bar.close()
    return written
