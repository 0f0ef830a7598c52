"""The ``manifest.jsonl`` of a pair folder: durable appends, torn-line repair, the report, recipe versions.

Shared by `prepare` (:mod:`xpsr.data.pairs`), the paired-set import (:mod:`xpsr.data.paired_import`)
and the dataset, so none of them has to import another.

Recipe versions. Every line `prepare` writes names the recipe that made its LR image:

- ``usm-then-degrade/v2`` — the crop is USM-sharpened and the *sharpened* crop is degraded (official
  ``utils_data/make_train.py``, Real-ESRGAN's ``realesrgan_model.py``); the default.
- ``degrade-then-usm/v2`` — the plain crop is degraded, only the saved HR is sharpened (ablation key
  ``degradation.degrade_sharpened=false``).
- ``no-usm/v2`` — no sharpening at all (``degradation.usm_gt=false``).
- ``imported`` — an existing paired set brought in with ``paired_hr``/``paired_lr``.

Lines without the field that hold a ``degradation`` record were written by the first recipe (the plain
crop degraded; stage-1 resize by explicit size; OpenCV JPEG): :func:`record_recipe` calls them ``.../v1``.
Lines without either (hand-made manifests) have no known recipe.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from xpsr.errors import XPSRError

RECIPE_VERSION = 2


class NothingUsableError(XPSRError, RuntimeError):
    """Not one input produced a pair."""


class RecipeMismatchError(XPSRError):
    """A pair folder holds pairs of another recipe than the one asked for."""


def recipe_name(usm_gt: bool, degrade_sharpened: bool, version: int = RECIPE_VERSION) -> str:
    """The recipe string `prepare` writes for these settings."""
    if not usm_gt:
        order = "no-usm"
    else:
        order = "usm-then-degrade" if degrade_sharpened else "degrade-then-usm"
    return f"{order}/v{version}"


def record_recipe(record: dict) -> str | None:
    """The recipe of one manifest line; ``.../v1`` for lines of the first recipe, None when unknown."""
    if "recipe" in record:
        return record["recipe"]
    if "degradation" in record:  # written by `prepare` before recipes were recorded: the plain crop degraded
        return recipe_name(bool(record.get("usm", True)), degrade_sharpened=False, version=1)
    return None


def is_old_recipe(recipe: str | None) -> bool:
    """True for recipes of an earlier `prepare` version than this one."""
    if recipe is None or "/v" not in recipe:
        return False
    return int(recipe.rsplit("/v", 1)[1]) < RECIPE_VERSION


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


def check_resume_recipe(manifest: Path, records: list[dict], recipe: str, extra: dict | None = None) -> None:
    """Refuse to append pairs of ``recipe`` (and ``extra`` settings) to a manifest made otherwise.

    A resumed run must not turn a folder into a mix of two recipes that nobody can tell apart later.
    """
    for r in records:
        found = record_recipe(r)
        if found is not None and found != recipe:
            raise RecipeMismatchError(
                f"{manifest} holds pairs made with recipe {found!r} (e.g. {r.get('id')}) but this run makes "
                f"{recipe!r}; write to a new output_dir, or delete the folder to regenerate it"
            )
        for key, value in (extra or {}).items():
            if found is not None and r.get(key, value) != value:
                raise RecipeMismatchError(
                    f"{manifest} holds pairs made with {key}={r.get(key)!r} (e.g. {r.get('id')}) but this run "
                    f"has {key}={value!r}; resume with the settings of that run (see its report.json) or write "
                    "to a new output_dir"
                )


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


def write_report(out: Path, entries: list[dict], stats: dict, config: dict) -> None:
    """``report.json``: stats, one entry per converted/skipped input, the resolved config (atomic write)."""
    report = {"stats": stats, "entries": entries, "config": config}
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
