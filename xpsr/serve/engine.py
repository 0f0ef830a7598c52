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

import numpy as np
import psutil
import torch
from PIL import Image

from xpsr.config import CaptionConfig, InferConfig, ServeConfig, load_config
from xpsr.data.images import ImageError, load_rgb, save_png_atomic
from xpsr.errors import XPSRError
from xpsr.inference.pipeline import output_size, super_resolve
from xpsr.models.build import DTYPES


class RequestError(XPSRError):
    """A problem with one upload or control value; its message is shown in the page as it is."""


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


def infer_config(cfg: ServeConfig, controls: Controls, height: int, width: int) -> tuple[InferConfig, list[str]]:
    """The InferConfig of one request (controls over the serve defaults) and notes on what was changed."""
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
        color_fix=controls.color_fix, seed=int(controls.seed), upscale=int(controls.upscale),
        process_size=cfg.process_size, dtype=cfg.dtype, device=cfg.device, prompts="fixed",
        latent_tile=tile, latent_overlap=min(cfg.latent_overlap, tile // 2), vae_tile=cfg.vae_tile)
    notes = []
    _, (ph, pw) = output_size(height, width, icfg)
    if not controls.tiled:
        if max(ph, pw) > cfg.untiled_max_side:
            notes.append(f"tiling kept on: the processing size {pw}x{ph} is above untiled_max_side="
                         f"{cfg.untiled_max_side} px")
        else:
            icfg = dataclasses.replace(icfg, latent_tile=0, vae_tile=0)
    return icfg, notes


def check_upload(path: str | Path, upscale: int, max_output_pixels: int) -> tuple[np.ndarray, list[str]]:
    """Decode an upload as RGB uint8, refusing empty, unreadable and too large files with a readable message.

    The size limit is checked from the header, so a huge image is refused before it is decoded."""
    path = Path(path)
    name = path.name
    if not path.is_file() or path.stat().st_size == 0:
        raise RequestError(f"{name}: the file is empty")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise RequestError(f"{name}: the image is far too large (limit: output of at most "
                           f"{max_output_pixels:,} pixels)") from None
    except (OSError, SyntaxError, ValueError):
        raise RequestError(f"{name}: not an image this app can read (PNG, JPEG, WebP, BMP or TIFF)") from None
    out_pixels = width * height * upscale * upscale
    if out_pixels > max_output_pixels:
        raise RequestError(f"{name}: {width}x{height} at x{upscale} would give {out_pixels:,} output pixels; "
                           f"the limit is {max_output_pixels:,} (max_output_pixels). Upload a smaller image "
                           f"or lower the upscale factor.")
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


class Engine:
    """The model loaded once; requests must come one at a time (the web app queues them)."""

    def __init__(self, cfg: ServeConfig, output_dir: Path):
        from xpsr.inference.run import load_modules

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

    def run(self, path: str | Path, name: str, content: str, quality: str, controls: Controls) -> Result:
        """Super-resolve one upload; an empty quality prompt is filled by the heuristic."""
        lr, notes = check_upload(path, int(controls.upscale), self.cfg.max_output_pixels)
        icfg, tiling_notes = infer_config(self.cfg, controls, lr.shape[0], lr.shape[1])
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
                      notes=notes + tiling_notes)
