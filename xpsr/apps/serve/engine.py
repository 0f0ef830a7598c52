"""What `xpsr serve` does per request, without any web code: one loaded model, prompts for an upload, and one
measured super-resolution through :func:`xpsr.inference.pipeline.super_resolve`.

Kept apart from the Gradio page so it can be tested (and reused by another front end) without a server.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import torch
from PIL import Image

from xpsr.config import CaptionConfig, DemoConfig, InferConfig, ServeConfig, load_config
from xpsr.config.loader import short
from xpsr.config.rules import SEED
from xpsr.data.images import ImageError, load_rgb, save_png_atomic
from xpsr.errors import XPSRError
from xpsr.inference.limits import check_size
from xpsr.inference.pipeline import output_size, super_resolve
from xpsr.models.build import DTYPES


class RequestError(XPSRError):
    """A problem with one upload or control value; its message is shown in the page as it is."""


@dataclass
class Settings:
    """How the model is run, fixed at startup: what the weights were trained for unless the serve config says
    otherwise (``source`` names where each value came from, for the page)."""

    mode: str = "multistep"
    onestep_timestep: int | None = None
    lr_latent: str = "sample"
    source: dict[str, str] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        where = ", ".join(f"{k} from {v}" for k, v in self.source.items())
        if self.mode == "onestep":
            text = f"one-step (t*={self.onestep_timestep}, LR latent {self.lr_latent}; steps and guidance unused)"
        else:
            text = f"multi-step (LR latent {self.lr_latent})"
        return text + (f" [{where}]" if where else "")


def trained_settings(weights: str | None) -> dict:
    """What a run, checkpoint or `xpsr export` folder was trained for: ``{"mode", "onestep_timestep",
    "lr_latent"}`` for a one-step student, ``{"mode": "multistep"}`` for other weights, ``{}`` for the fresh
    model. Read by the inference layer's reader, the one `xpsr infer` and ``XPSRPipeline`` use."""
    from xpsr.inference.trained_settings import trained_settings as read_trained

    if not weights:
        return {}
    settings = read_trained(weights)
    if not settings.is_student:
        return {"mode": "multistep"}
    return {"mode": "onestep", "onestep_timestep": settings.onestep_timestep, "lr_latent": settings.lr_latent}


def resolve_settings(cfg: ServeConfig, trained: dict, student_timestep: int | None) -> Settings:
    """The serve config's mode/onestep_timestep/lr_latent over what the weights were trained for; refuses the
    combinations that give a wrong picture without an error (a student's LoRA under the multi-step sampler,
    weights trained for that sampler run in one step). ``student_timestep``: set when the loaded UNet still
    carries a student's LoRA (a run dir), which says one-step even when no training config is found."""
    if student_timestep is not None and not trained:
        trained = {"mode": "onestep", "onestep_timestep": student_timestep}
    from xpsr.config import OneStepConfig
    from xpsr.inference.trained_settings import MULTISTEP_LR_LATENT

    chosen, source = {}, {}
    mode = cfg.mode or trained.get("mode", "multistep")
    # what weights that do not say are run with: as `xpsr infer` and the pipeline (xpsr.inference.trained_settings)
    student = OneStepConfig()
    fallbacks = {"mode": "multistep", "onestep_timestep": student.timestep,
                 "lr_latent": student.lr_latent if mode == "onestep" else MULTISTEP_LR_LATENT}
    for key, fallback in fallbacks.items():
        value = getattr(cfg, key)
        chosen[key], source[key] = (value, "the serve config") if value is not None else \
            (trained[key], "the weights") if key in trained else (fallback, "the default")
    if chosen["mode"] == "multistep" and trained.get("mode") == "onestep":
        raise RequestError(f"weights={cfg.weights} are a one-step student (trained with onestep.enabled=true): "
                           "mode=multistep would run every step of the multi-step sampler through its LoRA. Leave "
                           "mode unset (the weights' mode) or serve the teacher's weights")
    if chosen["mode"] == "onestep" and trained.get("mode") == "multistep":
        raise RequestError(f"mode=onestep: weights={cfg.weights} were trained for the multi-step sampler (no "
                           "onestep section in their training config); serve a one-step student, or leave mode "
                           "unset")
    if chosen["mode"] == "multistep":
        chosen["onestep_timestep"] = None
        source.pop("onestep_timestep")
    source = {k: v for k, v in source.items() if v != "the default"}
    return Settings(source=source, **chosen)


def _whole(name: str, value, low: int, high: int) -> int:
    """A control that must be a whole number in [low, high] (2.7 steps is refused, not truncated to 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    try:  # ints are compared as they are: a float of 10**400 would overflow
        number = value if isinstance(value, int) else float(value)
    except (ValueError, OverflowError):
        raise RequestError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(number, float) and not number.is_integer():
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise RequestError(f"{name} must be between {low} and {high:,}, got {short(value)}")
    return int(number)


def parse_controls(steps, guidance, seed, color_fix, upscale, tiled, tile_px) -> Controls:
    """The controls of one request as the page or an API client sent them, checked: whole numbers stay whole
    (no silent truncation), the seed within what every RNG here takes ([0, 2**32 - 1]; -1 is not "random":
    the same seed must give the same bytes, so a random seed would have to be reported, and it is refused)."""
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise RequestError(f"guidance must be a number, got {guidance!r}") from None
    if not (1.0 <= guidance <= 30.0):
        raise RequestError(f"guidance must be between 1 and 30, got {guidance!r}")
    if not isinstance(tiled, bool):
        raise RequestError(f"tiled must be true or false, got {tiled!r}")
    return Controls(steps=_whole("steps", steps, 1, 1000), guidance=guidance,
                    seed=_whole("seed", seed, SEED["min"], SEED["max"]), color_fix=color_fix,
                    upscale=_whole("upscale", upscale, 1, 8), tiled=tiled, tile_px=_whole("tile_px", tile_px, 64, 8192))


@dataclass
class Controls:
    """The values of the page's controls for one request."""

    steps: int
    guidance: float
    seed: int
    color_fix: str
    upscale: int
    tiled: bool
    tile_px: int


@dataclass
class Result:
    sr: np.ndarray            # RGB uint8, input size x upscale
    before: np.ndarray        # the input enlarged with bicubic to the same size, for the slider
    png: Path                 # the SR image written for download
    prompts: dict[str, str]   # every text the model saw
    seconds: float
    peak_rss_mb: float        # process RSS, highest of samples every 10 ms during the request
    cuda_peak_mb: float | None
    notes: list[str]
    mode: str = ""            # how the model ran (Settings.describe)


def infer_config(cfg: ServeConfig, controls: Controls, height: int, width: int,
                 settings: Settings | None = None) -> tuple[InferConfig, list[str]]:
    """The InferConfig of one request (controls over the serve defaults, the model's ``settings``) and notes on
    what was changed."""
    settings = settings or resolve_settings(cfg, {}, None)
    if not 1 <= int(controls.upscale) <= 8:
        raise RequestError(f"upscale must be between 1 and 8, got {controls.upscale}")
    if not 1 <= int(controls.steps) <= 1000:
        raise RequestError(f"steps must be between 1 and 1000, got {controls.steps}")
    if controls.color_fix not in ("adain", "wavelet", "none"):
        raise RequestError(f"colour fix must be adain, wavelet or none, got {controls.color_fix!r}")
    tile = max(int(controls.tile_px) // 8, 8)
    icfg = InferConfig(
        input="<upload>", output_dir="<upload>", model=cfg.model, weights=cfg.weights,
        scheduler=cfg.scheduler, num_inference_steps=int(controls.steps), guidance_scale=float(controls.guidance),
        start_from=cfg.start_from, added_noise_level=cfg.added_noise_level,
        color_fix=controls.color_fix, seed=int(controls.seed), upscale=int(controls.upscale),
        process_size=cfg.process_size, dtype=cfg.dtype, device=cfg.device, prompts="fixed",
        latent_tile=tile, latent_overlap=min(cfg.latent_overlap, tile // 2), vae_tile=cfg.vae_tile,
        mode=settings.mode, onestep_timestep=settings.onestep_timestep, lr_latent=settings.lr_latent,
        max_output_pixels=cfg.max_output_pixels, max_process_pixels=cfg.max_process_pixels)
    notes = []
    _, (ph, pw) = output_size(height, width, icfg)
    if not controls.tiled:
        if max(ph, pw) > cfg.untiled_max_side:
            notes.append(f"tiling kept on: the processing size {pw}x{ph} is above untiled_max_side="
                         f"{cfg.untiled_max_side} px")
        else:
            icfg = dataclasses.replace(icfg, latent_tile=0, vae_tile=0)
    return icfg, notes


class SizeLimits(NamedTuple):
    """What :func:`xpsr.inference.limits.check_size` reads: the limits of `xpsr infer`, for one request."""

    upscale: int
    process_size: int
    max_output_pixels: int
    max_process_pixels: int


def size_limits(cfg: ServeConfig, upscale: int) -> SizeLimits:
    return SizeLimits(upscale, cfg.process_size, cfg.max_output_pixels, cfg.max_process_pixels)


def check_upload(path: str | Path, limits: SizeLimits, name: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode an upload as RGB uint8, refusing empty, unreadable and too large files with a readable message.

    The size limits (the same check and message as `xpsr infer` and ``XPSRPipeline``) are checked from the
    header, so a huge image is refused before it is decoded."""
    path = Path(path)
    name = name or path.name
    if not path.is_file() or path.stat().st_size == 0:
        raise RequestError(f"{name}: the file is empty")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise RequestError(f"{name}: the image is far too large (limit: output of at most "
                           f"{limits.max_output_pixels:,} pixels)") from None
    except (OSError, SyntaxError, ValueError):
        raise RequestError(f"{name}: not an image this app can read (PNG, JPEG, WebP, BMP or TIFF)") from None
    check_size(name, height, width, limits)
    try:
        return load_rgb(path)
    except ImageError as e:
        raise RequestError(f"{name}: {str(e).split(': ', 1)[-1]}") from None


class PeakRSS:
    """Highest resident memory of this process while the block runs, sampled every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _safe_stem(name: str) -> str:
    """A file stem made of safe characters only, so a crafted upload name cannot leave the output folder."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem)[:60] or "image"


def with_demo_model(cfg: ServeConfig, demo_dir: str | Path | None = None) -> tuple[ServeConfig, str]:
    """(config, the page's model line). A bare `xpsr serve` (no weights, the tiny base) serves the model that
    `xpsr demo` trained when the demo's output folder is in the working directory (``demo_dir``), with the
    demo's sampler for the settings left at their defaults; otherwise it says plainly that the model is random."""
    if cfg.weights or cfg.model.base != "tiny":
        return cfg, f"`{cfg.weights or cfg.model.base}`"
    demo = DemoConfig()
    out = Path(demo_dir or demo.output_dir).resolve()
    run, prior = out / "run", out / "prior"
    if not ((run / "final" / "trained.safetensors").is_file() and (prior / "prior.json").is_file()):
        return cfg, ("a fresh tiny model with **random weights: its output is noise**. Run `xpsr demo` in this "
                     "folder first (the app then serves the model it trained), or pass `weights=RUN_OR_EXPORT`")
    defaults = ServeConfig()
    sampler = {"scheduler": "ddim", "num_inference_steps": demo.inference_steps, "guidance_scale": demo.guidance_scale,
               "process_size": demo.crop_size, "start_from": demo.start_from,
               "added_noise_level": demo.added_noise_level}
    kept = {k: v for k, v in sampler.items() if getattr(cfg, k) == getattr(defaults, k)}
    cfg = dataclasses.replace(cfg, weights=str(run), model=dataclasses.replace(demo.model, base=str(prior)), **kept)
    return cfg, (f"the model `xpsr demo` trained (`{run}`): a tiny model trained on six bundled photos, to try the "
                 "app; not the paper's quality")


class Engine:
    """The model loaded once; requests must come one at a time (the web app queues them)."""

    def __init__(self, cfg: ServeConfig, output_dir: Path):
        from xpsr.inference.run import load_modules

        cfg, self.model_line = with_demo_model(cfg)
        if not 1 <= cfg.upscale <= 8:
            raise RequestError(f"upscale={cfg.upscale}: the app offers 1 to 8")
        # a wrong caption config fails now, not at the first upload; the captioner itself is built on first use
        self._caption_cfg = self._check_caption_config(cfg.content_captioner) if cfg.content_captioner else None
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if want_cuda else cfg.device if cfg.device != "auto" else "cpu")
        self.modules = load_modules(InferConfig(input="<upload>", output_dir=str(output_dir), model=cfg.model,
                                                weights=cfg.weights))
        # what the weights were trained for travels with them: a one-step student is served in one step
        from xpsr.inference.trained_settings import settings_of

        self.settings = resolve_settings(cfg, trained_settings(cfg.weights), settings_of(self.modules).onestep_timestep)
        for m in (self.modules.unet, self.modules.controlnet, self.modules.vae, self.modules.text_encoder):
            m.to(self.device).eval()
            if cfg.dtype != "fp32":
                m.to(dtype=DTYPES[cfg.dtype])
        from xpsr.inference.low_memory import apply_low_memory

        apply_low_memory(self.modules, cfg.weights_storage, cfg.offload, cfg.dtype, self.device)
        self._captioner = None
        self._counter = itertools.count(1)

    @staticmethod
    def _check_caption_config(path: str) -> CaptionConfig:
        ccfg = load_config(CaptionConfig, path, ["images=<upload>", "cache=<none>"])
        if ccfg.kind != "content":
            raise RequestError(f"content_captioner={path} writes {ccfg.kind} prompts; give a caption config "
                               "with kind: content")
        return ccfg

    def _content_captioner(self):
        """The configured content captioner, built on first use (an MLLM takes a while to load)."""
        if self._captioner is None:
            from xpsr.captions.run import make_captioner

            self._captioner = make_captioner(self._caption_cfg, str(self.device))
        return self._captioner

    def prompts(self, lr: np.ndarray) -> tuple[str, str]:
        """(quality prompt from the offline heuristic, content prompt from the configured captioner or '')."""
        from xpsr.captions.heuristic import describe, measure

        quality = describe(measure(lr))
        content = self._content_captioner().caption([lr])[0] if self.cfg.content_captioner else ""
        return quality, content

    def run_video(self, path: str | Path, name: str, content: str, quality: str, controls: Controls):
        """Super-resolve the first ``max_video_frames`` frames of an uploaded clip (a
        :class:`xpsr.apps.serve.video.VideoResult`; the output clip in a new folder under ``output_dir``)."""
        from xpsr.apps.serve.video import run_video

        return run_video(self, path, name, content, quality, controls)

    def run(self, path: str | Path, name: str, content: str, quality: str, controls: Controls) -> Result:
        """Super-resolve one upload; an empty quality prompt is filled by the heuristic."""
        lr, notes = check_upload(path, size_limits(self.cfg, controls.upscale), name)
        icfg, tiling_notes = infer_config(self.cfg, controls, lr.shape[0], lr.shape[1], self.settings)
        if not quality.strip():
            from xpsr.captions.heuristic import describe, measure

            quality = describe(measure(lr))
            notes.append("empty quality prompt: filled by the heuristic")
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with PeakRSS() as rss:
            sr = super_resolve(self.modules, lr, content, quality, icfg, self.device)
        seconds = time.perf_counter() - start
        png = self.output_dir / f"{_safe_stem(name)}_xpsr_x{icfg.upscale}_{next(self._counter):04d}.png"
        save_png_atomic(sr, png)
        before = np.asarray(Image.fromarray(lr).resize((sr.shape[1], sr.shape[0]), Image.BICUBIC))
        prompts = {"content": f"{content.strip()} {icfg.added_prompt}".strip(), "quality": quality,
                   "negative content": icfg.negative_prompt, "negative quality": icfg.negative_quality_prompt}
        return Result(sr=sr, before=before, png=png, prompts=prompts, seconds=seconds,
                      peak_rss_mb=rss.peak / 2**20,
                      cuda_peak_mb=torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None,
                      notes=notes + tiling_notes, mode=self.settings.describe())
