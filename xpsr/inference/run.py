"""`xpsr infer`: a folder (or one image) of LR inputs -> SR outputs named like the inputs. Resumable.

Weights: our trained .safetensors (its stored model settings are used), a training run dir (final/),
an `xpsr export` folder (every part from it), an exported unet/controlnet folder, or an official XPSR
folder (imported).

Per-image problems (unreadable file, over a size limit, no prompt, out of memory) are recorded in
``infer_report.json`` and the run goes on; a full disk stops the run with a message naming the file; any other
exception is a bug: it is recorded in the report too, then raised, so it is never hidden. Several processes
share a folder: accelerate ranks split the inputs, and independent processes claim images one by one
(:mod:`xpsr.inference.claims`), so each image is done once and a kill costs only the images in flight.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
import unicodedata
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from xpsr.config import InferConfig, ModelConfig, OneStepConfig
from xpsr.data.images import IMAGE_SUFFIXES, ImageError, file_hash, list_images, load_rgb, save_png_atomic
from xpsr.errors import DiskFullError, XPSRError, is_disk_full, shown
from xpsr.inference.claims import FolderSession, release_claim, try_claim
from xpsr.inference.limits import SizeRefused, check_size, header_check, processing_sizes  # noqa: F401 - shared
from xpsr.inference.pipeline import content_prompt_used, super_resolve
from xpsr.inference.trained_settings import mark_student, resolve_settings, settings_of
from xpsr.models.build import DTYPES, XPSRModules, build_xpsr, load_base, vae_scale_factor


class MissingPrompt(XPSRError):
    """prompts=cache with caption_missing=false and no prompt for an input."""


# the per-image problems: recorded, then the run goes on (out of memory is added in `_is_per_image`)
PER_IMAGE_ERRORS = (ImageError, Image.DecompressionBombError, SizeRefused, MissingPrompt)


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
            mark_student(modules.unet, ocfg)  # t* and LR latent travel with the weights (trained_settings)
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


def check_mode(modules: XPSRModules, cfg: InferConfig) -> InferConfig:
    """``cfg`` with the mode, t* and LR latent the weights were trained under where it leaves them unset; the
    multi-step sampler on a one-step student (its LoRA would change every step) is refused."""
    return resolve_settings(cfg, dataclasses.replace(settings_of(modules), source=f"weights={cfg.weights}"))


class PromptSource:
    """Content and quality prompt of each input image (cache, heuristic fallback, or fixed), cleaned of
    characters the tokenizer cannot take (see :func:`clean_prompt`)."""

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
            return clean_prompt(self.cfg.prompt), clean_prompt(self.cfg.quality_prompt)
        h = file_hash(path)
        content = self.cache.lookup(h, "content") if self.cache else None
        quality = self.cache.lookup(h, "quality") if self.cache else None
        if quality is None or content is None:
            if not self.cfg.caption_missing:
                kind = "quality" if quality is None else "content"
                raise MissingPrompt(f"{shown(path)}: no {kind} prompt in {self.cfg.cache} (caption_missing=false)")
            from xpsr.captions.heuristic import describe, measure

            quality = quality if quality is not None else describe(measure(pixels))
            content = content or ""
        return clean_prompt(content), clean_prompt(quality)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def clean_prompt(text: str) -> str:
    """``text`` with control characters and unpaired surrogates (a non-UTF-8 command-line byte) replaced by
    spaces: CLIP's tokenizer treats whitespace runs as one space, but it cannot encode a surrogate, and control
    characters become unknown tokens that push the caption out of the 77-token window."""
    return "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in text)


def prompt_record(tokenizer, content: str, quality: str, cfg: InferConfig) -> dict:
    """What the model saw for one image: both prompts as encoded, their token counts, and which were truncated
    to the tokenizer's window (77 tokens for CLIP, start and end tokens included; the rest is dropped)."""
    used = {"content": content_prompt_used(content, cfg), "quality": quality}
    limit = tokenizer.model_max_length
    tokens = {k: len(tokenizer(v, truncation=False).input_ids) for k, v in used.items()}
    return {"prompts": used, "tokens": tokens, "truncated_to_tokens": limit,
            "truncated": [k for k, n in tokens.items() if n > limit]}


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


def plan_outputs(inputs: list[Path], root: Path, out: Path) -> tuple[dict[Path, Path], list[dict]]:
    """Output of each input, and report entries for inputs refused because of a name clash.

    An output is named like its input with the suffix ``.png`` (``sub/a.jpg`` -> ``sub/a.png``). When several
    inputs of one folder would get the same name (``x.png`` and ``x.jpg``), an input already named ``x.png``
    keeps it and the others keep their suffix: ``x.jpg`` -> ``x.jpg.png``. An output that still clashes (an
    input literally named ``x.jpg.png``) is refused and reported."""
    plain = {p: (out / p.relative_to(root)).with_suffix(".png") for p in inputs}
    groups: dict[Path, list[Path]] = defaultdict(list)
    for p in inputs:
        groups[plain[p]].append(p)
    targets = {}
    for target, members in groups.items():
        keepers = [m for m in members if m.suffix == ".png"] if len(members) > 1 else members
        for m in members:
            keep = len(keepers) == 1 and m == keepers[0]
            targets[m] = target if keep else (out / m.relative_to(root)).with_name(m.name + ".png")
    final, taken, clashes = {}, {}, []
    for p in inputs:
        if targets[p].resolve() == p.resolve():
            clashes.append({"input": shown(p), "error": "its output would overwrite the input itself; choose another "
                                                        "output_dir"})
            continue
        if targets[p] in taken:
            clashes.append({"input": shown(p), "error": f"output name {shown(targets[p].name)} is also the output "
                                                         f"of {shown(taken[targets[p]])}; rename one of them"})
            continue
        taken[targets[p]] = p
        final[p] = targets[p]
    return final, clashes


def _is_per_image(e: BaseException) -> bool:
    """Problems of one input (recorded, the run goes on); out of memory counts: it depends on the image size."""
    if isinstance(e, PER_IMAGE_ERRORS):
        return True
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e)))


def _list_inputs(cfg: InferConfig) -> tuple[list[Path], Path, Path]:
    src, out = Path(cfg.input), Path(cfg.output_dir)
    if cfg.upscale < 1:
        raise ValueError(f"upscale={cfg.upscale}: must be at least 1")
    if src.is_file():
        if src.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"input {shown(src)} is not an image file")
        return [src], src.parent, out
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"output_dir={shown(out)} is inside input={shown(src)}: outputs would be read as "
                         "inputs on the next run; choose a folder outside it")
    return list_images([src]), src, out


class Run:
    """One process's pass over its inputs: counts, per-image records, and the report file."""

    def __init__(self, cfg: InferConfig, out: Path, report_name: str, inputs: int, skipped: int):
        self.cfg, self.path = cfg, out / report_name
        self.counts = {"inputs": inputs, "done": 0, "skipped_existing": skipped, "in_progress_elsewhere": 0}
        self.errors: list[dict] = []
        self.images: list[dict] = []
        self.start = time.perf_counter()

    def report(self) -> dict:
        seconds = time.perf_counter() - self.start
        done = self.counts["done"]
        # every input is in exactly one count: not_attempted > 0 only when the run stopped early
        accounted = done + self.counts["skipped_existing"] + self.counts["in_progress_elsewhere"] + len(self.errors)
        return {**self.counts, "failed": len(self.errors), "not_attempted": self.counts["inputs"] - accounted,
                "errors": self.errors, "seconds": round(seconds, 2),
                "seconds_per_image": round(seconds / done, 3) if done else None,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "truncated_prompts": sum(bool(r["truncated"]) for r in self.images), "images": self.images}

    def write(self) -> dict:
        """Write the report (temp file + rename); a full disk here only prints, the outputs are already safe."""
        report = self.report()
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        try:
            tmp.write_text(json.dumps(report, indent=2, ensure_ascii=True))
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(f"infer: could not write {shown(self.path)} ({e})")
        return report


def _disk_full(e: OSError, what: Path) -> DiskFullError:
    return DiskFullError(f"disk full: cannot write {shown(what)} ({e.strerror or e}); no partial file was left. "
                         "Free space and rerun: finished images are kept and skipped")


def _super_resolve_one(modules, prompts: PromptSource, path: Path, target: Path, cfg: InferConfig, device) -> dict:
    """Read, check, super-resolve and write one image; returns its record for the report."""
    try:
        header_check(path, cfg)
        lr, notes = load_rgb(path)
        check_size(shown(path), lr.shape[0], lr.shape[1], cfg)
        content, quality = prompts(path, lr)
    except OSError as e:  # the input vanished or cannot be read (permissions): this image only
        raise ImageError(f"{shown(path)}: cannot read ({e.strerror or e})") from e
    record = {"input": shown(path), "output": shown(target), "notes": notes,
              **prompt_record(modules.tokenizer, content, quality, cfg)}
    sr = super_resolve(modules, lr, content, quality, cfg, device)
    try:
        save_png_atomic(sr, target)  # temp file + rename: on any failure the temp file is removed
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full(e, target) from e
        raise
    return record


def _work(run: Run, todo: list[Path], targets: dict[Path, Path], modules, prompts, cfg, device, bar: dict) -> None:
    """Every image of ``todo`` this process can claim; per-image problems are recorded, others raised."""
    for path in tqdm(todo, unit="img", **bar):
        target = targets[path]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            claim = try_claim(target)
        except OSError as e:
            if is_disk_full(e):
                raise _disk_full(e, target.parent) from e
            raise
        if claim is None:  # another process is doing it
            run.counts["in_progress_elsewhere"] += 1
            continue
        try:
            if target.is_file():  # another process finished it since we listed
                run.counts["skipped_existing"] += 1
                continue
            run.images.append(_super_resolve_one(modules, prompts, path, target, cfg, device))
            run.counts["done"] += 1
        except Exception as e:
            entry = {"input": shown(path), "error": f"{type(e).__name__}: {shown(str(e))}"}
            if _is_per_image(e):
                run.errors.append(entry)
                continue
            # a full disk stops the run; anything else is a bug: recorded, then raised so it is not hidden
            run.errors.append({**entry, "stopped_the_run": True})
            raise
        finally:
            release_claim(claim, target)


def run_inference(cfg: InferConfig, before_first_image=None) -> dict:
    """Super-resolve ``cfg.input`` (an image, a folder, or video: docs/video.md). ``before_first_image(cfg,
    modules, sizes, device)`` runs once the model is loaded, with the processing sizes (h, w) of the images this
    process will make; it may raise to stop the run before any work (`xpsr infer`'s GPU memory check)."""
    from accelerate import PartialState

    from xpsr.video.run import is_video_input, run_video

    if is_video_input(cfg):  # a clip, a folder of clips, or a frame sequence: docs/video.md
        return run_video(cfg)

    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    inputs, root, out = _list_inputs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.caption_first:
        cfg = caption_inputs(cfg)
    targets, clashes = plan_outputs(inputs, root, out)
    mine = inputs[state.process_index::state.num_processes]
    clashes = [c for c in clashes if c["input"] in {shown(p) for p in mine}]
    with FolderSession(out, {t.parent for t in targets.values()}) as session:
        todo = [p for p in mine if p in targets and not targets[p].is_file()]
        name = ("infer_report.json" if session.alone else f"infer_report.{os.getpid()}.json") \
            if state.num_processes == 1 else f"infer_report.rank{state.process_index}.json"
        run = Run(cfg, out, name, len(mine), len(mine) - len(todo) - len(clashes))
        run.errors += clashes
        modules = load_modules(cfg)
        cfg = check_mode(modules, cfg)
        for m in (modules.unet, modules.controlnet, modules.vae, modules.text_encoder):
            m.to(device).eval()
            if cfg.dtype != "fp32":
                m.to(dtype=DTYPES[cfg.dtype])
        from xpsr.inference.low_memory import apply_low_memory

        apply_low_memory(modules, cfg.weights_storage, cfg.offload, cfg.dtype, device)
        if before_first_image is not None and todo:
            before_first_image(cfg, modules, processing_sizes(todo, cfg, vae_scale_factor(modules.vae)), device)
        prompts = PromptSource(cfg)
        try:
            bar = {"desc": f"infer [{state.process_index}/{state.num_processes}]", "disable": not state.is_main_process}
            _work(run, todo, targets, modules, prompts, cfg, device, bar)
        finally:
            prompts.close()
            report = run.write()
    c = run.counts
    print(f"infer: {c['done']} images in {report['seconds']:.1f}s, {c['skipped_existing']} already done, "
          f"{c['in_progress_elsewhere']} taken by another process, {len(run.errors)} failed"
          + (f", {report['truncated_prompts']} prompts truncated to {modules.tokenizer.model_max_length} tokens"
             if report["truncated_prompts"] else "") + f" (see {shown(run.path)})")
    return report
