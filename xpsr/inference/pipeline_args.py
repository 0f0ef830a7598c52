"""diffusers' calling conventions for ``XPSRPipeline.__call__``: which standard arguments XPSR takes (and why not
the others), how the standard names map onto XPSR's two prompts, and the per-image jobs one call runs.

diffusers' image pipelines share argument names (``prompt``, ``image``, ``latents``, ``prompt_embeds``, ...).
:data:`CONVENTIONS` lists every such argument of ``StableDiffusionControlNetPipeline`` and
``StableDiffusionUpscalePipeline``; a test compares it with their signatures, so a diffusers upgrade that adds
one fails until it is either supported or listed here with its reason (the docs render the same table).
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xpsr.config import InferConfig
from xpsr.inference.pipeline import SCHEDULERS, CallExtras, content_prompt_used
from xpsr.models.text import encode_prompts

SUPPORTED, ALIAS, REFUSED = "supported", "alias", "not supported"
# Every standard __call__ argument of the two diffusers pipelines: (status, what it does in XPSR or why not).
# reasons shared by several refused arguments
NO_SIZE = "the output is the input times `upscale`; set `upscale=` (and `process_size=`)"
NO_IP_ADAPTER = "XPSR has no IP-Adapter; the image prompt is the LR image itself"
ALWAYS_CONTROLNET = ("the UNet's pixel-aware attention reads the ControlNet residuals at every step: steps without "
                     "the ControlNet are a model XPSR was never trained as")
DEPRECATED = "deprecated by diffusers; use `callback_on_step_end`"
CONVENTIONS: dict[str, tuple[str, str]] = {
    "image": (SUPPORTED, "the LR image(s); first positionally (a string there must be an existing file)"),
    "prompt": (SUPPORTED, "the content prompt (one per image); the quality prompt is `quality_prompt`"),
    "num_inference_steps": (SUPPORTED, "as `xpsr infer` (default 20); ignored with a warning in one-step mode"),
    "timesteps": (SUPPORTED, "custom timesteps, for schedulers whose `set_timesteps` takes them (ddpm, "
                             "dpmsolver++)"),
    "sigmas": (SUPPORTED, "custom sigmas, for schedulers whose `set_timesteps` takes them (of XPSR's: unipc, and "
                          "only with `use_flow_sigmas`, a flow-matching setting; refused with the reason otherwise)"),
    "guidance_scale": (SUPPORTED, "CFG over both prompts (default 4.5); ignored with a warning in one-step mode"),
    "negative_prompt": (SUPPORTED, "negative content prompt, a string or one per image"),
    "num_images_per_prompt": (SUPPORTED, "outputs per input image; copy k draws on from the same generator, so "
                                         "copy 0 is the single-output result"),
    "eta": (SUPPORTED, "DDIM's eta (scheduler=ddim); other schedulers refuse it"),
    "generator": (SUPPORTED, "a CPU generator, one for all or one per image or per output"),
    "latents": (SUPPORTED, "the sampler's start, in place of the one `start_from` draws (times the scheduler's "
                           "`init_noise_sigma`, as diffusers)"),
    "prompt_embeds": (SUPPORTED, "content prompt embeddings (the added prompt is not appended); quality: "
                                 "`quality_prompt_embeds`"),
    "negative_prompt_embeds": (SUPPORTED, "negative content prompt embeddings; quality: "
                                          "`negative_quality_prompt_embeds`"),
    "output_type": (SUPPORTED, "pil, np, pt, or latent (the final latents, before VAE, colour fix and resize)"),
    "return_dict": (SUPPORTED, "as diffusers"),
    "cross_attention_kwargs": (SUPPORTED, "passed to every attention processor of the ControlNet and the UNet"),
    "controlnet_conditioning_scale": (ALIAS, "XPSR's `conditioning_scale` (one ControlNet: a float)"),
    "clip_skip": (SUPPORTED, "skip the last CLIP layers, for the content and the quality prompt alike"),
    "callback_on_step_end": (SUPPORTED, "after every step (once in one-step mode); see `_callback_tensor_inputs`"),
    "callback_on_step_end_tensor_inputs": (SUPPORTED, "a subset of `XPSRPipeline._callback_tensor_inputs`"),
    "height": (REFUSED, NO_SIZE),
    "width": (REFUSED, NO_SIZE),
    "ip_adapter_image": (REFUSED, NO_IP_ADAPTER),
    "ip_adapter_image_embeds": (REFUSED, NO_IP_ADAPTER),
    "guess_mode": (REFUSED, "the XPSR ControlNet's semantic-fusion attention needs both prompts at every step"),
    "control_guidance_start": (REFUSED, ALWAYS_CONTROLNET),
    "control_guidance_end": (REFUSED, ALWAYS_CONTROLNET),
    "noise_level": (REFUSED, "the SD x4 upscaler's noise on its LR condition; XPSR's condition is clean (the "
                             "nearest knob, noise on the start latent, is `added_noise_level=`)"),
    "callback": (REFUSED, DEPRECATED),
    "callback_steps": (REFUSED, DEPRECATED),
}
CALLBACK_TENSOR_INPUTS = ["latents", "prompt_embeds", "quality_prompt_embeds", "image"]
# Arguments a one-step call does not use (it runs one UNet call from the LR latent, without guidance).
ONESTEP_IGNORES = ("num_inference_steps", "guidance_scale", "timesteps", "sigmas", "eta", "latents",
                   "negative_prompt", "negative_quality_prompt", "negative_prompt_embeds",
                   "negative_quality_prompt_embeds")
EMBEDS = ("prompt_embeds", "negative_prompt_embeds", "quality_prompt_embeds", "negative_quality_prompt_embeds")


def convention_table() -> str:
    """:data:`CONVENTIONS` as the Markdown table the docs show."""
    rows = ["| argument | XPSRPipeline | notes |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {status} | {note} |" for name, (status, note) in CONVENTIONS.items()]
    return "\n".join(rows)


def refuse_unsupported(options: dict[str, Any]) -> None:
    """A standard diffusers argument XPSR does not take: one line saying why (not 'unknown option')."""
    for name in options:
        if CONVENTIONS.get(name, (SUPPORTED,))[0] == REFUSED:
            raise TypeError(f"XPSRPipeline does not take {name}=: {CONVENTIONS[name][1]}")


def check_image_and_prompt(image: Any, prompt: Any) -> None:
    """XPSR takes the image first (diffusers' ControlNet pipelines take the prompt first): catch the mix-ups."""
    if image is None:
        raise TypeError("XPSRPipeline needs an image: pipe(image, prompt=...) or pipe(image=..., prompt=...)")
    for item in image if isinstance(image, (list, tuple)) else [image]:
        if isinstance(item, str) and not Path(item).is_file():
            raise ValueError(f"image={item[:60]!r} is a string but no file. XPSRPipeline takes the image first: "
                             "pass text as prompt=... (e.g. pipe(image, prompt='a cat'))")
    texts = prompt if isinstance(prompt, (list, tuple)) else [prompt]
    if not all(t is None or isinstance(t, str) for t in texts):
        raise TypeError(f"prompt must be a string or a list of strings, not {type(prompt).__name__}: XPSRPipeline "
                        "takes (image, prompt), diffusers' ControlNet pipelines (prompt, image); use keywords")


def conditioning_alias(options: dict[str, Any], controlnet_conditioning_scale: Any) -> None:
    """diffusers' ``controlnet_conditioning_scale`` is XPSR's ``conditioning_scale``."""
    if controlnet_conditioning_scale is None:
        return
    if isinstance(controlnet_conditioning_scale, (list, tuple)):
        raise ValueError("controlnet_conditioning_scale: XPSR has one ControlNet, pass one float")
    scale = float(controlnet_conditioning_scale)
    if options.get("conditioning_scale", scale) != scale:
        raise ValueError("conditioning_scale and controlnet_conditioning_scale are the same setting; pass one")
    options["conditioning_scale"] = scale


def warn_onestep_ignores(cfg: InferConfig, given: dict[str, Any]) -> None:
    """One-step mode runs one UNet call without guidance: say which arguments it does not use."""
    ignored = [name for name in ONESTEP_IGNORES if given.get(name) is not None]
    if cfg.mode == "onestep" and ignored:
        warnings.warn(f"mode='onestep' runs one step without guidance; ignored: {', '.join(ignored)}",
                      UserWarning, stacklevel=3)


def schedule(cfg: InferConfig, timesteps: Any, sigmas: Any, steps_given: bool, base_config) -> dict[str, Any]:
    """``set_timesteps`` keywords for custom ``timesteps`` / ``sigmas``, where the scheduler takes them
    (``base_config``: the pipeline scheduler's config, which the sampling scheduler is built from)."""
    name, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if values is None:
        return {}
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass timesteps or sigmas, not both")
    if steps_given:
        raise ValueError(f"pass num_inference_steps or {name}, not both (the {name} set the number of steps)")
    takes = [k for k, cls in SCHEDULERS.items() if name in inspect.signature(cls.set_timesteps).parameters]
    if cfg.scheduler not in takes:
        raise ValueError(f"scheduler {cfg.scheduler!r} takes no custom {name}; these do: {', '.join(takes)} "
                         "(pipe.scheduler = ...from_config(pipe.scheduler.config), or scheduler=...)")
    if name == "sigmas" and SCHEDULERS[cfg.scheduler].from_config(base_config).config.get("use_flow_sigmas") is False:
        raise ValueError(f"scheduler {cfg.scheduler!r} takes sigmas only with use_flow_sigmas=True, a setting for "
                         "flow-matching models; XPSR's Stable Diffusion base predicts noise: pass timesteps= instead")
    values = values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else list(values)
    return {name: values}


def step_kwargs(cfg: InferConfig, eta: float | None, generator: torch.Generator) -> dict[str, Any]:
    """``scheduler.step`` keywords for ``eta`` (with the generator its noise is drawn from)."""
    if eta is None:
        return {}
    if "eta" not in inspect.signature(SCHEDULERS[cfg.scheduler].step).parameters:
        takes = [k for k, cls in SCHEDULERS.items() if "eta" in inspect.signature(cls.step).parameters]
        raise ValueError(f"eta is a DDIM setting: scheduler {cfg.scheduler!r} has none (these do: {', '.join(takes)})")
    return {"eta": float(eta), "generator": generator}


def _rows(value: Any, n: int, name: str) -> list:
    """One entry per item: a list/tuple of n, a batch tensor of n rows (or 1 row: shared), or one value."""
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} outputs")
        return list(value)
    if isinstance(value, torch.Tensor) and value.ndim in (3, 4):  # (B, tokens, width) or (B, C, h, w)
        if value.shape[0] == n:
            return list(value[:, None])
        if value.shape[0] == 1:
            return [value] * n
        raise ValueError(f"{name} has {value.shape[0]} rows for {n} outputs")
    return [value] * n


def encode(pipe, texts: list[str], device, clip_skip: int | None) -> torch.Tensor:
    """Embeddings of ``texts``; ``clip_skip`` as diffusers: the output of the layer that many before the
    last, through CLIP's final layer norm."""
    if clip_skip is None:
        return encode_prompts(pipe.tokenizer, pipe.text_encoder, texts, device)
    layers = pipe.text_encoder.config.num_hidden_layers
    if not 0 <= clip_skip < layers:
        raise ValueError(f"clip_skip={clip_skip}: the text encoder has {layers} layers (0 <= clip_skip < {layers})")
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    # transformers 5 flattened CLIPTextModel (no .text_model): its final layer norm sits on the model itself
    return getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden)


def embeddings(pipe, content: str, quality: str, cfg: InferConfig, device, given: dict[str, Any],
               clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(content, quality) embeddings as :func:`~xpsr.inference.pipeline.prompt_embeddings` batches them, with
    the given ones in place of encoded text; None when nothing is given (super_resolve encodes, as infer)."""
    if clip_skip is None and all(given.get(k) is None for k in EMBEDS):
        return None
    dtype = next(pipe.unet.parameters()).dtype
    width = pipe.unet.config.cross_attention_dim
    parts = []
    for negative_text, text, negative_name, name in (
            (cfg.negative_prompt, content_prompt_used(content, cfg), "negative_prompt_embeds", "prompt_embeds"),
            (cfg.negative_quality_prompt, quality, "negative_quality_prompt_embeds", "quality_prompt_embeds")):
        pair = encode(pipe, [negative_text, text], device, clip_skip)  # one batch, as the plain path encodes
        rows = []
        for i, key in enumerate((negative_name, name)):
            value = given.get(key)
            if value is None:
                rows.append(pair[i:i + 1])
                continue
            value = value[None] if value.ndim == 2 else value
            if value.ndim != 3 or value.shape[0] != 1 or value.shape[-1] != width:
                raise ValueError(f"{key} must be (1, tokens, {width}) per output, got {tuple(value.shape)}")
            rows.append(value.to(device))
        parts.append(torch.cat(rows).to(dtype))
    c, q = parts
    if cfg.guidance_scale <= 1.0 or cfg.mode == "onestep":
        return c[1:], q[1:]
    return c, q


@dataclasses.dataclass
class Job:
    """One output image of a call: what :func:`super_resolve` gets for it."""

    lr: np.ndarray
    content: str
    quality: str
    cfg: InferConfig
    generator: torch.Generator
    extras: CallExtras


def quality_of(lr: np.ndarray, quality: str | None) -> str:
    """The quality prompt: given, or the offline heuristic captioner's sentence for the image (as infer)."""
    if quality is not None:
        return quality
    from xpsr.captions.heuristic import describe, measure

    return describe(measure(lr))


def generators(generator: Any, n_images: int, copies: int, seed: int) -> list[torch.Generator]:
    """One generator per output: a list per output or per image (its copies share it), one for all, or None:
    one seeded with ``seed`` per image (so copy 0 of every image is ``xpsr infer``'s result)."""
    if generator is None:
        per_image = [torch.Generator().manual_seed(seed) for _ in range(n_images)]
    elif isinstance(generator, (list, tuple)):
        if len(generator) == n_images * copies:
            return list(generator)
        if len(generator) != n_images:
            raise ValueError(f"generator has {len(generator)} entries for {n_images} images x {copies} copies")
        per_image = list(generator)
    else:
        per_image = [generator] * n_images
    out = [g for g in per_image for _ in range(copies)]
    for g in out:
        if g.device.type != "cpu":
            raise ValueError("XPSR draws its noise on the CPU (the same numbers on every device): pass "
                             "torch.Generator() seeded on the CPU")
    return out


def to_images(outputs: list, output_type: str):
    """The ``images`` of the pipeline output: PIL list, float NHWC array, NCHW tensor, or stacked latents."""
    if output_type == "pil":
        return [Image.fromarray(o) for o in outputs]
    if len({tuple(o.shape) for o in outputs}) > 1:
        raise ValueError("images of different sizes can only be returned with output_type='pil'")
    if output_type == "latent":
        return torch.cat(outputs)
    batch = np.stack(outputs).astype(np.float32) / 255.0
    return batch if output_type == "np" else torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def step_callback(pipe, callback, names: list[str]):
    """diffusers' ``callback_on_step_end(pipe, step, timestep, {name: tensor})`` over the sampler's state.
    A callback may set ``pipe._guidance_scale`` (``SDCFGCutoffCallback``): at 1 or below, the embeddings
    it did not cut itself keep only their conditional row, as CFG then runs one batch."""
    def step_end(i: int, t: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
        pipe._guidance_scale = state["guidance_scale"]
        returned = callback(pipe, i, t, {k: state[k] for k in names}) or {}
        unknown = sorted(set(returned) - set(CALLBACK_TENSOR_INPUTS))
        if unknown:
            raise ValueError(f"callback_on_step_end returned {unknown}; it can change {CALLBACK_TENSOR_INPUTS}")
        state.update(returned)
        rows = 2 if pipe._guidance_scale > 1.0 else 1
        for key in ("prompt_embeds", "quality_prompt_embeds"):
            if state[key].shape[0] == 2 and rows == 1:
                state[key] = state[key][-1:]
            elif state[key].shape[0] != rows:
                raise ValueError(f"after the step callback, {key} has {state[key].shape[0]} rows but guidance "
                                 f"{pipe._guidance_scale} needs {rows} (guidance cannot be switched on mid-sampling)")
        state["guidance_scale"] = pipe._guidance_scale
        return state

    return step_end


def plan_jobs(pipe, images: list, texts: dict[str, Any], cfg: InferConfig, given: dict[str, Any], generator: Any,
              copies: int, latent_out: bool, callback, names: list[str]) -> list[Job]:
    """One job per output; image k's copies follow each other (diffusers' order)."""
    n = len(images)
    per_image = {name: _rows(value, n, name) for name, value in (
        *texts.items(), *((k, given[k]) for k in ("negative_prompt", "negative_quality_prompt", *EMBEDS)))}
    starts = _rows(given["latents"], n * copies, "latents")
    gens = generators(generator, n, copies, cfg.seed)
    plan = schedule(cfg, given["timesteps"], given["sigmas"], given["num_inference_steps"] is not None,
                    pipe.scheduler.config)
    on_step_end = step_callback(pipe, callback, names) if callback is not None else None
    jobs = []
    for i, lr in enumerate(images):
        negatives = {k: per_image[k][i] for k in ("negative_prompt", "negative_quality_prompt")
                     if per_image[k][i] is not None}
        image_cfg = dataclasses.replace(cfg, **negatives)
        content, quality = per_image["prompt"][i] or "", quality_of(lr, per_image["quality_prompt"][i])
        embeds = embeddings(pipe, content, quality, image_cfg, pipe._execution_device,
                            {k: per_image[k][i] for k in EMBEDS}, given["clip_skip"])
        for k in range(copies):
            g = gens[i * copies + k]
            extras = CallExtras(embeds=embeds, latents=starts[i * copies + k], schedule=plan,
                                step_kwargs=step_kwargs(image_cfg, given["eta"], g), decode=not latent_out,
                                on_step_end=on_step_end, interrupted=lambda: pipe._interrupt)
            jobs.append(Job(lr, content, quality, image_cfg, g, extras))
    return jobs
