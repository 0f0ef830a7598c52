"""`xpsr infer`: a folder (or one image) of LR inputs -> SR outputs named like the inputs. Resumable.

Weights: our trained .safetensors (its stored model settings are used), a training run dir (final/),
an `xpsr export` folder (every part from it), an exported unet/controlnet folder, or an official XPSR
folder (imported). Per-image problems are reported in ``infer_report.json`` and skipped; several
processes split the inputs (accelerate).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from xpsr.config import InferConfig, ModelConfig, OneStepConfig
from xpsr.data.images import IMAGE_SUFFIXES, ImageError, file_hash, list_images, load_rgb, save_png_atomic
from xpsr.inference.pipeline import super_resolve
from xpsr.models.build import DTYPES, XPSRModules, build_xpsr, load_base


def _model_config_from(stored: dict, base: ModelConfig) -> ModelConfig:
    """The model settings a checkpoint was trained with; ``base`` (local SD folder) stays the user's."""
    section = stored.get("model", stored)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in section.items() if k in known}
    values.update(base=base.base, revision=base.revision)
    return ModelConfig(**values)


def load_modules(cfg: InferConfig) -> XPSRModules:
    """Build the model the ``weights`` need and load them."""
    from xpsr.models.checkpoint import load_exported, load_trained, read_config

    weights = Path(cfg.weights) if cfg.weights else None
    if weights is not None and weights.is_dir() and (weights / "final" / "trained.safetensors").is_file():
        weights = weights / "final" / "trained.safetensors"
    if weights is None:
        return build_xpsr(cfg.model)
    if weights.is_file():
        stored = read_config(weights)
        modules = build_xpsr(_model_config_from(stored, cfg.model))
        onestep = stored.get("onestep") or {}
        if onestep.get("enabled"):  # a one-step student: its adapters first, so the stored LoRA weights fit
            from xpsr.onestep.lora import FAKE, attach_onestep, drop_adapter

            ocfg = OneStepConfig(**{k: v for k, v in onestep.items() if k in OneStepConfig.__dataclass_fields__})
            attach_onestep(modules.unet, ocfg, stored.get("seed", 0))
            load_trained(weights, modules.unet, modules.controlnet)
            drop_adapter(modules.unet, FAKE)
            modules.onestep_timestep = ocfg.timestep
            return modules
        load_trained(weights, modules.unet, modules.controlnet)
        return modules
    if not weights.is_dir():
        raise FileNotFoundError(f"weights={weights} does not exist")
    if (weights / "model_index.json").is_file():  # `xpsr export` / save_pretrained: every part is in the folder
        from xpsr.inference.diffusers_pipeline import XPSRPipeline

        pipe = XPSRPipeline.from_pretrained(weights)
        return XPSRModules(unet=pipe.unet, controlnet=pipe.controlnet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                           tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, config=pipe.xpsr_config)
    if (weights / "controlnet" / "config.json").is_file() and "xpsr" in json.loads(
            (weights / "controlnet" / "config.json").read_text()):
        unet, controlnet, model_cfg = load_exported(weights)
    else:
        from xpsr.models.official import load_official

        unet, controlnet, model_cfg = load_official(weights)
    if cfg.model.base == "tiny":
        from xpsr.models.tiny import build_tiny_base

        parts = build_tiny_base(cfg.model.seed)
    else:
        parts = load_base(cfg.model.base, cfg.model.revision)
    return XPSRModules(unet=unet, controlnet=controlnet, vae=parts["vae"], text_encoder=parts["text_encoder"],
                       tokenizer=parts["tokenizer"], scheduler=parts["scheduler"], config=model_cfg)


def check_mode(modules: XPSRModules, cfg: InferConfig) -> None:
    """A one-step student's LoRA would silently change every step of the multi-step sampler: refuse that."""
    if cfg.mode == "multistep" and modules.onestep_timestep is not None:
        raise ValueError(f"weights={cfg.weights} are a one-step student (a run with onestep.enabled=true): "
                         "pass mode=onestep, or use the teacher's weights for the multi-step sampler")


class PromptSource:
    """Content and quality prompt of each input image (cache, heuristic fallback, or fixed)."""

    def __init__(self, cfg: InferConfig):
        self.cfg, self.cache = cfg, None
        if cfg.prompts == "cache":
            if cfg.cache is None:
                if not cfg.caption_missing:
                    raise ValueError("prompts=cache needs cache=FILE (or caption_missing=true, or prompts=fixed)")
            else:
                from xpsr.captions.cache import PromptCache

                if not Path(cfg.cache).is_file():
                    raise FileNotFoundError(f"prompt cache {cfg.cache} does not exist")
                self.cache = PromptCache(cfg.cache)

    def __call__(self, path: Path, pixels) -> tuple[str, str]:
        if self.cfg.prompts == "fixed":
            return self.cfg.prompt, self.cfg.quality_prompt
        h = file_hash(path)
        content = self.cache.lookup(h, "content") if self.cache else None
        quality = self.cache.lookup(h, "quality") if self.cache else None
        if quality is None or content is None:
            if not self.cfg.caption_missing:
                kind = "quality" if quality is None else "content"
                raise KeyError(f"no {kind} prompt for {path} in {self.cfg.cache}")
            from xpsr.captions.heuristic import describe, measure

            quality = quality if quality is not None else describe(measure(pixels))
            content = content or ""
        return content, quality

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def caption_inputs(cfg: InferConfig) -> InferConfig:
    """Run ``cfg.caption_first`` on the inputs (each process its shard, then all wait); returns ``cfg`` with
    the cache it wrote to."""
    import gc

    from accelerate import PartialState

    from xpsr.captions.run import run_captioning
    from xpsr.config import CaptionConfig, load_config

    cache = cfg.cache or str(Path(cfg.output_dir) / "prompts.sqlite")
    for path in cfg.caption_first:
        ccfg = load_config(CaptionConfig, path, [f"images={cfg.input}", f"cache={cache}", f"device={cfg.device}"])
        run_captioning(ccfg)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    PartialState().wait_for_everyone()
    return dataclasses.replace(cfg, cache=cache, prompts="cache")


def run_inference(cfg: InferConfig) -> dict:
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    src, out = Path(cfg.input), Path(cfg.output_dir)
    if src.is_file():
        if src.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"input {src} is not an image file")
        inputs, root = [src], src.parent
    else:
        inputs, root = list_images([src]), src
    out.mkdir(parents=True, exist_ok=True)
    if cfg.caption_first:
        cfg = caption_inputs(cfg)
    mine = inputs[state.process_index::state.num_processes]
    todo = [p for p in mine if not (out / p.relative_to(root)).with_suffix(".png").is_file()]
    modules = load_modules(cfg)
    check_mode(modules, cfg)
    for m in (modules.unet, modules.controlnet, modules.vae, modules.text_encoder):
        m.to(device).eval()
        if cfg.dtype != "fp32":
            m.to(dtype=DTYPES[cfg.dtype])
    prompts = PromptSource(cfg)
    errors, done, start = [], 0, time.perf_counter()
    try:
        for path in tqdm(todo, desc=f"infer [{state.process_index}/{state.num_processes}]", unit="img",
                         disable=not state.is_main_process):
            target = (out / path.relative_to(root)).with_suffix(".png")
            try:
                lr, _ = load_rgb(path)
                content, quality = prompts(path, lr)
                sr = super_resolve(modules, lr, content, quality, cfg, device)
                save_png_atomic(sr, target)
                done += 1
            except (ImageError, KeyError, ValueError, RuntimeError) as e:
                if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower():
                    raise
                errors.append({"input": str(path), "error": f"{type(e).__name__}: {e}"})
    finally:
        prompts.close()
    seconds = time.perf_counter() - start
    report = {"inputs": len(mine), "done": done, "skipped_existing": len(mine) - len(todo), "errors": errors,
              "seconds": round(seconds, 2), "seconds_per_image": round(seconds / done, 3) if done else None}
    (out / f"infer_report{'' if state.num_processes == 1 else f'.rank{state.process_index}'}.json").write_text(
        json.dumps(report, indent=2))
    print(f"infer: {done} images in {seconds:.1f}s, {report['skipped_existing']} already done, "
          f"{len(errors)} failed (see infer_report.json)")
    return report
