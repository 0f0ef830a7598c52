#!/usr/bin/env python
"""How much the USM order changes the LR images: the same pairs (same seed, same draws) made twice.

    python scripts/compare_usm_order.py --out /tmp/usm_order [key=value ...]

Writes scikit-image sample photos to OUT/src (or takes `inputs=[DIR]`), runs `prepare` with
configs/data/xpsr.yaml once as the official (USM, then degrade the sharpened crop) and once in the old
order (`degradation.degrade_sharpened=false`: degrade the plain crop), and prints per pair and overall
the mean absolute LR difference on the 0-255 scale and the PSNR between the two LR images.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from xpsr.config import PrepareConfig, load_config
from xpsr.data.manifest import read_manifest
from xpsr.data.pairs import prepare_pairs

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"]


def _sample_photos(folder: Path) -> Path:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(folder / f"{name}.png")
    return folder


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    args, overrides = parser.parse_known_args(argv)
    if not any(o.startswith("inputs=") for o in overrides):
        overrides = [f"inputs=[{_sample_photos(args.out / 'src')}]", *overrides]
    lrs = {}
    for name, extra in (("usm_then_degrade", []), ("degrade_then_usm", ["degradation.degrade_sharpened=false"])):
        cfg = load_config(PrepareConfig, REPO / "configs" / "data" / "xpsr.yaml",
                          [*overrides, f"output_dir={args.out / name}", *extra])
        prepare_pairs(cfg)
        lrs[name] = {r["id"]: np.asarray(Image.open(args.out / name / r["lr"]), dtype=np.float64)
                     for r in read_manifest(args.out / name / "manifest.jsonl")}
    rows = []
    for pid, new in sorted(lrs["usm_then_degrade"].items()):
        diff = new - lrs["degrade_then_usm"][pid]
        mse = float((diff**2).mean())
        rows.append({"id": pid, "mean_abs": float(np.abs(diff).mean()),
                     "psnr": 10 * np.log10(255**2 / mse) if mse > 0 else float("inf")})
    all_mse = np.mean([((lrs["usm_then_degrade"][r["id"]] - lrs["degrade_then_usm"][r["id"]]) ** 2).mean()
                       for r in rows])
    summary = {"pairs": len(rows), "mean_abs_0_255": float(np.mean([r["mean_abs"] for r in rows])),
               "psnr_db_pooled": float(10 * np.log10(255**2 / all_mse)),
               "psnr_db_median": float(np.median([r["psnr"] for r in rows])), "per_pair": rows}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
