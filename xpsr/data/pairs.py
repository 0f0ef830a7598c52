"""`xpsr prepare`: HR folders -> LR/HR pairs (hr/, lr/, manifest.jsonl, report.json). Resumable.

Every pair derives its randomness from (seed, source content hash, crop index, variant): the same
inputs and seed give the same bytes however the work is split, interrupted or resumed. With
``share_draws_every=N`` the official per-batch draws come from (seed, hash of the group's source hashes,
crop, variant) instead, the group being N consecutive sources of the sorted input list — still a pure
function of the inputs. Images are written to a temp file and renamed; a manifest line is appended (and
fsynced) only after both images of its pair exist, so the manifest never points at a missing file.

The recipe (docs/data.md): crop -> USM sharpening -> the two-stage degradation of the *sharpened* crop
(official ``utils_data/make_train.py``); the sharpened crop is the saved HR.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from xpsr.config import PrepareConfig, to_dict
from xpsr.data.degradations import degrade, sample_degradation, sample_shared_draws, usm_sharpen
from xpsr.data.images import ImageError, file_hash, list_images, load_rgb, save_png_atomic
from xpsr.data.manifest import (
    DiskFullError,
    ManifestWriter,
    NothingUsableError,
    check_resume_recipe,
    is_temp_file,
    read_manifest,
    recipe_name,
    remove_temp_files,
    reporting_disk_full,
    write_report,
)
from xpsr.data.paired_import import import_paired

__all__ = ["NothingUsableError", "pair_id", "prepare_pairs", "process_job", "read_manifest"]
MIN_SIDE = 16


@dataclass
class Job:
    source: Path
    source_hash: str
    pairs: list[tuple[int, int]]  # (crop index, variant) still to do
    group: dict | None = None  # {"index", "key"} of the draw group (share_draws_every > 1)


def pair_id(source: Path, source_hash: str, crop: int, variant: int, test_set: bool) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.stem)[:64]
    return f"{stem}-{source_hash[:8]}" if test_set else f"{stem}-{source_hash[:8]}-c{crop}-v{variant}"


def settings_hash(cfg: PrepareConfig) -> str:
    """Fingerprint of every setting that changes a pair's bytes (not the crop/variant counts, which only add pairs)."""
    keys = ("seed", "scale", "crop_size", "test_set", "test_crop", "small_images", "share_draws_every")
    settings = {k: getattr(cfg, k) for k in keys} | {"degradation": to_dict(cfg.degradation)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def draw_groups(hashes: list[str], size: int) -> list[dict | None]:
    """Group of each source (sorted input order): consecutive runs of ``size``, keyed by their content hashes."""
    if size <= 1:
        return [None] * len(hashes)
    groups = []
    for index in range(len(hashes)):
        first = index // size * size
        key = hashlib.sha256("|".join(hashes[first:first + size]).encode()).hexdigest()[:16]
        groups.append({"index": index // size, "key": key})
    return groups


def _crop_box(rng: np.random.Generator, h: int, w: int, size: int, centre: bool) -> tuple[int, int]:
    if centre:
        return (h - size) // 2, (w - size) // 2
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def _pad_to(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (edge pixel not repeated) at the bottom and right, as the official dataset does."""
    h, w = img.shape[:2]
    return np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect")


def _load(job: Job, cfg: PrepareConfig, result: dict) -> tuple[np.ndarray, list[str]] | None:
    """The source as RGB uint8, padded when small and allowed; None (with a report entry) when unusable."""
    try:
        img, notes = load_rgb(job.source)
    except (ImageError, Image.DecompressionBombError) as e:  # a bomb is refused by PIL before it decodes
        result["report"].append({"source": str(job.source), "decision": "skipped", "reason": str(e)})
        return None
    h, w = img.shape[:2]
    if min(h, w) < cfg.crop_size:
        if cfg.small_images == "skip" or min(h, w) < MIN_SIDE:
            reason = f"{w}x{h} is smaller than the {cfg.crop_size}px crop"
            result["report"].append({"source": str(job.source), "decision": "skipped", "reason": reason})
            return None
        img = _pad_to(img, cfg.crop_size)
        notes.append(f"{w}x{h} reflect-padded (bottom/right) to at least {cfg.crop_size}px")
    if notes:
        result["report"].append({"source": str(job.source), "decision": "converted", "reason": "; ".join(notes)})
    return img, notes


def _params(job: Job, cfg: PrepareConfig, crop: int, variant: int) -> dict:
    """The pair's degradation record: its own draws, plus the group's shared ones when grouping."""
    rng = np.random.default_rng([cfg.seed, int(job.source_hash, 16) % 2**63, crop, variant])
    shared = None
    if job.group is not None:
        group_rng = np.random.default_rng([cfg.seed, int(job.group["key"], 16) % 2**63, crop, variant, 1])
        shared = sample_shared_draws(cfg.degradation, group_rng)
    return sample_degradation(cfg.degradation, rng, shared)


def _make_pair(job: Job, cfg: PrepareConfig, img: np.ndarray, crop: int, variant: int, notes: list[str]) -> dict:
    """Write one pair's HR and LR images; returns its manifest record."""
    out, d = Path(cfg.output_dir), cfg.degradation
    h, w = img.shape[:2]
    centre = cfg.test_set and cfg.test_crop == "centre"
    y, x = _crop_box(np.random.default_rng([cfg.seed, int(job.source_hash, 16) % 2**63, crop]), h, w,
                     cfg.crop_size, centre)
    gt = img[y:y + cfg.crop_size, x:x + cfg.crop_size].astype(np.float32) / 255.0
    hr = usm_sharpen(gt, d.usm_weight, d.usm_radius, d.usm_threshold) if d.usm_gt else gt
    degraded_input = hr if d.degrade_sharpened else gt
    params = _params(job, cfg, crop, variant)
    lr_in = torch.from_numpy(np.ascontiguousarray(degraded_input)).permute(2, 0, 1)[None].to(torch.device(cfg.device))
    lr = degrade(lr_in, params, cfg.scale)[0].permute(1, 2, 0).cpu().numpy()
    pid = pair_id(job.source, job.source_hash, crop, variant, cfg.test_set)
    for folder, image in (("hr", np.clip(hr, 0, 1)), ("lr", lr)):
        with reporting_disk_full(out / folder / f"{pid}.png"):
            save_png_atomic((image * 255).round().astype(np.uint8), out / folder / f"{pid}.png")
    record = {
        "id": pid, "hr": f"hr/{pid}.png", "lr": f"lr/{pid}.png", "source": str(job.source),
        "hr_hash": file_hash(out / "hr" / f"{pid}.png"), "lr_hash": file_hash(out / "lr" / f"{pid}.png"),
        "source_hash": job.source_hash, "crop_box": [x, y, cfg.crop_size, cfg.crop_size], "scale": cfg.scale,
        "seed": cfg.seed, "crop_index": crop, "variant": variant, "usm": d.usm_gt,
        "recipe": recipe_name(d.usm_gt, d.degrade_sharpened), "share_draws_every": cfg.share_draws_every,
        "settings_hash": settings_hash(cfg), "degradation": params, "notes": notes,
    }
    if job.group is not None:
        record["draw_group"] = job.group
    return record


def process_job(job: Job, cfg: PrepareConfig) -> dict:
    """Make every pending pair of one source image; returns records, report entries and a disk-full error."""
    result: dict = {"records": [], "report": []}
    loaded = _load(job, cfg, result)
    if loaded is None:
        return result
    img, notes = loaded
    for crop, variant in job.pairs:
        try:
            result["records"].append(_make_pair(job, cfg, img, crop, variant, notes))
        except DiskFullError as e:  # raised by the parent once the pairs made before it have their lines
            result["error"] = e
            break
    return result


def init_worker(parent: int) -> None:
    """Die with the parent: a worker orphaned by ``kill -9`` would go on writing into the folder."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before that took effect
        os._exit(1)


def _worker(args: tuple[Job, PrepareConfig]) -> dict:
    return process_job(*args)


def _sources(cfg: PrepareConfig, entries: list[dict]) -> tuple[list[Path], list[str]]:
    """Input images and their content hashes, each pair source once. Left out: our temp files, unreadable
    files and repeats (same name and content: listed twice, or a copy), the last two reported."""
    sources, hashes, first_of = [], [], {}
    for src in list_images(cfg.inputs):
        if is_temp_file(src):
            continue
        try:
            h = file_hash(src)
        except OSError as e:
            entries.append({"source": str(src), "decision": "skipped", "reason": f"cannot read ({e.strerror})"})
            continue
        key = pair_id(src, h, 0, 0, cfg.test_set)
        if key in first_of:  # it would make the very pairs (same ids) of the first one
            entries.append({"source": str(src), "decision": "skipped", "reason": f"duplicate of {first_of[key]}"})
            continue
        first_of[key] = src
        sources.append(src)
        hashes.append(h)
    return sources, hashes


def _jobs(cfg: PrepareConfig, done: set[str], entries: list[dict]) -> list[Job]:
    crops = 1 if cfg.test_set else cfg.crops_per_image
    variants = 1 if cfg.test_set else cfg.variants
    sources, hashes = _sources(cfg, entries)
    jobs = []
    for src, h, group in zip(sources, hashes, draw_groups(hashes, cfg.share_draws_every)):
        todo = [(c, v) for c in range(crops) for v in range(variants)
                if pair_id(src, h, c, v, cfg.test_set) not in done]
        if todo:
            jobs.append(Job(src, h, todo, group))
    return jobs


def _check_settings(cfg: PrepareConfig) -> None:
    """Settings that disagree with each other, refused before anything is written."""
    if not cfg.inputs:
        raise ValueError("prepare: give inputs=[DIR,...] (HR folders) or paired_hr=DIR paired_lr=DIR")
    if cfg.share_draws_every < 1:
        raise ValueError(f"prepare: share_draws_every must be >= 1, got {cfg.share_draws_every}")
    c, s = cfg.crop_size, cfg.scale
    if s < 1:
        raise ValueError(f"prepare: scale={s} must be >= 1")
    if c < s or c % s:
        raise ValueError(f"prepare: crop_size={c} is not a multiple of scale={s}: a {c} px HR crop has no whole "
                         f"LR crop ({c}/{s} = {c / s:g} px); use e.g. crop_size={max(s, c // s * s)}")
    check_inputs_apart(cfg)


def check_inputs_apart(cfg: PrepareConfig) -> None:
    """Every input exists and neither holds nor sits inside ``output_dir`` (the pairs written would be read back
    as sources on the next run)."""
    out = os.path.realpath(cfg.output_dir)
    for i, folder in enumerate(cfg.inputs):
        if not Path(folder).exists():
            raise FileNotFoundError(f"prepare: input {folder} (inputs[{i}]) does not exist")
        inp = os.path.realpath(folder)
        if os.path.commonpath([out, inp]) in (out, inp):
            raise ValueError(f"prepare: output_dir={cfg.output_dir} and inputs[{i}]={folder} overlap: the pairs "
                             "written would be read back as sources; write to a separate folder")


@contextlib.contextmanager
def output_folder(out: Path, recipe: str, extra: dict, remove_temp=None, what: str = "temp files"):
    """``out`` made and locked for one `prepare` run (image pairs or video clips): what a killed run left is
    removed, the manifest read (a torn last line cut) and checked to be of the same recipe and settings.
    Yields ``(writer, existing records)``; the temp files are removed again and the lock released at the end."""
    remove_temp = remove_temp or remove_temp_files
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    writer = ManifestWriter(manifest)  # the lock: one writer per folder
    try:
        removed = remove_temp(out)
        if removed:
            print(f"prepare: removed {removed} {what} left in {out} by an interrupted run")
        existing = read_manifest(manifest, repair=True)
        check_resume_recipe(manifest, existing, recipe, extra)
        yield writer, existing
    finally:
        remove_temp(out)  # those of workers stopped by an error
        writer.close()


def prepare_pairs(cfg: PrepareConfig) -> dict:
    """Run `prepare`; returns the stats written to report.json. Raises if nothing usable exists."""
    out = Path(cfg.output_dir)
    if cfg.paired_hr or cfg.paired_lr:
        out.mkdir(parents=True, exist_ok=True)
        return import_paired(cfg)
    _check_settings(cfg)
    manifest_path = out / "manifest.jsonl"
    d = cfg.degradation
    with output_folder(out, recipe_name(d.usm_gt, d.degrade_sharpened),
                       {"share_draws_every": cfg.share_draws_every, "settings_hash": settings_hash(cfg)}) as (
            writer, existing):
        done, entries = {r["id"] for r in existing}, []
        jobs = _jobs(cfg, done, entries)
        start = time.perf_counter()
        made = _run(jobs, cfg, writer, entries)
    seconds = time.perf_counter() - start
    records = read_manifest(manifest_path)
    entries = _with_earlier_conversions(entries, records)
    stats = {"pairs_made": made, "pairs_total": len(records), "pairs_skipped_as_done": len(done),
             "seconds": round(seconds, 3), "pairs_per_s": round(made / seconds, 3) if seconds > 0 else None,
             "inputs_skipped": sum(e["decision"] == "skipped" for e in entries),
             "inputs_converted": sum(e["decision"] == "converted" for e in entries)}
    write_report(out, entries, stats, to_dict(cfg))
    print(f"prepare: {made} new pairs in {seconds:.1f}s ({stats['pairs_per_s']} pairs/s), "
          f"{len(records)} in the manifest, {stats['inputs_skipped']} inputs skipped (see report.json)")
    if not records:
        raise NothingUsableError(f"prepare: no usable pair was produced in {out} (see report.json)")
    return stats


def _with_earlier_conversions(entries: list[dict], records: list[dict]) -> list[dict]:
    """The report's "converted" entries rebuilt from the manifest (the notes of each source's pairs), so a
    run resumed after an interruption reports the sources converted by the session that made their pairs,
    as an uninterrupted run would, once per source in manifest order."""
    converted: dict[str, dict] = {}
    for record in records:
        if record.get("notes") and record["source"] not in converted:
            converted[record["source"]] = {"source": record["source"], "decision": "converted",
                                           "reason": "; ".join(record["notes"])}
    return [e for e in entries if e["decision"] != "converted"] + list(converted.values())


def _run(jobs: list[Job], cfg: PrepareConfig, writer: ManifestWriter, entries: list[dict]) -> int:
    """Make the pairs of ``jobs``; manifest lines go in job order whatever the worker count (same bytes)."""
    total = sum(len(j.pairs) for j in jobs)
    workers = 0 if cfg.device != "cpu" else cfg.workers
    with tqdm(total=total, desc="prepare", unit="pair") as bar:
        if workers == 0:
            return _consume((process_job(j, cfg) for j in jobs), writer, entries, bar)
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=init_worker, initargs=(os.getpid(),)) as pool:
            return _consume(pool.imap(_worker, [(j, cfg) for j in jobs]), writer, entries, bar)


def _consume(results, writer: ManifestWriter, entries: list[dict], bar) -> int:
    made = 0
    for result in results:
        for record in result["records"]:
            writer.write(record)
            made += 1
        entries += result["report"]
        bar.update(len(result["records"]))
        if "error" in result:
            raise result["error"]
    return made
