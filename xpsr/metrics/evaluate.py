"""`xpsr eval`: SR folder vs HR folder; per-image CSV, summary.json, Markdown table.

PSNR/SSIM are computed by our own code (`psnr_ssim.py`) on the Y channel of BT.601 YCbCr ([16, 235]), as
SR papers do, with a configurable border crop (0 = the official setting); they need no pyiqa. Every other
metric comes from pyiqa, an optional extra (`pip install -e ".[metrics]"`) because of its non-commercial
licence; it is imported only when such a metric is asked for.
Per-image results are cached, so a re-run adds only new images or metrics.
"""
from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from xpsr.config import EvalConfig
from xpsr.data.images import IMAGE_SUFFIXES, ImageError, file_hash, list_images, load_rgb
from xpsr.errors import XPSRError, shown
from xpsr.metrics.psnr_ssim import psnr_y, ssim_y
from xpsr.metrics.weights import MissingMetricWeights, offline_weights, weights_dir

OWN_METRICS = {"psnr", "ssim"}  # computed by psnr_ssim.py; every other metric needs pyiqa
FULL_REFERENCE = {"psnr", "ssim", "lpips", "dists"}
NO_REFERENCE = {"niqe", "maniqa", "maniqa-pipal", "maniqa-kadid", "clipiqa", "musiq"}
FOLDER_LEVEL = {"fid"}
LOWER_BETTER = {"lpips", "dists", "fid", "niqe"}
# what each name means here (the variant matters for comparisons)
VARIANTS = {
    "psnr": "xpsr psnr_y, Y of BT.601 YCbCr (pyiqa's convention)",
    "ssim": "xpsr ssim_y, Y of BT.601 YCbCr, 11x11 Gaussian sigma 1.5 (pyiqa's convention)",
    "lpips": "pyiqa lpips (AlexNet, v0.1)", "dists": "pyiqa dists", "fid": "pyiqa fid (folder vs folder)",
    "niqe": "pyiqa niqe", "maniqa": "pyiqa maniqa (KonIQ-10k weights; the official XPSR test.py's choice)",
    "maniqa-pipal": "pyiqa maniqa-pipal (PIPAL weights; SeeSR's choice, per its maintainers)",
    "maniqa-kadid": "pyiqa maniqa-kadid (KADID-10k weights)", "clipiqa": "pyiqa clipiqa",
    "musiq": "pyiqa musiq (KonIQ-10k weights)",
}


def pair_images(sr_dir: Path, hr_dir: Path | None) -> list[tuple[Path, Path | None]]:
    """SR <-> HR by sorted relative name (stems; extensions may differ)."""
    srs = list_images([sr_dir])
    if hr_dir is None:
        return [(p, None) for p in srs]
    hrs = list_images([hr_dir])
    if len(srs) != len(hrs):
        raise ValueError(f"{len(srs)} SR images in {sr_dir} but {len(hrs)} HR images in {hr_dir}")
    return list(zip(srs, hrs))


def _bare(path: Path, root: Path) -> str:
    """Relative name without image suffixes: ``sub/x.jpg.png`` (an `xpsr infer` output of ``x.jpg``) -> ``sub/x``."""
    rel = path.relative_to(root)
    while rel.suffix.lower() in IMAGE_SUFFIXES:
        rel = rel.with_suffix("")
    return rel.as_posix()


def differently_named(pairs, sr_dir: Path, hr_dir: Path | None) -> list[str]:
    """Pairs whose names differ beyond the suffix (fine for sets named ``_LR4``/``_HR``, a sign of a missing
    or extra file otherwise); recorded in summary.json and printed, so a shifted pairing is not silent."""
    if hr_dir is None:
        return []
    return [f"{shown(s.relative_to(sr_dir))} <-> {shown(h.relative_to(hr_dir))}" for s, h in pairs
            if _bare(s, sr_dir) != _bare(h, hr_dir)]


def _load(path: Path):
    """An image for scoring; a decompression bomb is an :class:`ImageError` naming the file, like a damaged one."""
    from PIL import Image

    try:
        return load_rgb(path)[0]
    except Image.DecompressionBombError as e:
        raise ImageError(f"{shown(path)}: over Pillow's decompression-bomb limit ({e})") from e


METRICS_EXTRA = 'pip install -e ".[metrics]"'
# one image pair (HxWx3 uint8 RGB; HR is None for no-reference metrics) -> score
ImageMetric = Callable[[np.ndarray, "np.ndarray | None"], float]


class MetricsExtraMissing(XPSRError):
    """A metric that only pyiqa provides was asked for, and pyiqa is not installed."""

    def __init__(self, metric: str):
        super().__init__(f"metric '{metric}' needs pyiqa, which the core install leaves out: {METRICS_EXTRA} "
                         "(pyiqa is licensed PolyForm Noncommercial 1.0.0; psnr and ssim work without it)")


def import_pyiqa(metric: str):
    """pyiqa, or a one-line error naming the extra to install (a broken pyiqa install still raises as is)."""
    try:
        import pyiqa
    except ModuleNotFoundError as e:
        if e.name != "pyiqa":
            raise
        raise MetricsExtraMissing(metric) from e
    return pyiqa


def create_pyiqa_metric(name: str, cfg: EvalConfig, device: torch.device):
    """pyiqa's metric object, its weights read from ``weights_dir`` only (see weights.py)."""
    pyiqa = import_pyiqa(name)
    folder = weights_dir(cfg.weights_dir)
    try:
        with offline_weights(name, folder):
            return pyiqa.create_metric(name, device=device, as_loss=False)
    except MissingMetricWeights:
        raise
    except OSError as e:  # e.g. a hub lookup refused offline
        raise MissingMetricWeights(name, str(e).splitlines()[0], folder) from e


def create_metric(name: str, cfg: EvalConfig, device: torch.device) -> ImageMetric:
    """A per-image metric: PSNR/SSIM from our own code (on the CPU, float64), the rest from pyiqa."""
    if name == "psnr":
        return lambda sr, hr: psnr_y(sr, hr, cfg.crop_border)
    if name == "ssim":
        return lambda sr, hr: ssim_y(sr, hr, cfg.crop_border)
    metric = create_pyiqa_metric(name, cfg, device)

    def score(sr: np.ndarray, hr: np.ndarray | None) -> float:
        inputs = [_to_tensor(sr, device)] + ([] if hr is None else [_to_tensor(hr, device)])
        with torch.no_grad():
            return float(metric(*inputs).item())

    return score


def _to_tensor(img: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div(255).to(device)


def check_metrics(metrics: list[str], has_hr: bool) -> None:
    """Refuse unknown names, reference metrics without HR, and pyiqa metrics without pyiqa, before any work."""
    unknown = [m for m in metrics if m not in FULL_REFERENCE | NO_REFERENCE | FOLDER_LEVEL]
    if unknown:
        known = sorted(FULL_REFERENCE | NO_REFERENCE | FOLDER_LEVEL)
        raise ValueError(f"unknown metrics {unknown}; choose from {known}")
    needs_hr = [m for m in metrics if m in FULL_REFERENCE | FOLDER_LEVEL]
    if needs_hr and not has_hr:
        raise ValueError(f"metrics {needs_hr} need hr=DIR")
    needs_pyiqa = [m for m in metrics if m not in OWN_METRICS]
    if needs_pyiqa:
        import_pyiqa(needs_pyiqa[0])


def _score_all(name, pairs, cache: dict, cache_key, metrics: dict, cfg: EvalConfig, device) -> None:
    """Score every pair not in ``cache`` with metric ``name`` (created on first use)."""
    for sr_path, hr_path in tqdm(pairs, desc=f"eval {name}", unit="img"):
        key = cache_key(name, sr_path, hr_path)
        if key in cache:
            continue
        if name not in metrics:
            metrics[name] = create_metric(name, cfg, device)
        sr, hr = _load(sr_path), None
        if name in FULL_REFERENCE:
            hr = _load(hr_path)
            if hr.shape != sr.shape:
                raise ValueError(f"size mismatch: SR {shown(sr_path.name)} is {sr.shape[1]}x{sr.shape[0]}, "
                                 f"HR {shown(hr_path.name)} is {hr.shape[1]}x{hr.shape[0]}")
        try:
            cache[key] = metrics[name](sr, hr)
        except ValueError as e:  # e.g. an image too small for SSIM's window after the border crop
            raise ValueError(f"{name} of {shown(sr_path.name)}: {e}") from e


def _read_score_cache(path: Path) -> dict:
    """Per-image scores of earlier runs; a damaged file (edited, truncated by a copy) is only a lost cache."""
    if not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cache, dict) and all(isinstance(v, (int, float)) for v in cache.values()):
            return cache
        problem = "not a mapping of scores"
    except (ValueError, UnicodeDecodeError) as e:
        problem = str(e)
    print(f"eval: ignoring the damaged score cache {shown(path)} ({problem}); every score is recomputed")
    return {}


def evaluate(cfg: EvalConfig) -> dict:
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    sr_dir, hr_dir, out = Path(cfg.sr), Path(cfg.hr) if cfg.hr else None, Path(cfg.output_dir)
    check_metrics(cfg.metrics, has_hr=hr_dir is not None)
    out.mkdir(parents=True, exist_ok=True)
    pairs = pair_images(sr_dir, hr_dir)
    settings = {"crop_border": cfg.crop_border, "y_channel": "BT.601 YCbCr [16,235]"}
    cache_path = out / "metrics_cache.json"
    cache = _read_score_cache(cache_path)
    rows, start = [], time.perf_counter()
    metrics = {}
    settings_key = json.dumps(settings, sort_keys=True)
    hashes = {p: file_hash(p) for pair in pairs for p in pair if p is not None}  # each file read once
    renamed = differently_named(pairs, sr_dir, hr_dir)
    if renamed:
        print(f"eval: {len(renamed)} of {len(pairs)} SR/HR pairs have different names (paired by sorted order), "
              f"e.g. {renamed[0]}")

    def cache_key(name: str, sr_path: Path, hr_path: Path | None) -> str:
        return "|".join([name, hashes[sr_path], hashes[hr_path] if hr_path else "-", settings_key])

    try:
        for name in [m for m in cfg.metrics if m not in FOLDER_LEVEL]:
            _score_all(name, pairs, cache, cache_key, metrics, cfg, device)
    finally:  # the scores computed before a bad image stopped the run are kept for the rerun
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    summary: dict = {}
    for sr_path, hr_path in pairs:
        row = {"image": shown(sr_path.relative_to(sr_dir).as_posix())}
        for name in cfg.metrics:
            if name in FOLDER_LEVEL:
                continue
            row[name] = cache[cache_key(name, sr_path, hr_path)]
        rows.append(row)
    for name in cfg.metrics:
        if name in FOLDER_LEVEL:
            metric = create_pyiqa_metric(name, cfg, device)
            summary[name] = float(metric(str(sr_dir), str(hr_dir)))
        else:
            summary[name] = float(np.mean([r[name] for r in rows])) if rows else float("nan")
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image"] + [m for m in cfg.metrics if m not in FOLDER_LEVEL])
        writer.writeheader()
        writer.writerows(rows)
    summary_doc = {**summary, "settings": {**settings, "images": len(pairs), "sr": shown(sr_dir),
                                           "hr": shown(hr_dir) if hr_dir else None,
                                           **folder_records(out, sr=sr_dir, hr=hr_dir),
                                           "pairs_named_differently": len(renamed),
                                           "pairs_named_differently_first": renamed[:5],
                                           "variants": {m: VARIANTS[m] for m in cfg.metrics},
                                           "seconds": round(time.perf_counter() - start, 2)}}
    write_text_atomic(out / "summary.json", json.dumps(summary_doc, indent=2))
    write_text_atomic(out / "table.md", markdown_table({cfg.label or sr_dir.name: summary}, cfg.metrics))
    print(markdown_table({cfg.label or sr_dir.name: summary}, cfg.metrics))
    return summary_doc


def folder_records(out: Path, **folders: Path | None) -> dict[str, str]:
    """``KEY_absolute`` and ``KEY_from_summary`` (relative to the folder of summary.json) for each folder, so
    that `xpsr tables` finds it from any working directory, and after the tree is moved as a whole."""
    records = {}
    for key, folder in folders.items():
        if folder is not None:
            absolute = Path(os.path.abspath(folder))
            records[f"{key}_absolute"] = shown(absolute)
            records[f"{key}_from_summary"] = shown(Path(os.path.relpath(absolute, os.path.abspath(out))).as_posix())
    return records


def recorded_folder(summary_file: Path, settings: dict, key: str) -> tuple[Path | None, str]:
    """The ``sr``/``hr`` folder a summary.json names, found from any working directory: its absolute path, then
    the path relative to the summary, then the path as typed, from the working directory and from the
    summary's folder (summaries written before the first two were recorded). (folder, '') or (None, why)."""
    typed = settings.get(key)
    if not typed:
        return None, f"{shown(summary_file)} names no {key} folder"
    here = summary_file.parent
    candidates = [settings.get(f"{key}_absolute"),
                  here / settings[f"{key}_from_summary"] if settings.get(f"{key}_from_summary") else None,
                  Path(typed), here / typed]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(os.path.normpath(candidate)), ""
    return None, f"the {key} folder that {shown(summary_file)} names ({shown(typed)}) is not there"


def markdown_table(results: dict[str, dict[str, float]], metrics: list[str]) -> str:
    """One row per method/run, one column per metric (arrows say which way is better)."""
    titles = {"seconds_per_image": ("s/img", "↓")}  # the speed column of `xpsr tables`
    head = "| method | " + " | ".join(
        " ".join(titles.get(m, (m.upper(), '↓' if m in LOWER_BETTER else '↑'))) for m in metrics) + " |"
    lines = [head, "|" + " --- |" * (len(metrics) + 1)]
    for method, values in results.items():
        cells = []
        for m in metrics:
            v = values.get(m)
            cells.append("–" if v is None else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temp file and a rename: a run killed mid-write leaves the old file or none, never a
    half-written one (found by scripts/fault_injection.py: a kill left an empty summary.json)."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
