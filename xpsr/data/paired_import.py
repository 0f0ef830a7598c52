"""Import an existing paired set (HR/ + LR/ folders, e.g. RealSR or DRealSR centre crops) into our layout."""
from __future__ import annotations

import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from xpsr.config import PrepareConfig, to_dict
from xpsr.data.images import ImageError, file_hash, list_images, load_rgb, save_png_atomic
from xpsr.data.manifest import (
    ManifestWriter,
    NothingUsableError,
    check_resume_recipe,
    is_temp_file,
    read_manifest,
    remove_temp_files,
    reporting_disk_full,
    write_report,
)

RECIPE = "imported"


def _pair(cfg: PrepareConfig, hr_path: Path, lr_path: Path, out: Path, pid: str) -> dict | str:
    """Copy one pair into ``out``; its manifest record, or why it was skipped."""
    try:
        hr, hr_notes = load_rgb(hr_path)
        lr, lr_notes = load_rgb(lr_path)
    except (ImageError, Image.DecompressionBombError) as e:  # a bomb is refused by PIL before it decodes
        return str(e)
    expected = (lr.shape[0] * cfg.scale, lr.shape[1] * cfg.scale)
    if hr.shape[:2] != expected:
        return (f"HR {hr.shape[1]}x{hr.shape[0]} vs LR {lr.shape[1]}x{lr.shape[0]} ({lr_path.name}) "
                f"is not x{cfg.scale}")
    for folder, image in (("hr", hr), ("lr", lr)):
        with reporting_disk_full(out / folder / f"{pid}.png"):
            save_png_atomic(image, out / folder / f"{pid}.png")
    return {"id": pid, "hr": f"hr/{pid}.png", "lr": f"lr/{pid}.png", "source": str(hr_path),
            "source_lr": str(lr_path), "source_hash": file_hash(hr_path), "scale": cfg.scale,
            "hr_hash": file_hash(out / "hr" / f"{pid}.png"), "lr_hash": file_hash(out / "lr" / f"{pid}.png"),
            "imported": True, "recipe": RECIPE, "notes": hr_notes + lr_notes,
            "crop_box": [0, 0, hr.shape[1], hr.shape[0]]}


def import_paired(cfg: PrepareConfig) -> dict:
    """Pair ``paired_hr`` and ``paired_lr`` by sorted file name; refuse pairs whose sizes disagree with ``scale``."""
    if not (cfg.paired_hr and cfg.paired_lr):
        raise ValueError("import of a paired set needs both paired_hr=DIR and paired_lr=DIR")
    out = Path(cfg.output_dir)
    hrs, lrs = ([p for p in list_images([folder]) if not is_temp_file(p)] for folder in (cfg.paired_hr, cfg.paired_lr))
    if len(hrs) != len(lrs):
        raise ValueError(f"paired_hr has {len(hrs)} images but paired_lr has {len(lrs)}: cannot pair by sorted name")
    manifest_path = out / "manifest.jsonl"
    writer = ManifestWriter(manifest_path)  # the lock: one writer per folder
    try:
        remove_temp_files(out)
        existing = read_manifest(manifest_path, repair=True)
        check_resume_recipe(manifest_path, existing, RECIPE)
        done, listed = {r["id"] for r in existing}, {}
        entries, made, start = [], 0, time.perf_counter()
        for hr_path, lr_path in tqdm(list(zip(hrs, lrs)), desc="import", unit="pair"):
            pid = "".join(c if c.isalnum() or c in "-_" else "_" for c in hr_path.stem)[:64]
            if pid in listed:  # two files of one name (in subfolders): the first one wins
                entries.append({"source": str(hr_path), "decision": "skipped",
                                "reason": f"pair id {pid} is taken by {listed[pid]}"})
                continue
            listed[pid] = hr_path
            if pid in done:
                continue
            result = _pair(cfg, hr_path, lr_path, out, pid)
            if isinstance(result, str):
                entries.append({"source": str(hr_path), "decision": "skipped", "reason": result})
                continue
            writer.write(result)
            made += 1
    finally:
        remove_temp_files(out)
        writer.close()
    seconds = time.perf_counter() - start
    records = read_manifest(manifest_path)
    stats = {"pairs_made": made, "pairs_total": len(records), "seconds": round(seconds, 3),
             "inputs_skipped": sum(e["decision"] == "skipped" for e in entries)}
    write_report(out, entries, stats, to_dict(cfg))
    print(f"import: {made} pairs, {len(records)} in the manifest, {stats['inputs_skipped']} skipped")
    if not records:
        raise NothingUsableError(f"import: no usable pair in {cfg.paired_hr} / {cfg.paired_lr} (see report.json)")
    return stats
