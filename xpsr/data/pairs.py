"""`xpsr prepare`: HR folders -> LR/HR pairs (hr/, lr/, manifest.jsonl, report.json). Resumable.

Every pair derives its randomness from (seed, source content hash, crop index, variant): the same
inputs and seed give the same bytes however the work is split, interrupted or resumed. Images are
written to a temp file and renamed; a manifest line is appended (and fsynced) only after both images
of its pair exist, so the manifest never points at a missing or half-written file.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from xpsr.config import PrepareConfig, to_dict
from xpsr.data.degradations import degrade, sample_degradation, usm_sharpen
from xpsr.data.images import ImageError, file_hash, list_images, load_rgb, save_png_atomic
from xpsr.errors import XPSRError

MIN_SIDE = 16


class NothingUsableError(XPSRError, RuntimeError):
    """Not one input produced a pair."""  # smaller inputs are skipped even when padding is allowed


@dataclass
class Job:
    source: Path
    source_hash: str
    pairs: list[tuple[int, int]]  # (crop index, variant) still to do


def pair_id(source: Path, source_hash: str, crop: int, variant: int, test_set: bool) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.stem)[:64]
    return f"{stem}-{source_hash[:8]}" if test_set else f"{stem}-{source_hash[:8]}-c{crop}-v{variant}"


def read_manifest(path: Path) -> list[dict]:
    """Records of a manifest; a torn last line (crash mid-append) is cut off so appends stay valid."""
    if not path.is_file():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn line")
                records.append(json.loads(line))
                good_bytes += len(line)
            except ValueError:
                break
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def _crop_box(rng: np.random.Generator, h: int, w: int, size: int, centre: bool) -> tuple[int, int]:
    if centre:
        return (h - size) // 2, (w - size) // 2
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def _pad_to(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    return np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")


def process_job(job: Job, cfg: PrepareConfig) -> dict:
    """Make every pending pair of one source image; returns records and report entries."""
    out = Path(cfg.output_dir)
    result: dict = {"records": [], "report": []}
    try:
        img, notes = load_rgb(job.source)
    except ImageError as e:
        result["report"].append({"source": str(job.source), "decision": "skipped", "reason": str(e)})
        return result
    h, w = img.shape[:2]
    if min(h, w) < cfg.crop_size:
        if cfg.small_images == "skip" or min(h, w) < MIN_SIDE:
            reason = f"{w}x{h} is smaller than the {cfg.crop_size}px crop"
            result["report"].append({"source": str(job.source), "decision": "skipped", "reason": reason})
            return result
        img = _pad_to(img, cfg.crop_size)
        notes.append(f"{w}x{h} reflect-padded to at least {cfg.crop_size}px")
        h, w = img.shape[:2]
    if notes:
        result["report"].append({"source": str(job.source), "decision": "converted", "reason": "; ".join(notes)})
    device = torch.device(cfg.device)
    seed_base = [cfg.seed, int(job.source_hash, 16) % 2**63]
    for crop, variant in job.pairs:
        centre = cfg.test_set and cfg.test_crop == "centre"
        y, x = _crop_box(np.random.default_rng(seed_base + [crop]), h, w, cfg.crop_size, centre)
        gt = img[y:y + cfg.crop_size, x:x + cfg.crop_size].astype(np.float32) / 255.0
        params = sample_degradation(cfg.degradation, np.random.default_rng(seed_base + [crop, variant]))
        hr_t = torch.from_numpy(np.ascontiguousarray(gt)).permute(2, 0, 1)[None].to(device)
        lr = degrade(hr_t, params, cfg.scale)[0].permute(1, 2, 0).cpu().numpy()
        d = cfg.degradation
        hr = usm_sharpen(gt, d.usm_weight, d.usm_radius, d.usm_threshold) if d.usm_gt else gt
        pid = pair_id(job.source, job.source_hash, crop, variant, cfg.test_set)
        save_png_atomic((np.clip(hr, 0, 1) * 255).round().astype(np.uint8), out / "hr" / f"{pid}.png")
        save_png_atomic((lr * 255).round().astype(np.uint8), out / "lr" / f"{pid}.png")
        result["records"].append({
            "id": pid, "hr": f"hr/{pid}.png", "lr": f"lr/{pid}.png", "source": str(job.source),
            "hr_hash": file_hash(out / "hr" / f"{pid}.png"), "lr_hash": file_hash(out / "lr" / f"{pid}.png"),
            "source_hash": job.source_hash, "crop_box": [x, y, cfg.crop_size, cfg.crop_size], "scale": cfg.scale,
            "seed": cfg.seed, "crop_index": crop, "variant": variant, "usm": d.usm_gt, "degradation": params,
            "notes": notes,
        })
    return result


def _worker(args: tuple[Job, PrepareConfig]) -> dict:
    torch.set_num_threads(1)
    return process_job(*args)


class ManifestWriter:
    """Appends records durably: one JSON line each, flushed and fsynced."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _write_report(out: Path, entries: list[dict], stats: dict, cfg: PrepareConfig) -> None:
    report = {"stats": stats, "entries": entries, "config": to_dict(cfg)}
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")


def prepare_pairs(cfg: PrepareConfig) -> dict:
    """Run `prepare`; returns the stats written to report.json. Raises if nothing usable exists."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.paired_hr or cfg.paired_lr:
        from xpsr.data.paired_import import import_paired

        return import_paired(cfg)
    if not cfg.inputs:
        raise ValueError("prepare: give inputs=[DIR,...] (HR folders) or paired_hr=DIR paired_lr=DIR")
    manifest_path = out / "manifest.jsonl"
    done = {r["id"] for r in read_manifest(manifest_path)}
    crops = 1 if cfg.test_set else cfg.crops_per_image
    variants = 1 if cfg.test_set else cfg.variants
    jobs, entries = [], []
    for src in list_images(cfg.inputs):
        h = file_hash(src)
        todo = [(c, v) for c in range(crops) for v in range(variants)
                if pair_id(src, h, c, v, cfg.test_set) not in done]
        if todo:
            jobs.append(Job(src, h, todo))
    total = sum(len(j.pairs) for j in jobs)
    writer = ManifestWriter(manifest_path)
    made, start = 0, time.perf_counter()
    workers = 0 if cfg.device != "cpu" else cfg.workers
    try:
        with tqdm(total=total, desc="prepare", unit="pair") as bar:
            if workers > 0:
                ctx = mp.get_context("spawn")
                with ctx.Pool(workers) as pool:
                    results = pool.imap_unordered(_worker, [(j, cfg) for j in jobs])
                    made = _consume(results, writer, entries, bar)
            else:
                made = _consume((process_job(j, cfg) for j in jobs), writer, entries, bar)
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    records = read_manifest(manifest_path)
    stats = {"pairs_made": made, "pairs_total": len(records), "pairs_skipped_as_done": len(done),
             "seconds": round(seconds, 3), "pairs_per_s": round(made / seconds, 3) if seconds > 0 else None,
             "inputs_skipped": sum(e["decision"] == "skipped" for e in entries),
             "inputs_converted": sum(e["decision"] == "converted" for e in entries)}
    _write_report(out, entries, stats, cfg)
    print(f"prepare: {made} new pairs in {seconds:.1f}s ({stats['pairs_per_s']} pairs/s), "
          f"{len(records)} in the manifest, {stats['inputs_skipped']} inputs skipped (see report.json)")
    if not records:
        raise NothingUsableError(f"prepare: no usable pair was produced in {out} (see report.json)")
    return stats


def _consume(results, writer: ManifestWriter, entries: list[dict], bar) -> int:
    made = 0
    for result in results:
        for record in result["records"]:
            writer.write(record)
            made += 1
        entries += result["report"]
        bar.update(len(result["records"]))
    return made
