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
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
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

from xpsr.config import InferConfig, ModelConfig, check_values
from xpsr.inference import pipeline_args as args
from xpsr.inference import pipeline_parts as parts
from xpsr.inference.image_inputs import to_uint8_images, to_uint8_rgb  # noqa: F401 - to_uint8_rgb re-exported
from xpsr.inference.limits import checked
from xpsr.inference.model_card import card_location, pipeline_card
from xpsr.inference.pipeline import CallExtras, super_resolve
from xpsr.inference.pipeline_parts import MODEL_CONFIG_ATTR
from xpsr.models.controlnet import XPSRControlNet
from xpsr.models.pixel_attention import XPSRUNet

MODULE = __name__
# model_index.json entries of the two XPSR parts: diffusers calls ``from_pretrained(FOLDER/part)`` on these.
COMPONENT_ENTRIES = {"unet": [MODULE, "XPSRUNetLoader"], "controlnet": [MODULE, "XPSRControlNetLoader"]}
SCHEDULER_NAMES = {DDPMScheduler: "ddpm", DDIMScheduler: "ddim", UniPCMultistepScheduler: "unipc",
                   DPMSolverMultistepScheduler: "dpmsolver++"}
# InferConfig keys that describe a folder run, not one call (the pipeline has its own way for each).
NOT_CALL_OPTIONS = {"input", "output_dir", "model", "weights", "dtype", "device", "prompts", "cache",
                    "caption_first", "caption_missing", "prompt", "quality_prompt"}
PIPELINE_FILE = '''"""Entry point for diffusers' custom-pipeline loader. It defines nothing: it imports the XPSR
pipeline from the installed `xpsr` package (see its docs, docs/pipeline.md)."""
from xpsr.inference.diffusers_pipeline import XPSRPipeline  # noqa: F401
'''


class _XPSRPartLoader(ModelMixin):
    """Never instantiated: ``from_pretrained`` returns the rebuilt XPSR part (a ModelMixin subclass, so that
    diffusers' loaders accept it as a model class)."""

    part = ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None,
                        subfolder: str | None = None, variant: str | None = None, device_map: Any = None,
                        **kwargs: Any) -> ModelMixin:
        """The part from an exported folder, a pipeline folder with ``subfolder=``, a folder its own
        ``save_pretrained`` wrote, or a Hub id; strict (see :func:`~xpsr.models.checkpoint.load_exported_part`).
        ``device_map``: one device (diffusers' pipeline loader passes its placement here)."""
        path = str(pretrained_model_name_or_path)
        if not Path(path).is_dir():
            path = _download(path, kwargs, [f"{subfolder}/*"] if subfolder else None)
        return parts.load_part(cls.part, path, torch_dtype, subfolder, variant, device_map, kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, subfolder: str | None = None, **kwargs: Any):
        """diffusers' ``device_map="balanced"`` sizes each part from its config before loading."""
        config = parts.part_config(pretrained_model_name_or_path, subfolder)
        extra = ([{}] if return_unused_kwargs else []) + ([None] if return_commit_hash else [])
        return (config, *extra) if extra else config

    @classmethod
    def from_config(cls, config: dict, **kwargs: Any) -> ModelMixin:
        return parts.empty_part(config, cls.part)


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




class XPSRPipeline(DiffusionPipeline):
    """XPSR super-resolution with the diffusers interface. Build it with :meth:`from_pretrained` (a folder
    written by ``save_pretrained`` / ``xpsr export``, or a Hub id) or :meth:`from_modules` (an in-memory
    model), then ``pipe(image, prompt=..., quality_prompt=...)``."""

    # The ControlNet runs at every step with the UNet, so it is hooked on its own (as diffusers' ControlNet
    # pipelines do) instead of being swapped out of the accelerator between them.
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = args.CALLBACK_TENSOR_INPUTS
    # per-call state diffusers' callbacks read and set (SDCFGCutoffCallback sets _guidance_scale)
    _guidance_scale = InferConfig.guidance_scale
    _interrupt = False
    _cross_attention_kwargs: dict | None = None
    _extras: CallExtras | None = None

    # The annotations name the classes the parts really have: from_pipe keeps only parts whose type matches.
    def __init__(self, vae: AutoencoderKL, text_encoder: torch.nn.Module, tokenizer: Any,
                 unet: UNet2DConditionModel | XPSRUNet, controlnet: XPSRControlNet, scheduler: DDPMScheduler):
        super().__init__()
        model_config = getattr(controlnet, MODEL_CONFIG_ATTR, None)
        if not isinstance(controlnet, XPSRControlNet) or model_config is None:
            raise TypeError("XPSRPipeline needs an XPSR ControlNet with its model settings: build the pipeline with "
                            "XPSRPipeline.from_pretrained(folder) or XPSRPipeline.from_modules(modules)")
        for part in (unet, controlnet):  # so that pipe.unet.save_pretrained(d) writes a folder our loader reads
            parts.tag_part(part, model_config)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              controlnet=controlnet, scheduler=scheduler)
        self.register_to_config(**COMPONENT_ENTRIES)
        self._vae_tile = InferConfig.vae_tile  # tiled above this size, as `xpsr infer`

    @property
    def xpsr_config(self) -> ModelConfig:
        """The XPSR model settings (fusion mode, DFC heads, ...) the parts were built with."""
        return getattr(self.controlnet, MODEL_CONFIG_ATTR)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        """Steps of the image being sampled (1 in one-step mode), as diffusers' callbacks read it."""
        return self._extras.num_timesteps if self._extras is not None else 0

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @classmethod
    def from_modules(cls, modules) -> XPSRPipeline:
        """A pipeline over an in-memory :class:`~xpsr.models.build.XPSRModules` (shares its modules)."""
        setattr(modules.controlnet, MODEL_CONFIG_ATTR, modules.config)
        return cls(vae=modules.vae, text_encoder=modules.text_encoder, tokenizer=modules.tokenizer,
                   unet=modules.unet, controlnet=modules.controlnet, scheduler=modules.scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> XPSRPipeline:
        """diffusers' loader, strict for the XPSR parts. A Hub id is fetched with ``snapshot_download`` first:
        diffusers' own download step refuses component classes from outside diffusers/transformers.
        ``device_map``: diffusers' pipeline values ("balanced", "cpu", its accelerator) as long as every part
        lands on one device (the ControlNet and the UNet run together at every step)."""
        path = str(pretrained_model_name_or_path)
        if not Path(path).is_dir():
            path = _download(path, kwargs)
        parts.check_pipeline_device_map(kwargs.get("device_map"))
        pipe = super().from_pretrained(path, **kwargs)
        parts.check_parts_together(pipe)
        return pipe

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str | None = None, push_to_hub: bool = False, **kwargs) -> None:
        """Write the diffusers folder: ``unet/`` + ``controlnet/`` in our export format, the other parts with
        their own ``save_pretrained``, ``model_index.json``, ``pipeline.py`` for diffusers' custom-pipeline
        loader and a model card (``README.md``). ``variant`` / ``max_shard_size`` name and split the weight
        files as diffusers does. ``push_to_hub=True, repo_id=...`` uploads the folder afterwards."""
        if not safe_serialization:
            raise ValueError("XPSR pipelines are saved as safetensors only (safe_serialization=False would write "
                             "pickle files, which loading can run code from)")
        bad = set(kwargs) - {"repo_id", "token", "private", "commit_message"}
        if bad or (kwargs and not push_to_hub):
            raise TypeError(f"XPSRPipeline.save_pretrained does not take {sorted(bad or kwargs)}")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        parts.save_parts(self, out, variant, max_shard_size)
        self.register_to_config(**COMPONENT_ENTRIES)  # a component set since __init__ re-registered itself
        self.save_config(out)
        index = json.loads((out / "model_index.json").read_text())
        if index.pop("_name_or_path", None) is not None:  # where it was loaded from: not part of the model
            (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (out / "pipeline.py").write_text(PIPELINE_FILE)
        from xpsr.models.hub import push_folder

        repo_id = kwargs.pop("repo_id", out.name) if push_to_hub else None
        (out / "README.md").write_text(pipeline_card(self.xpsr_config, card_location(out, repo_id)))
        if push_to_hub:
            push_folder(out, repo_id, **kwargs)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None) -> str:
        """Save to a temporary folder (model card included, its snippet naming ``repo_id``) and upload it."""
        if create_pr or subfolder:
            raise ValueError("XPSRPipeline.push_to_hub uploads a whole folder to the main branch "
                             "(create_pr / subfolder are not supported)")
        from xpsr.models.hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / repo_id.split("/")[-1]
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            (folder / "README.md").write_text(pipeline_card(self.xpsr_config, repo_id))
            return push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message)

    def enable_vae_slicing(self) -> None:
        """diffusers' switch: the VAE decodes a batch one image at a time. XPSR always encodes and decodes one
        image at a time, so this changes neither the result nor the memory; kept for scripts that call it."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

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

    def super_resolve_video(self, input: str | Path, output_dir: str | Path, **options: Any) -> dict:
        """Super-resolve a clip, a folder of clips or (``video={"image_sequence": True}``) frames into
        ``output_dir``, by the code path of ``xpsr infer input=clip.mp4`` (chunks, temporal stability, timestamps,
        audio; docs/video.md). ``options``: InferConfig keys, ``video`` a dict of ``video.*`` keys. Returns the
        run report."""
        from xpsr.video.api import super_resolve_video

        options.setdefault("scheduler", self._scheduler_name())
        return super_resolve_video(self, input, output_dir, device=self._execution_device.type, **options)

    @torch.no_grad()
    def __call__(self, image: Any = None, prompt: str | list[str] | None = None,
                 quality_prompt: str | list[str] | None = None, num_inference_steps: int | None = None,
                 timesteps: list[int] | None = None, sigmas: list[float] | None = None,
                 guidance_scale: float | None = None, negative_prompt: str | list[str] | None = None,
                 negative_quality_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 eta: float | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 quality_prompt_embeds: torch.Tensor | None = None,
                 negative_quality_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict[str, Any] | None = None,
                 controlnet_conditioning_scale: float | None = None, clip_skip: int | None = None,
                 callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",), **options):
        """Super-resolve ``image`` (a path, PIL image, HWC array, (C, H, W) tensor, or a list / 4-D batch of them;
        value ranges as diffusers': :mod:`xpsr.inference.image_inputs`); ``xpsr infer`` gives the same bytes for the
        same inputs, options and seed.

        ``prompt`` is the content prompt (None: empty, as ``xpsr infer`` without a caption); ``quality_prompt``
        None: the offline heuristic captioner's sentence for the image. ``negative_prompt`` /
        ``negative_quality_prompt`` None: the official ones. ``*_prompt_embeds`` replace the matching text
        (``prompt_embeds`` the content prompt, ``quality_prompt_embeds`` the quality prompt). ``generator``: a CPU
        ``torch.Generator`` (one, or one per image or output); None: seeded with ``seed`` (default 0) for every
        image, as ``xpsr infer``. ``num_inference_steps`` / ``guidance_scale`` None: ``xpsr infer``'s defaults.
        Any other ``InferConfig`` key is an option (``scheduler=`` defaults to the class of ``pipe.scheduler``,
        ``vae_tile=`` to what ``enable_vae_tiling`` set, e.g. ``upscale=4, process_size=512,
        color_fix="adain", start_from="lr"``). The other diffusers arguments follow diffusers (docs: the
        pipeline page's convention table, :data:`~xpsr.inference.pipeline_args.CONVENTIONS`).
        ``output_type``: "pil" (list of images), "np" (float32 NHWC in [0, 1]), "pt" (float32 NCHW) or "latent"."""
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "timesteps": timesteps,
                 "sigmas": sigmas, "eta": eta, "latents": latents, "negative_prompt": negative_prompt,
                 "negative_quality_prompt": negative_quality_prompt, "prompt_embeds": prompt_embeds,
                 "negative_prompt_embeds": negative_prompt_embeds, "quality_prompt_embeds": quality_prompt_embeds,
                 "negative_quality_prompt_embeds": negative_quality_prompt_embeds, "clip_skip": clip_skip}
        cfg = self._call_config(image, prompt, quality_prompt, given, output_type, controlnet_conditioning_scale,
                                options)
        names = list(getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs))
        if set(names) - set(self._callback_tensor_inputs):
            raise ValueError(f"callback tensor inputs must be among {self._callback_tensor_inputs}, got {names}")
        images = to_uint8_images(image)  # ranges per input type: xpsr.inference.image_inputs
        sources = image if isinstance(image, (list, tuple)) and len(image) == len(images) else [image] * len(images)
        images = [checked(a, s, cfg) for a, s in zip(images, sources)]  # the size limits of every face
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, not {num_images_per_prompt!r}")
        texts = {"prompt": prompt, "quality_prompt": quality_prompt}
        jobs = args.plan_jobs(self, images, texts, cfg, given, generator, num_images_per_prompt,
                              output_type == "latent", callback_on_step_end, names)
        offload_hook = getattr(self.vae, "_hf_hook", None)
        if offload_hook is not None:
            # enable_model_cpu_offload hooks forward/encode/decode; a tiled VAE path may call the VAE's
            # submodules directly, so the VAE goes to the execution device for the whole call.
            offload_hook.pre_forward(self.vae)
        self._interrupt, self._cross_attention_kwargs = False, cross_attention_kwargs
        outputs = []
        try:
            for job in jobs:
                self._extras, self._guidance_scale = job.extras, job.cfg.guidance_scale
                outputs.append(super_resolve(self, job.lr, job.content, job.quality, job.cfg, self._execution_device,
                                             generator=job.generator, extras=job.extras,
                                             progress=self.progress_bar))
        finally:
            self._cross_attention_kwargs = None  # only this call's attention processors see them
        self.maybe_free_model_hooks()
        result = args.to_images(outputs, output_type)
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    def _call_config(self, image: Any, prompt: Any, quality_prompt: Any, given: dict[str, Any], output_type: str,
                     controlnet_conditioning_scale: Any, options: dict[str, Any]) -> InferConfig:
        """The call's InferConfig from the standard arguments and the options; refuses what XPSR does not take."""
        args.refuse_unsupported(options)
        args.check_image_and_prompt(image, prompt)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")
        texts = {"prompt": prompt, "quality_prompt": quality_prompt, "negative_prompt": given["negative_prompt"],
                 "negative_quality_prompt": given["negative_quality_prompt"]}
        for text, value in texts.items():
            if value is not None and given[f"{text}_embeds"] is not None:
                raise ValueError(f"pass {text} or {text}_embeds, not both")
        args.conditioning_alias(options, controlnet_conditioning_scale)
        options.setdefault("scheduler", self._scheduler_name())
        options.setdefault("vae_tile", self._vae_tile)
        for name in ("num_inference_steps", "guidance_scale", "negative_prompt", "negative_quality_prompt"):
            if isinstance(given[name], (int, float, str)):  # lists: one per image, set per image below
                options[name] = given[name]
        cfg = infer_config(**options)
        args.warn_onestep_ignores(cfg, given)
        return cfg


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
