"""The stages under test: small inputs made from scikit-image photos, the `xpsr` command line of each,
and what of their outputs is per session (ignored when comparing) or a row key (checked for duplicates).

Sizes are chosen so the stage's own work, not just its imports, fills a good part of a run on a CPU.
Each stage writes everything under one output folder (``run``): comparing two folders compares runs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpsr.apps.faults.outputs import Rules

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "cat", "retina")


def _configs() -> Path:
    from xpsr.cli import CONFIG_DIR

    return CONFIG_DIR


def photo(name: str, width: int, height: int) -> np.ndarray:
    """A scikit-image sample photo (shipped offline) as RGB uint8, resized to ``width`` x ``height``."""
    import skimage.data
    from PIL import Image

    img = np.asarray(getattr(skimage.data, name)())
    img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3]
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


def _save(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@dataclass
class Stage:
    name: str
    summary: str  # what one run does, for the report
    make_inputs: Callable[[Path], None]  # writes the stage's inputs under the folder (once per campaign)
    argv: Callable[[Path, Path], list[str]]  # (inputs folder, output folder) -> `xpsr` arguments
    rules: Rules
    processes: int = 1  # > 1: launched with torchrun on this many CPU processes, and a kill hits one rank


# --------------------------------------------------------------------------------------------- prepare
def _prepare_inputs(folder: Path) -> None:
    for name in PHOTOS[:5]:
        _save(photo(name, 160, 128), folder / "sources" / f"{name}.png")
    import skimage.data
    from PIL import Image

    # a grayscale source: converted, so report.json has an entry to keep across sessions
    Image.fromarray(skimage.data.camera()).resize((128, 128)).save(folder / "sources" / "camera.png")


def _prepare_argv(inputs: Path, out: Path) -> list[str]:
    return ["prepare", "--config", str(_configs() / "data" / "xpsr.yaml"), f"inputs=[{inputs / 'sources'}]",
            f"output_dir={out}", "crop_size=64", "crops_per_image=2", "seed=0", "workers=0", "device=cpu"]


# --------------------------------------------------------------------------------------------- caption
def _caption_inputs(folder: Path) -> None:
    for name in PHOTOS:
        img = photo(name, 192, 192)
        for i, (y, x) in enumerate(((0, 0), (0, 96), (96, 0), (96, 96))):
            _save(np.ascontiguousarray(img[y:y + 96, x:x + 96]), folder / "images" / f"{name}-{i}.png")


def _caption_argv(inputs: Path, out: Path) -> list[str]:
    return ["caption", "--config", str(_configs() / "caption" / "heuristic_quality.yaml"),
            f"images={inputs / 'images'}", f"cache={out / 'prompts.sqlite'}", "batch_size=4", "device=cpu"]


# --------------------------------------------------------------------------------------------- infer
def _infer_inputs(folder: Path) -> None:
    for name in PHOTOS[:6]:
        _save(photo(name, 32, 24), folder / "lr" / f"{name}.png")


def _infer_argv(inputs: Path, out: Path) -> list[str]:
    return ["infer", "--config", str(_configs() / "infer" / "tiny_cpu.yaml"), f"input={inputs / 'lr'}",
            f"output_dir={out}", "seed=0"]


# --------------------------------------------------------------------------------------------- video
def _video_inputs(folder: Path) -> None:
    from xpsr.video.synthetic import panned_clip, write_clip

    folder.mkdir(parents=True, exist_ok=True)
    write_clip(folder / "clip.mp4", panned_clip("astronaut", 12, (24, 32), 1)[0], audio_seconds=0.5)


def _video_argv(inputs: Path, out: Path) -> list[str]:
    return ["infer", "--config", str(_configs() / "infer" / "tiny_cpu.yaml"), f"input={inputs / 'clip.mp4'}",
            f"output_dir={out}", "seed=0", "video.chunk_frames=3"]


# --------------------------------------------------------------------------------------------- eval
def _eval_inputs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        hr = photo(name, 160, 160)
        noisy = hr.astype(np.float64) + rng.normal(0, 8, hr.shape)
        _save(hr, folder / "hr" / f"{name}.png")
        _save(np.clip(noisy, 0, 255).round().astype(np.uint8), folder / "sr" / f"{name}.png")


def _eval_argv(inputs: Path, out: Path) -> list[str]:
    return ["eval", f"sr={inputs / 'sr'}", f"hr={inputs / 'hr'}", f"output_dir={out}", "metrics=[psnr,ssim]",
            "device=cpu"]


# --------------------------------------------------------------------------------------------- train
def _train_inputs(folder: Path) -> None:
    from xpsr.training.demo_data import make_demo_data

    make_demo_data(folder / "data", crop_size=64, seed=0)


def _train_argv(inputs: Path, out: Path) -> list[str]:
    # resume=latest in every run, the first included (nothing to resume then): the config saved in each
    # checkpoint is then the same in the straight and the resumed runs, so whole files compare byte for byte
    return ["train", "--config", str(_configs() / "train" / "tiny.yaml"), f"output_dir={out}", "demo_data=false",
            f"data.pairs=[{inputs / 'data' / 'pairs'}]", f"data.cache={inputs / 'data' / 'prompts.sqlite'}",
            "report_to=none", "validation.every=0", "seed=11", "max_steps=6", "checkpoint_every=1",
            "checkpoints_total_limit=null", "log_every=1", "resume=latest"]


def _train_ddp_argv(inputs: Path, out: Path) -> list[str]:
    # batch 1 per rank: the global batch and the data equal the `train` stage's (2 per step)
    return [*_train_argv(inputs, out), "batch_size=1", "max_steps=4", "device=cpu"]


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "12 pairs (64 px crops, x4) from 6 photos, one of them grayscale", _prepare_inputs,
          _prepare_argv, Rules(volatile={"report.json": ("stats.seconds", "stats.pairs_per_s", "stats.pairs_made",
                                                         "stats.pairs_skipped_as_done")},
                               unique={"manifest.jsonl": ("id",)})),
    Stage("caption", "heuristic quality prompts for 32 images of 96 px, 4 per transaction", _caption_inputs,
          _caption_argv, Rules(volatile={"prompts.sqlite": ("created",)},
                               unique={"prompts.sqlite": ("image_hash", "kind", "captioner", "question")})),
    Stage("infer", "a folder of 6 LR images (32x24) with the tiny random model, 4 DDIM steps", _infer_inputs,
          # the report describes its own session: what it made (counts, per-image records), its time, memory
          _infer_argv, Rules(volatile={"infer_report.json": ("seconds", "seconds_per_image", "done",
                                                             "skipped_existing", "peak_rss_mb", "images",
                                                             "truncated_prompts")})),
    Stage("video", "a 12-frame clip (32x24, with audio) in chunks of 3 frames, tiny random model, flow noise",
          _video_inputs, _video_argv,
          Rules(volatile={"clip.video_report.json": ("frames_made_this_run", "seconds_sr", "seconds_per_frame",
                                                     "seconds_encode", "peak_rss_mb"),
                          "video_report.json": ("seconds",)})),
    Stage("eval", "PSNR and SSIM of 8 image pairs (160 px)", _eval_inputs, _eval_argv,
          Rules(volatile={"summary.json": ("settings.seconds",)})),
    Stage("train", "6 steps of the tiny model, a checkpoint after every step (all kept)", _train_inputs,
          _train_argv, Rules(volatile={"logs/losses.jsonl": ("steps_per_s",)},
                             unique={"logs/losses.jsonl": ("step",)})),
    Stage("train-ddp", "4 steps of the tiny model on 2 CPU processes (torchrun, gloo), a checkpoint after every "
          "step; a kill hits one rank and the launcher must stop the job", _train_inputs, _train_ddp_argv,
          Rules(volatile={"logs/losses.jsonl": ("steps_per_s",)}, unique={"logs/losses.jsonl": ("step",)}),
          processes=2),
)}
