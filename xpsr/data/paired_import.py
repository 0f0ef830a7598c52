"""Import an existing paired set (HR/ + LR/ folders, e.g. RealSR or DRealSR centre crops) into our layout."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from xpsr.config import PrepareConfig, to_dict
from xpsr.data.images import ImageError, file_hash, list_images, load_rgb, save_png_atomic
from xpsr.data.manifest import ManifestWriter, NothingUsableError, check_resume_recipe, read_manifest, write_report

RECIPE = "imported"


def import_paired(cfg: PrepareConfig) -> dict:
    """Pair ``paired_hr`` and ``paired_lr`` by sorted file name; refuse pairs whose sizes disagree with ``scale``."""
    if not (cfg.paired_hr and cfg.paired_lr):
        raise ValueError("import of a paired set needs both paired_hr=DIR and paired_lr=DIR")
    out = Path(cfg.output_dir)
    hrs, lrs = list_images([cfg.paired_hr]), list_images([cfg.paired_lr])
    if len(hrs) != len(lrs):
        raise ValueError(f"paired_hr has {len(hrs)} images but paired_lr has {len(lrs)}: cannot pair by sorted name")
    manifest_path = out / "manifest.jsonl"
    existing = read_manifest(manifest_path)
    check_resume_recipe(manifest_path, existing, RECIPE)
    done = {r["id"] for r in existing}
    writer, entries, made, start = ManifestWriter(manifest_path), [], 0, time.perf_counter()
    try:
        for hr_path, lr_path in tqdm(list(zip(hrs, lrs)), desc="import", unit="pair"):
            pid = "".join(c if c.isalnum() or c in "-_" else "_" for c in hr_path.stem)[:64]
            if pid in done:
                continue
            try:
                hr, hr_notes = load_rgb(hr_path)
                lr, lr_notes = load_rgb(lr_path)
            except ImageError as e:
                entries.append({"source": str(hr_path), "decision": "skipped", "reason": str(e)})
                continue
            expected = (lr.shape[0] * cfg.scale, lr.shape[1] * cfg.scale)
            if hr.shape[:2] != expected:
                entries.append({"source": str(hr_path), "decision": "skipped",
                                "reason": f"HR {hr.shape[1]}x{hr.shape[0]} vs LR {lr.shape[1]}x{lr.shape[0]} "
                                          f"({lr_path.name}) is not x{cfg.scale}"})
                continue
            save_png_atomic(hr, out / "hr" / f"{pid}.png")
            save_png_atomic(lr, out / "lr" / f"{pid}.png")
            writer.write({"id": pid, "hr": f"hr/{pid}.png", "lr": f"lr/{pid}.png", "source": str(hr_path),
                          "source_lr": str(lr_path), "source_hash": file_hash(hr_path), "scale": cfg.scale,
                          "hr_hash": file_hash(out / "hr" / f"{pid}.png"),
                          "lr_hash": file_hash(out / "lr" / f"{pid}.png"),
                          "imported": True, "recipe": RECIPE, "notes": hr_notes + lr_notes,
                          "crop_box": [0, 0, hr.shape[1], hr.shape[0]]})
            made += 1
    finally:
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
