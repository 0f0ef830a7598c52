"""Side-by-side crops of several runs' SR outputs (and the HR): the picture an ablation table needs.

Images are chosen where the runs disagree most on a per-image metric (or simply the first ones), and in
each image the crop is placed where the runs' outputs differ most, so the grid shows what the numbers
summarise rather than flat sky.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xpsr.data.images import load_rgb
from xpsr.metrics.evaluate import LOWER_BETTER, recorded_folder

LABEL_H = 16


class NoVisualData(ValueError):
    """An eval folder lacks what the grid needs (summary.json settings, metrics.csv, the SR folder)."""


def _run_data(run: str | Path) -> tuple[Path, Path | None, dict[str, dict[str, str]]]:
    run = Path(run)
    summary, table = run / "summary.json", run / "metrics.csv"
    if not summary.is_file() or not table.is_file():
        raise NoVisualData(f"{run} has no summary.json/metrics.csv (an `xpsr eval` output folder is needed)")
    settings = json.loads(summary.read_text()).get("settings", {})
    sr, why = recorded_folder(summary, settings, "sr")
    if sr is None:
        raise NoVisualData(why)
    hr = recorded_folder(summary, settings, "hr")[0] if settings.get("hr") else None
    with open(table, newline="") as f:
        rows = {r["image"]: {k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)}
    return sr, hr, rows


def pick_images(per_run: dict[str, dict[str, dict[str, str]]], count: int, metric: str | None) -> list[str]:
    """``count`` images every run has: the largest spread of ``metric`` across runs first (else name order)."""
    common = sorted(set.intersection(*(set(rows) for rows in per_run.values())))
    if metric and all(metric in rows[name] for rows in per_run.values() for name in common):
        spread = {name: float(np.std([float(rows[name][metric]) for rows in per_run.values()])) for name in common}
        common.sort(key=lambda name: -spread[name])
    return common[:count]


def busiest_window(images: list[np.ndarray], size: int) -> tuple[int, int]:
    """Top-left (y, x) of the size x size window where the images differ most from each other."""
    stack = np.stack([im.astype(np.float32).mean(axis=2) for im in images])
    diff = stack.std(axis=0) if len(images) > 1 else np.abs(np.gradient(stack[0])[0])
    h, w = diff.shape
    if size >= h and size >= w:
        return 0, 0
    sy, sx = min(size, h), min(size, w)
    integral = np.pad(diff, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = integral[sy:, sx:] - integral[:-sy, sx:] - integral[sy:, :-sx] + integral[:-sy, :-sx]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def visual_comparison(runs: dict[str, str | Path], path: str | Path, count: int = 4, crop: int = 192,
                      metric: str | None = "lpips") -> Path:
    """PNG grid: one row per chosen image, columns HR (when known) then each run; each cell is labelled
    with the run and its per-image ``metric``."""
    data = {label: _run_data(run) for label, run in runs.items()}
    per_run = {label: rows for label, (_, _, rows) in data.items()}
    names = pick_images(per_run, count, metric)
    if not names:
        counts = ", ".join(f"{label}: {len(rows)}" for label, rows in per_run.items())
        raise NoVisualData(f"the runs' metrics.csv files have no image name in common (images per run: {counts})")
    hr_dir = next((hr for _, hr, _ in data.values() if hr is not None), None)
    columns = (["HR"] if hr_dir else []) + list(runs)
    cells: list[list[Image.Image]] = []
    for name in names:
        srs = [load_rgb(data[label][0] / name)[0] for label in runs]
        hr = load_rgb(hr_dir / name)[0] if hr_dir and (hr_dir / name).is_file() else None
        y, x = busiest_window(srs, crop)
        row = []
        for label, image in zip(columns, ([hr] if hr_dir else []) + srs):
            if image is None:
                image = np.zeros_like(srs[0])
            piece = Image.fromarray(image[y:y + crop, x:x + crop]).resize((crop, crop), Image.NEAREST)
            text = f"HR {Path(name).stem}" if label == "HR" else label
            if label in per_run and metric and metric in per_run[label][name]:
                arrow = "v" if metric in LOWER_BETTER else "^"  # the default bitmap font has no arrows
                text += f"  {metric}{arrow} {float(per_run[label][name][metric]):.3f}"
            cell = Image.new("RGB", (crop, crop + LABEL_H), "white")
            cell.paste(piece, (0, LABEL_H))
            ImageDraw.Draw(cell).text((3, 2), text, fill="black")
            row.append(cell)
        cells.append(row)
    pad = 4
    grid = Image.new("RGB", (len(columns) * (crop + pad) + pad, len(names) * (crop + LABEL_H + pad) + pad), "white")
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            grid.paste(cell, (pad + j * (crop + pad), pad + i * (crop + LABEL_H + pad)))
    path = Path(path)
    grid.save(path)
    return path
