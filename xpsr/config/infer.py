"""Schemas of inference and of the faces that run it: ``xpsr infer``, ``xpsr export``, ``xpsr serve``."""
from __future__ import annotations

from dataclasses import dataclass, field

from xpsr.config.model import ModelConfig
from xpsr.config.rules import COLOR_FIXES, DEVICE, SCHEDULERS, SEED, TIMESTEP, choice, doc
from xpsr.config.video import VideoConfig


@dataclass
class InferConfig:
    """`xpsr infer`: LR images -> SR images."""

    input: str = doc("???", "an LR image or a folder of them (recursive)", nonempty=True)
    output_dir: str = doc("???", "where SR images go, named like the inputs (.png)", nonempty=True)
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: str | None = doc(None, "our trained .safetensors, a run dir (final/), an exported folder, an "
                                    "official XPSR folder; null = the freshly built model (tiny smoke tests)")
    mode: str | None = choice(None, ("multistep", "onestep"),
                              "multistep: the XPSR sampler; onestep: one UNet + ControlNet call at onestep_timestep, "
                              "no CFG (docs/one-step.md); null = as the weights were trained (onestep for a "
                              "one-step student's run or export, else multistep)")
    onestep_timestep: int | None = doc(None, "mode=onestep: the timestep t*; null = the one the weights were trained "
                                             "with (999 for weights that do not say)", min=0, max=999)
    multistep_on_student: bool = doc(False, "allow mode=multistep on a one-step student's weights (its LoRA changes "
                                            "every step of the sampler: experiments only)")
    scheduler: str = choice("ddpm", SCHEDULERS, "sampler (official test: DDPM)")
    num_inference_steps: int = doc(20, "denoising steps (official: 20)", min=1)
    guidance_scale: float = doc(4.5, "classifier-free guidance (official test config 4.5; paper 5.5)")
    conditioning_scale: float = doc(1.0, "ControlNet residual scale")
    added_prompt: str = doc("clean, high-resolution, 8k, high quality, clear text.",
                            "appended to the content prompt after a space, as the official test script does")
    negative_prompt: str = doc("blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed.",
                               "negative content prompt (as the official xpsr_test.yaml, final period included)")
    negative_quality_prompt: str = doc("high resolution, best quality, clear", "negative quality prompt")
    start_from: str = choice("lr", ("lr", "sdedit", "noise"),
                             "initial latent. lr (official): the LR latent noised to the first timestep, then "
                             "noised again to added_noise_level, and every step is sampled; sdedit: the LR latent "
                             "noised once to added_noise_level and sampling starts there (fewer steps); noise")
    lr_latent: str | None = choice(None, ("sample", "mean"),
                                   "the LR latent: a sample of the VAE posterior drawn with the seeded generator "
                                   "(official: latent_dist.sample), or its mean; null = sample for the multi-step "
                                   "sampler, and for mode=onestep the one the weights were trained with (mean for "
                                   "weights that do not say)")
    added_noise_level: int = doc(800, "start_from=lr: timestep of the second noising; start_from=sdedit: the "
                                      "timestep sampling starts at (the first scheduled one at or below it)",
                                **TIMESTEP)
    upscale: int = doc(4, "output = upscale x input", min=1)
    resize: str = choice("pil", ("pil", "torch"),
                         "pil (official test script): 8-bit PIL bicubic x upscale, PIL bilinear up to process_size, "
                         "and PIL bicubic back to the output size; torch: one float bicubic resize each way")
    process_size: int = doc(512, "outputs whose short side is smaller are processed with this short side (sizes "
                                 "rounded down to multiples of 8, as the official script), then resized back",
                                 min=8)
    color_fix: str = choice("adain", COLOR_FIXES, "colour correction against the LR (official: adain)")
    color_fix_8bit: bool = doc(False, "as the official test script: the SR rounded to 8 bits before the colour fix "
                                      "and the fixed image truncated to 8 bits after it (its ToPILImage); false: "
                                      "the fix on floats, rounded once at the end")
    seed: int = doc(0, "seed of the initial noise and the sampler", **SEED)
    dtype: str = choice("fp32", ("fp32", "fp16", "bf16"), "weights and compute dtype")
    device: str = doc("auto", "'auto' (the accelerate process's device), 'cpu', 'cuda'", device=DEVICE)
    weights_storage: str = choice("same", ("same", "fp8"),
                                  "same: weights stored in `dtype`; fp8: UNet and ControlNet weights stored in fp8 "
                                  "(e4m3) and computed in `dtype` (bf16/fp16), diffusers' layerwise casting "
                                  "(docs/gpu-memory.md: memory saved, PSNR cost)")
    memory_check: bool = doc(True, "on CUDA, before the first image: compare the planned peak of the largest image "
                                   "(a shipped planned row of the same setting, docs/gpu-memory.md) with the free "
                                   "GPU memory and refuse, naming settings that fit")
    offload: str = choice("none", ("none", "model", "group"),
                          "CPU offload: model = each part on the GPU only while it runs; group = block by block "
                          "(diffusers' group offload; least memory, slowest)")
    latent_tile: int = doc(64, "latent tile size (x8 px); larger latents are denoised tile by tile (see "
                               "latent_tiling); 0 = never tile", min=0)
    latent_overlap: int = doc(16, "overlap of latent tiles (smaller than latent_tile)", min=0)
    latent_tiling: str = choice("ours", ("ours", "official"),
                                "ours: tile when a side exceeds latent_tile, Gaussian weights sigma = tile/4; "
                                "official: the official pipeline's rule (tile only when h*w > latent_tile^2, "
                                "square tiles, its weights; official values latent_tile=320 latent_overlap=8)")
    vae_tile: int = doc(1024, "VAE encoder tile in px (official encoder_tiled_size 1024), padded by the encoder's "
                              "receptive field (120 px for SD's VAE); images up to tile + 2 x padding (1264 px "
                              "for SD's VAE; the official tiles above 1088) are encoded whole; 0 = never tile",
                     min=0)
    vae_decoder_tile: int = doc(224, "VAE decoder tile in latents (official decoder_tiled_size 224), padded by "
                                     "the decoder's receptive field (18 latents for SD's VAE); latents up to "
                                     "tile + 2 x padding (260 for SD's VAE; the official tiles above 246) are "
                                     "decoded whole; 0 = never tile", min=0)
    vae_tile_attention: str = choice("global", ("global", "tile"),
                                     "tiled VAE mid-block attention. global: every tile attends to the keys/values "
                                     "of the whole image (exact; keeps them in memory); tile: attends within its "
                                     "padded tile, as the official tiled VAE (approximate)")
    vae_tile_cache_mb: int = doc(2048, "tiled VAE: MB of tile states kept between the whole-image GroupNorm "
                                       "sweeps; beyond it tiles are recomputed (slower, memory stays bounded)",
                                min=0)
    max_output_pixels: int = doc(4096 * 4096, "an input whose output (input x upscale) has more pixels is refused "
                                              "and named in infer_report.json, checked from the file header before "
                                              "decoding (e.g. upscale=1000 on 32x32); 0 = no limit", min=0)
    max_process_pixels: int = doc(4096 * 4096, "an input whose processing size (the output with its short side "
                                               "raised to process_size) has more pixels is refused: a 1x3000 strip "
                                               "at x4 would be processed at 512x1,536,000 px; 0 = no limit", min=0)
    prompts: str = choice("cache", ("cache", "fixed"), "cache: prompts of each input from the prompt cache; "
                          "fixed: `prompt`/`quality_prompt` for every image")
    cache: str | None = doc(None, "prompt cache file (prompts=cache)", nonempty=True)
    caption_first: list[str] = doc([], "caption configs (e.g. configs/caption/llava_content.yaml, "
                                       "llava_quality.yaml) run on the inputs into `cache` before SR; already "
                                       "cached images are skipped, and the captioners are freed before SR starts. "
                                       "`cache` defaults to OUTPUT_DIR/prompts.sqlite then")
    caption_missing: bool = doc(True, "prompts=cache: images without prompts get a heuristic quality prompt and an "
                                      "empty content prompt instead of an error")
    prompt: str = doc("", "prompts=fixed: content prompt")
    quality_prompt: str = doc("", "prompts=fixed: quality prompt")
    video: VideoConfig = field(default_factory=VideoConfig)  # video inputs only (docs/video.md)

    def validate(self) -> list[tuple[str, str]]:
        if self.latent_tile and self.latent_overlap >= self.latent_tile:  # stride 1: a tile per latent, very slow
            return [("latent_overlap", f"must be smaller than latent_tile ({self.latent_tile})")]
        return []


@dataclass
class ExportConfig:
    """`xpsr export`: trained or official XPSR weights -> a diffusers folder with a model card."""

    weights: str = doc("???", "a training run dir (final/trained.safetensors), a checkpoint folder "
                              "(checkpoints/step-N), a trained .safetensors file, an official XPSR folder "
                              "(imported), or an exported folder", nonempty=True)
    output: str = doc("???", "the folder to write (model_index.json, components, README.md model card)",
                     nonempty=True)
    model: ModelConfig = field(default_factory=ModelConfig)
    overwrite: bool = doc(False, "write into an output folder that already has files")
    merge_lora: bool = doc(False, "weights of a one-step run: merge the student's LoRA into the UNet weights "
                                  "(needed to export one-step weights)")
    license: str | None = doc(None, "model card `license` (a Hub licence id); null: apache-2.0 for the tiny "
                                    "model, else 'other' with a line naming the base model whose licence applies")
    base_model: str | None = doc(None, "model card `base_model` (a Hub model id); null: model.base when it is a "
                                       "Hub id, else left out of the card")
    push_to_hub: str | None = doc(None, "Hub repo id to upload the folder to (huggingface_hub.upload_folder; "
                                        "needs network and a token); null = only write the folder")


@dataclass
class ServeConfig:
    """`xpsr serve`: a web app (Gradio) that super-resolves uploaded images; control defaults below."""

    host: str = doc("127.0.0.1", "address to listen on (0.0.0.0 exposes the app to the network)")
    port: int = doc(7860, "port to listen on", min=1, max=65535)
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: str | None = doc(None, "as `xpsr infer weights=`; null = the freshly built model (tiny, no downloads)")
    device: str = doc("auto", "'auto' (cuda if available), 'cpu', 'cuda'", device=DEVICE)
    dtype: str = choice("fp32", ("fp32", "fp16", "bf16"), "weights and compute dtype")
    weights_storage: str = choice("same", ("same", "fp8"), "as `xpsr infer weights_storage=`: fp8 storage of the UNet "
                                  "and ControlNet weights, computed in `dtype`")
    memory_check: bool = doc(True, "on CUDA, before the first image: compare the planned peak of the largest image "
                                   "(a shipped planned row of the same setting, docs/gpu-memory.md) with the free "
                                   "GPU memory and refuse, naming settings that fit")
    offload: str = choice("none", ("none", "model", "group"), "as `xpsr infer offload=`: CPU offload")
    scheduler: str = choice("ddpm", SCHEDULERS, "sampler (official test: DDPM)")
    mode: str | None = choice(None, ("multistep", "onestep"), "as `xpsr infer mode=`; null = what the weights were "
                              "trained for (onestep for a one-step student, else multistep)")
    onestep_timestep: int | None = doc(None, "mode=onestep: the timestep t*; null = the one the weights were "
                                             "trained with (999 for weights that do not say)", min=0, max=999)
    lr_latent: str | None = choice(None, ("sample", "mean"), "LR latent (posterior sample or mean), as `xpsr infer "
                                   "lr_latent=`; null = the one the weights were trained with (else sample)")
    num_inference_steps: int = doc(20, "default of the steps control", min=1)
    guidance_scale: float = doc(4.5, "default of the guidance control")
    start_from: str = choice("lr", ("lr", "sdedit", "noise"), "initial latent, as `xpsr infer start_from=`")
    added_noise_level: int = doc(800, "as `xpsr infer added_noise_level=`", min=0, max=999)
    seed: int = doc(0, "default of the seed control", **SEED)
    color_fix: str = choice("adain", COLOR_FIXES, "default of the colour-fix control")
    upscale: int = doc(4, "default of the upscale control (1-8)", min=1, max=8)
    process_size: int = doc(512, "as `xpsr infer process_size=`: small outputs are processed at this short side",
                            min=8)
    latent_tile: int = doc(64, "default latent tile of the tiling control (x8 px)", min=1)
    latent_overlap: int = doc(16, "overlap of latent tiles (at most half a tile is used)", min=0)
    vae_tile: int = doc(512, "VAE tile in px while tiling is on", min=8)
    untiled_max_side: int = doc(1024, "processing sizes with a longer side above this (px) are always tiled, "
                                      "whatever the tiling control says", min=8)
    max_output_pixels: int = doc(4096 * 4096, "uploads whose output (input x upscale) has more pixels are refused "
                                              "with a message (checked from the file header, before decoding)",
                                  min=1)
    max_process_pixels: int = doc(4096 * 4096, "as `xpsr infer max_process_pixels=`: uploads whose processing size "
                                               "(the output with its short side raised to process_size) has more "
                                               "pixels are refused; 0 = no limit", min=0)
    max_file_mb: int = doc(50, "largest upload in MB (Gradio refuses bigger files)", min=1)
    max_video_frames: int = doc(48, "video uploads: only the first N frames are super-resolved (longer clips: "
                                    "`xpsr infer input=CLIP`)", min=1)
    content_captioner: str | None = doc(None, "caption config (kind=content) that fills the content prompt, e.g. "
                                              "configs/caption/llava_content.yaml, loaded once on first use; "
                                              "null = the content prompt starts empty")
    output_dir: str | None = doc(None, "where result PNGs are written for download; null = a new temporary folder",
                                    nonempty=True)
