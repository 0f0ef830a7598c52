"""``XPSRPipeline``: XPSR as a diffusers ``DiffusionPipeline``, a thin face over :func:`super_resolve`.

Saving writes a standard diffusers folder (``model_index.json``, one subfolder per component). The
``unet/`` and ``controlnet/`` folders are our export format (``export_diffusers``: diffusers layout plus
an ``xpsr`` section in ``config.json``), and ``model_index.json`` names them by the two loader classes
below, so whichever diffusers loader reads the folder rebuilds the XPSR modules and loads them strictly
(a missing or extra key raises ``CheckpointMismatchError``; stock ``from_pretrained`` would drop extra
keys and random-initialise missing ones). diffusers resolves ``["xpsr.inference.diffusers_pipeline", ...]``
only from modules already imported, which importing this module does; it never imports code because a
folder names it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    ModelMixin,  # also looked up by this name in this module by diffusers' loader (see _XPSRPartLoader)
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from xpsr.config import InferConfig, ModelConfig, check_values, to_dict
from xpsr.inference.pipeline import super_resolve
from xpsr.models.checkpoint import export_diffusers, load_exported_part
from xpsr.models.controlnet import XPSRControlNet

MODULE = __name__
# model_index.json entries of the two XPSR parts: diffusers calls ``from_pretrained(FOLDER/part)`` on these.
COMPONENT_ENTRIES = {"unet": [MODULE, "XPSRUNetLoader"], "controlnet": [MODULE, "XPSRControlNetLoader"]}
MODEL_CONFIG_ATTR = "xpsr_config"  # the ModelConfig travels with the loaded ControlNet
SCHEDULER_NAMES = {DDPMScheduler: "ddpm", DDIMScheduler: "ddim", UniPCMultistepScheduler: "unipc",
                   DPMSolverMultistepScheduler: "dpmsolver++"}
# InferConfig keys that describe a folder run, not one call (the pipeline has its own way for each).
NOT_CALL_OPTIONS = {"input", "output_dir", "model", "weights", "dtype", "device", "prompts", "cache",
                    "caption_first", "caption_missing", "prompt", "quality_prompt"}
PIPELINE_FILE = '''"""Entry point for diffusers' custom-pipeline loader. It defines nothing: it imports the XPSR
pipeline from the installed `xpsr` package (see its README, "diffusers pipeline and export")."""
from xpsr.inference.diffusers_pipeline import XPSRPipeline  # noqa: F401
'''


class _XPSRPartLoader(ModelMixin):
    """Never instantiated: ``from_pretrained`` returns the rebuilt XPSR part (a ModelMixin subclass, so that
    diffusers' loaders accept it as a model class)."""

    part = ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None,
                        **kwargs: Any) -> ModelMixin:
        unsupported = {k: v for k, v in kwargs.items()
                       if k in ("device_map", "variant", "quantization_config", "subfolder") and v is not None}
        if unsupported:
            raise ValueError(f"loading the XPSR {cls.part} does not support {sorted(unsupported)}")
        model, model_config = load_exported_part(pretrained_model_name_or_path, cls.part, torch_dtype)
        setattr(model, MODEL_CONFIG_ATTR, model_config)
        return model


class XPSRUNetLoader(_XPSRPartLoader):
    """``model_index.json``'s class for ``unet/``: the stock UNet plus pixel-aware attention (and UNet SFA)."""

    part = "unet"


class XPSRControlNetLoader(_XPSRPartLoader):
    """``model_index.json``'s class for ``controlnet/``: the XPSR ControlNet (SFA, DFC heads)."""

    part = "controlnet"


def infer_config(**options: Any) -> InferConfig:
    """An :class:`InferConfig` with ``options`` over the defaults, type- and choice-checked like the CLI."""
    bad = sorted(set(options) - {f.name for f in dataclasses.fields(InferConfig)})
    if bad:
        raise TypeError(f"XPSRPipeline got unknown options {bad}; options are the InferConfig keys "
                        "(`xpsr infer --help`)")
    if set(options) & NOT_CALL_OPTIONS:
        raise TypeError(f"{sorted(set(options) & NOT_CALL_OPTIONS)} are not per-call options: use the image, "
                        "prompt/quality_prompt arguments, pipe.to(device/dtype) and from_pretrained instead")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(InferConfig(input="-", output_dir="-")), options)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"XPSRPipeline option {getattr(e, 'key', '')!r}: {str(e).splitlines()[0]}") from None
    check_values(cfg, "XPSRPipeline options")
    return cfg


def to_uint8_rgb(image: Any) -> np.ndarray:
    """One input image as RGB uint8 HWC: a file path (read as ``xpsr infer`` reads it), a PIL image, a uint8
    HWC array (or float in [0, 1]), or a (3, H, W) tensor in [0, 1]."""
    if isinstance(image, (str, Path)):
        from xpsr.data.images import load_rgb

        return load_rgb(image)[0]
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")  # composited on white, as xpsr infer does with files
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.array(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"a tensor image must be (C, H, W) with C = 1 or 3, got {tuple(image.shape)}")
        image = image.detach().float().cpu().clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an array image must be (H, W, 3), got {image.shape}")
        if image.dtype != np.uint8:
            image = np.round(np.clip(image.astype(np.float64), 0, 1) * 255).astype(np.uint8)
        return np.ascontiguousarray(image)
    raise TypeError(f"image must be a path, PIL image, numpy array or tensor, not {type(image).__name__}")


def _as_list(image: Any) -> list:
    if isinstance(image, (list, tuple)):
        return list(image)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return list(image)
    if isinstance(image, np.ndarray) and image.ndim == 4:
        return list(image)
    return [image]


def _per_image(value: Any, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} images")
        return list(value)
    return [value] * n


class XPSRPipeline(DiffusionPipeline):
    """XPSR super-resolution with the diffusers interface. Build it with :meth:`from_pretrained` (a folder
    written by ``save_pretrained`` / ``xpsr export``, or a Hub id) or :meth:`from_modules` (an in-memory
    model), then ``pipe(image, prompt=..., quality_prompt=...)``."""

    # The ControlNet runs at every step with the UNet, so it is hooked on its own (as diffusers' ControlNet
    # pipelines do) instead of being swapped out of the accelerator between them.
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: torch.nn.Module, tokenizer: Any,
                 unet: UNet2DConditionModel, controlnet: ControlNetModel, scheduler: DDPMScheduler):
        super().__init__()
        if not isinstance(controlnet, XPSRControlNet) or getattr(controlnet, MODEL_CONFIG_ATTR, None) is None:
            raise TypeError("XPSRPipeline needs an XPSR ControlNet with its model settings: build the pipeline with "
                            "XPSRPipeline.from_pretrained(folder) or XPSRPipeline.from_modules(modules)")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              controlnet=controlnet, scheduler=scheduler)
        self.register_to_config(**COMPONENT_ENTRIES)
        self._vae_tile = InferConfig.vae_tile  # tiled above this size, as `xpsr infer`

    @property
    def xpsr_config(self) -> ModelConfig:
        """The XPSR model settings (fusion mode, DFC heads, ...) the parts were built with."""
        return getattr(self.controlnet, MODEL_CONFIG_ATTR)

    @classmethod
    def from_modules(cls, modules) -> XPSRPipeline:
        """A pipeline over an in-memory :class:`~xpsr.models.build.XPSRModules` (shares its modules)."""
        setattr(modules.controlnet, MODEL_CONFIG_ATTR, modules.config)
        return cls(vae=modules.vae, text_encoder=modules.text_encoder, tokenizer=modules.tokenizer,
                   unet=modules.unet, controlnet=modules.controlnet, scheduler=modules.scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> XPSRPipeline:
        """diffusers' loader, strict for the XPSR parts. A Hub id is fetched with ``snapshot_download`` first:
        diffusers' own download step refuses component classes from outside diffusers/transformers."""
        path = str(pretrained_model_name_or_path)
        if not Path(path).is_dir():
            path = _download(path, kwargs)
        return super().from_pretrained(path, **kwargs)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, push_to_hub: bool = False,
                        **kwargs) -> None:
        """Write the diffusers folder: ``unet/`` + ``controlnet/`` in our export format, the other parts with
        their own ``save_pretrained``, ``model_index.json``, and ``pipeline.py`` for diffusers' custom-pipeline
        loader. ``push_to_hub=True, repo_id=...`` uploads the folder afterwards."""
        if not safe_serialization:
            raise ValueError("XPSR pipelines are saved as safetensors only")
        bad = set(kwargs) - {"repo_id", "token", "private", "commit_message"}
        if bad or (kwargs and not push_to_hub):
            raise TypeError(f"XPSRPipeline.save_pretrained does not take {sorted(bad or kwargs)}")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        export_diffusers(out, self.unet, self.controlnet, to_dict(self.xpsr_config))
        for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
            getattr(self, name).save_pretrained(out / name)
        self.register_to_config(**COMPONENT_ENTRIES)  # a component set since __init__ re-registered itself
        self.save_config(out)
        index = json.loads((out / "model_index.json").read_text())
        if index.pop("_name_or_path", None) is not None:  # where it was loaded from: not part of the model
            (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (out / "pipeline.py").write_text(PIPELINE_FILE)
        if push_to_hub:
            from xpsr.export import push_folder

            push_folder(out, kwargs.pop("repo_id", out.name), **kwargs)

    def enable_low_memory(self, weights_storage: str = "fp8", offload: str = "none", device=None) -> None:
        """fp8 storage of the UNet/ControlNet weights, computed in their current half precision, and/or CPU
        offload (``model`` or ``group``): diffusers' mechanisms, see xpsr.inference.low_memory."""
        from xpsr.inference.low_memory import apply_low_memory

        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.unet.dtype, "fp32")
        apply_low_memory(self, weights_storage, offload, dtype, device or self.device)

    def enable_vae_tiling(self, tile_size: int = InferConfig.vae_tile) -> None:
        """Encode/decode through our tiled VAE path (``InferConfig.vae_tile``) above ``tile_size`` px; on by
        default with ``xpsr infer``'s tile (1024 px), so a bare call keeps the pipeline equal to ``xpsr infer``.
        diffusers' AutoencoderKL tiling is not used: its per-tile statistics would make results differ."""
        if tile_size <= 0:
            raise ValueError("tile_size must be positive (disable_vae_tiling() turns tiling off)")
        self._vae_tile = int(tile_size)

    def disable_vae_tiling(self) -> None:
        """Encode/decode whole images (``vae_tile=0``)."""
        self._vae_tile = 0

    def _scheduler_name(self) -> str:
        name = SCHEDULER_NAMES.get(type(self.scheduler))
        if name is None:
            raise ValueError(f"pipe.scheduler is a {type(self.scheduler).__name__}; XPSR samples with "
                             f"{', '.join(c.__name__ for c in SCHEDULER_NAMES)}")
        return name

    @torch.no_grad()
    def __call__(self, image: Any, prompt: str | list[str] | None = None,
                 quality_prompt: str | list[str] | None = None,
                 num_inference_steps: int = InferConfig.num_inference_steps,
                 guidance_scale: float = InferConfig.guidance_scale, negative_prompt: str | None = None,
                 negative_quality_prompt: str | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",), **options):
        """Super-resolve ``image`` (a path, PIL image, uint8 HWC array, (3, H, W) tensor in [0, 1], or a list /
        4-D batch of them); ``xpsr infer`` gives the same bytes for the same inputs, options and seed.

        ``prompt`` is the content prompt (None: empty, as ``xpsr infer`` without a caption); ``quality_prompt``
        None: the offline heuristic captioner's sentence for the image. ``negative_prompt`` /
        ``negative_quality_prompt`` None: the official ones. ``generator``: a CPU ``torch.Generator`` (one, or
        one per image); None: seeded with ``seed`` (default 0) for every image, as ``xpsr infer``. Any other
        ``InferConfig`` key is an option (``scheduler=`` defaults to the class of ``pipe.scheduler``,
        ``vae_tile=`` to what ``enable_vae_tiling`` set, e.g. ``upscale=4, process_size=512,
        color_fix="adain", start_from="lr"``). ``callback_on_step_end(pipe, step, timestep, {"latents": ...})``
        runs after every step; a ``"latents"`` entry in the dict it returns replaces the latents.
        ``output_type``: "pil" (list of images), "np" (float32 NHWC in [0, 1]) or "pt" (float32 NCHW)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
        if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers' PipelineCallback objects
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError("callback tensor inputs can only be ['latents'], got "
                             f"{list(callback_on_step_end_tensor_inputs)}")
        options.setdefault("scheduler", self._scheduler_name())
        options.setdefault("vae_tile", self._vae_tile)
        if negative_prompt is not None:
            options["negative_prompt"] = negative_prompt
        if negative_quality_prompt is not None:
            options["negative_quality_prompt"] = negative_quality_prompt
        cfg = infer_config(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **options)

        images = [to_uint8_rgb(x) for x in _as_list(image)]
        prompts = _per_image(prompt, len(images), "prompt")
        qualities = _per_image(quality_prompt, len(images), "quality_prompt")
        generators = _per_image(generator, len(images), "generator")
        for g in generators:
            if g is not None and g.device.type != "cpu":
                raise ValueError("XPSR draws its noise on the CPU (the same numbers on every device): pass "
                                 "torch.Generator() seeded on the CPU")

        def step_end(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            returned = callback_on_step_end(self, i, t, {"latents": latents}) or {}
            return returned.get("latents", latents)

        offload_hook = getattr(self.vae, "_hf_hook", None)
        if offload_hook is not None:
            # enable_model_cpu_offload hooks forward/encode/decode; a tiled VAE path may call the VAE's
            # submodules directly, so the VAE goes to the execution device for the whole call.
            offload_hook.pre_forward(self.vae)
        outputs = []
        for lr, content, quality, g in zip(images, prompts, qualities, generators):
            if quality is None:
                from xpsr.captions.heuristic import describe, measure

                quality = describe(measure(lr))
            outputs.append(super_resolve(self, lr, content or "", quality, cfg, self._execution_device,
                                         generator=g, progress=self.progress_bar,
                                         on_step_end=step_end if callback_on_step_end else None))
        self.maybe_free_model_hooks()
        result = _format(outputs, output_type)
        return ImagePipelineOutput(images=result) if return_dict else (result,)


def _format(outputs: list[np.ndarray], output_type: str):
    if output_type == "pil":
        return [Image.fromarray(o) for o in outputs]
    if len({o.shape for o in outputs}) > 1:
        raise ValueError("images of different sizes can only be returned with output_type='pil'")
    batch = np.stack(outputs).astype(np.float32) / 255.0
    return batch if output_type == "np" else torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def _download(repo_id: str, kwargs: dict) -> str:
    """A local snapshot of a Hub repository (diffusers' download-related keywords are taken from ``kwargs``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    options = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only", "force_download")
               if k in kwargs}
    try:
        return snapshot_download(repo_id, **options)
    except HFValidationError as e:
        raise FileNotFoundError(f"{repo_id} is neither a local folder nor a Hub id ({e})") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hub ({type(e).__name__}: {str(e).splitlines()[0]}). Without "
            "network, copy the folder to this machine and pass its path") from None
