"""Configuration: dataclass schemas merged with YAML files and ``key=value`` overrides (OmegaConf).

Every stage reads one schema. ``load_config(Schema, path, overrides)`` (xpsr/config/loader.py) fails fast, naming
the key and the file or override, on unknown keys, wrong types and values against a field's rules (``min=1``,
``odd=True``, ``device=DEVICE``...: xpsr/config/rules.py), declared next to the field; `--help` shows them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from xpsr.config.degradation import DegradationConfig, KernelConfig, StageConfig  # noqa: F401 - re-exported
from xpsr.config.loader import ConfigError, check_values, describe, load_config, to_dict  # noqa: F401 - re-exported
from xpsr.config.onestep import LORA_TARGETS, OneStepConfig  # noqa: F401 - re-exported
from xpsr.config.rules import COLOR_FIXES, DEVICE, FUSION_MODES, METRICS, SCHEDULERS, SEED, TIMESTEP, choice, doc
from xpsr.config.tools import BenchConfig, TablesConfig  # noqa: F401 - re-exported
from xpsr.config.video import VideoConfig


@dataclass
class ModelConfig:
    """What to build: the base Stable Diffusion parts and the XPSR additions."""

    base: str = doc("tiny", "'tiny' (random tiny model built in code), a local diffusers folder, or a hub id")
    revision: str | None = doc(None, "hub revision when `base` is a hub id")
    fusion_mode: str = choice("sfa", FUSION_MODES, "how content and quality prompts meet (docs/model.md)")
    sfa_down_blocks: list[int] | None = doc(None, "ControlNet down blocks with SFA; null = every cross-attention block",
                                       min=0)
    sfa_mid: bool = doc(True, "SFA in the ControlNet mid block")
    unet_sfa: bool = doc(False, "also put SFA into the UNet's cross-attention blocks (not in the paper)")
    pixel_attention: bool = doc(True, "pixel-aware attention in every UNet up-block layer")
    pixel_attention_init: str = choice("zero", ("zero", "random"),
                                       "'zero': proj_out starts at 0 so the UNet starts unchanged; 'random': official")
    dfc_pixel_heads: bool = doc(True, "RGB side outputs of the conditioning embedding (pixel-space DFC)")
    dfc_latent_heads: bool = doc(True, "one 3x3 conv per ControlNet residual to latent channels (latent-space DFC)")
    rrdb: bool = doc(False, "two RRDBs after the conditioning embedding's first conv, growth = its width, BasicSR's "
                            "0.1-scaled init (official `use_rrdb`)")
    conditioning_channels: list[int] = doc([16, 32, 96, 256], "conditioning-embedding widths; one stride-2 stage "
                                          "per entry after the first, as many as the VAE's (4 entries for SD's 8x)",
                                           min=1, nonempty=True)
    gradient_checkpointing: bool = doc(False, "recompute activations in backward (enabled after injection)")
    seed: int = doc(0, "seed for the tiny preset and for freshly initialised XPSR weights", **SEED)


@dataclass
class DemoPriorConfig:
    """The demo's stand-in for Stable Diffusion: a tiny VAE and base UNet pre-trained on the bundled photos."""

    vae_steps: int = doc(400, "VAE training steps (reconstruction of random photo crops)")
    unet_steps: int = doc(600, "base-UNet training steps (denoising the VAE's latents of random photo crops)")
    batch_size: int = doc(8, "crops per step of both stages")
    vae_crop: int = doc(32, "HR crop size in pixels of the VAE stage")
    unet_crop: int = doc(64, "HR crop size in pixels of the UNet stage (latents are crop / 4)")
    vae_learning_rate: float = doc(1e-3, "peak AdamW learning rate of the VAE stage (warm-up, then cosine to 0)")
    unet_learning_rate: float = doc(5e-4, "peak AdamW learning rate of the UNet stage (warm-up, then cosine to 0)")
    reuse: bool = doc(True, "reuse OUTPUT_DIR/prior when it was made with the same settings and photos")


@dataclass
class DemoConfig:
    """`xpsr demo`: the whole pipeline on bundled photos with the tiny model, on CPU, into one HTML report."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(conditioning_channels=[8, 16, 32]))
    prior: DemoPriorConfig = field(default_factory=DemoPriorConfig)
    output_dir: str = doc("xpsr_demo", "where pairs, prompts, the run, SR images, metrics and report.html go",
                          nonempty=True)
    train_steps: int = doc(300, "XPSR training steps of the tiny model (on top of the prior)", min=1)
    learning_rate: float = doc(1e-3, "AdamW learning rate of the XPSR stage (tiny model, few steps: higher than "
                                     "the paper's 5e-5)", above=0)
    crop_size: int = doc(64, "HR crop size of the demo pairs", min=16, multiple_of=8)
    inference_steps: int = doc(20, "denoising steps when super-resolving the held-out images", min=1)
    start_from: str = choice("sdedit", ("lr", "sdedit", "noise"), "initial latent of the held-out SR (see `infer`)")
    added_noise_level: int = doc(400, "timestep the held-out SR starts from (see `infer`)", min=0, max=999)
    guidance_scale: float = doc(3.0, "classifier-free guidance of the held-out SR", min=0)
    seed: int = doc(0, "seed of everything", **SEED)



@dataclass
class PrepareConfig:
    """`xpsr prepare`: HR folders -> hr/, lr/, manifest.jsonl, report.json."""

    inputs: list[str] = doc([], "HR image folders (searched recursively)")
    output_dir: str = doc("???", "where hr/, lr/, manifest.jsonl and report.json go",
                          nonempty=True)
    seed: int = doc(0, "global seed; every pair's randomness derives from (seed, source hash, crop, variant)",
                    **SEED)
    scale: int = doc(4, "super-resolution factor", min=1)
    crop_size: int = doc(512, "HR crop size in pixels (a multiple of `scale`)", min=1)
    crops_per_image: int = doc(1, "random crops per image and variant", min=1)
    variants: int = doc(1, "degraded variants (epochs) per crop position", min=1)
    test_set: bool = doc(False, "one crop per image (DIV2K-Val style) instead of crops_per_image random crops")
    test_crop: str = choice("centre", ("centre", "seeded"), "test_set crop position: the centre or a seeded one")
    small_images: str = choice("pad", ("pad", "skip"), "images smaller than the crop: reflect-pad or skip")
    paired_hr: str | None = doc(None, "import an existing paired set: its HR folder", nonempty=True)
    paired_lr: str | None = doc(None, "import an existing paired set: its LR folder (paired by sorted name)",
                                  nonempty=True)
    workers: int = doc(0, "worker processes (0 = in-process)", min=0)
    device: str = doc("cpu", "device for the torch degradation ops ('cpu', 'cuda')",
                      device=("cpu", "cuda"))
    share_draws_every: int = doc(1, "pairs per group sharing the official per-batch draws (make_train.py: 10; "
                                    "groups: consecutive sources of the sorted input list, per crop and variant)",
                                 min=1)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def validate(self) -> list[tuple[str, str]]:
        if self.crop_size % self.scale:  # else the LR crop is rounded: 130 px HR would get a 32 px LR
            return [("crop_size", f"must be a multiple of scale ({self.scale})")]
        return []


@dataclass
class CaptionConfig:
    """`xpsr caption`: write content or quality prompts of a folder of images into the prompt cache."""

    images: str = doc("???", "folder of images to caption (recursive)", nonempty=True)
    cache: str = doc("???", "prompt cache file (SQLite)", nonempty=True)
    kind: str = choice("quality", ("content", "quality"), "which prompt this run writes")
    captioner: str = choice("heuristic", ("llava", "quality", "heuristic", "fixed", "empty"),
                            "llava / quality: an MLLM; heuristic: offline statistics; fixed/empty: ablations")
    model: str = doc("llava-hf/llava-1.5-7b-hf", "MLLM: local folder or hub id")
    revision: str | None = doc(None, "MLLM hub revision")
    question: str | None = doc(None, "question to the MLLM; null = the paper's question for `kind`")
    template: str | None = doc("USER: <image>\n{question} ASSISTANT:",
                               "prompt template with {question}; null = the processor's chat template")
    fixed_text: str = doc("", "text of the `fixed` captioner")
    image_source: str = choice("lr", ("lr", "hr"), "which image of a pair is captioned (recorded with the prompt)")
    batch_size: int = doc(8, "images per generate call (halved automatically on out-of-memory)",
                         min=1)
    max_new_tokens: int = doc(77, "longest answer in tokens", min=1)
    num_beams: int = doc(1, "1 = greedy decoding", min=1)
    dtype: str = choice("fp16", ("fp16", "bf16", "fp32"), "MLLM weights dtype (fp32 on CPU)")
    device: str = doc("auto", "'auto' (the accelerate process's device), 'cpu', 'cuda'", device=DEVICE)
    trust_remote_code: bool = doc(False, "allow models that ship their own code (only if you trust them)")
    pause_s: float = doc(0.0, "sleep after each batch (shared machines, rate limits, crash tests)", min=0)


@dataclass
class CaptionExportConfig:
    cache: str = doc("???", "prompt cache file", nonempty=True)
    output: str = doc("???", "JSONL file to write", nonempty=True)


@dataclass
class CaptionRepairConfig:
    cache: str = doc("???", "the damaged prompt cache (read from a copy, never modified)", nonempty=True)
    output: str = doc("???", "a new file for the readable rows: a prompt cache (.sqlite) or JSON lines (.jsonl)",
                      nonempty=True)


@dataclass
class CaptionMergeConfig:
    cache: str = doc("???", "the prompt cache whose per-rank shards (CACHE.shards/) are merged into it", nonempty=True)
    kind: str | None = choice(None, (None, "content", "quality"), "merge the shards of one kind; null = all")
    timeout_s: float = doc(600.0, "wait at most this long for a merge running elsewhere (its lock file)", min=0)


@dataclass
class CaptionImportConfig:
    cache: str = doc("???", "prompt cache file (created if missing)", nonempty=True)
    jsonl: str | None = doc(None, "JSONL written by caption-export")
    official_lr: str | None = doc(None, "official layout: an LR/ folder with highlevel_prompt/ and "
                                        "lowlevel_prompt_q/ beside it")


@dataclass
class DatasetConfig:
    """The paired training dataset: pair folders written by `prepare` + the prompt cache."""

    pairs: list[str] = doc([], "folders written by `xpsr prepare` (each with manifest.jsonl)")
    weights: list[float] | None = doc(None, "sampling weight of each folder; null = proportional to size")
    cache: str | None = doc(None, "prompt cache file; null = no prompts (only with missing_prompt=empty)")
    content_captioner: str | None = doc(None, "captioner id of the content prompts; null = the newest per image")
    quality_captioner: str | None = doc(None, "captioner id of the quality prompts; null = the newest per image")
    missing_prompt: str = choice("error", ("error", "empty"), "a pair without a prompt: fail naming it, or use ''")
    crop_size: int = doc(512, "HR training crop (a multiple of the scale); LR crop = crop_size / scale",
                         min=8, multiple_of=8)
    hflip: bool = doc(True, "random horizontal flip (same for LR and HR)")
    original_image_ratio: float = doc(0.1, "probability of conditioning on the HR image itself, with its own "
                                           "quality prompt (official `original_image_ratio`)", min=0, max=1)
    content_dropout: float = doc(0.0, "probability of an empty content prompt (for classifier-free guidance)",
                                  min=0, max=1)
    quality_dropout: float = doc(0.0, "probability of an empty quality prompt (for classifier-free guidance)",
                                  min=0, max=1)
    return_lr: bool = doc(False, "also return the native-size LR crop")
    latent_cache: str | None = doc(None, "VAE posterior moments of the HR images made by `xpsr.training.latent_cache` "
                                         "(a folder): the training step draws its latent sample from them and runs no "
                                         "VAE encoder (needs crop_size = the HR size of the pairs)", nonempty=True)
    seed: int = doc(0, "seed of the per-sample randomness (crop, flip, dropout)", **SEED)
    allow_old_recipe: bool = doc(False, "read pair folders made by an older `prepare` recipe (warning) "
                                        "instead of failing; docs/data.md")
    bad_manifest_lines: str = choice("error", ("error", "skip"),
                                     "manifest lines that cannot be used (bad JSON, missing keys, paths leaving "
                                     "the folder): fail naming them, or skip them with a warning naming them")
    check_hashes: bool = doc(True, "compare each image read with the manifest's hr_hash/lr_hash (a changed or "
                                   "swapped file fails naming the pair)")


@dataclass
class DFCConfig:
    """Degradation-free constraint terms of the training loss."""

    weight: float = doc(0.05, "lambda: every DFC term is multiplied by it (paper and official code: 0.05)",
                        min=0)
    pixel: bool = doc(True, "pixel-space terms (RGB side outputs vs resized HR)")
    latent: bool = doc(True, "latent-space terms (latent heads vs resized HR latents)")
    latent_scales: str = choice("all", ("all", "paper"),
                                "all: one term per ControlNet residual + mid (official, 13 for SD 1.5); "
                                "paper: one term at each of the 3 finest latent resolutions")


@dataclass
class ValidationConfig:
    """Validation samples with the inference code (`xpsr.inference`): the settings of ``infer_config``
    (an `xpsr infer` YAML; null = InferConfig's defaults, the official test config), then the sampling keys
    below on top. Their defaults are the official validation (train.py `log_validation` + xpsr_valid.yaml)."""

    every: int = doc(0, "validate every N steps (0 = never)", min=0)
    num_images: int = doc(2, "validation pairs, taken in order from the first data folder", min=1)
    infer_config: str | None = doc(None, "an `xpsr infer` YAML for prompts, resize, tiling, colour fix...; "
                                         "null = InferConfig defaults (the official test config)")
    scheduler: str = choice("unipc", SCHEDULERS, "sampler, as `xpsr infer scheduler=` (official validation: UniPC)")
    num_inference_steps: int = doc(20, "sampling steps (official: 20)", min=1)
    guidance_scale: float = doc(5.5, "classifier-free guidance (paper 5.5; official validation config 4.5)")
    start_from: str = choice("lr", ("lr", "sdedit", "noise"), "initial latent, as `xpsr infer start_from=` "
                             "(official: the LR latent, twice noised)")
    added_noise_level: int = doc(400, "timestep of the second noising of the LR latent (official validation: 400; "
                                      "official test: 800)", **TIMESTEP)
    color_fix: str = choice("none", COLOR_FIXES, "colour fix, as `xpsr infer color_fix=` (official validation: none)")
    use_ema: bool = doc(True, "sample with the EMA weights when EMA is on")


@dataclass
class TrainConfig:
    """`xpsr train`: one recipe = model + data + optimisation + logging."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    demo_data: bool = doc(False, "make a small dataset from bundled sample photos under output_dir (tiny recipe)")
    output_dir: str = doc("???", "run directory: checkpoints/, final/, logs/, samples/, config.yaml",
                          nonempty=True)
    max_steps: int = doc(1000, "optimizer steps", min=1)
    stop_at_step: int | None = doc(None, "end this session at this step with a checkpoint (time-limited jobs); "
                                         "the LR schedule still targets max_steps; resume=latest continues", min=1)
    seed: int = doc(0, "seed of noise, timesteps, fresh weights, demo data and the global RNGs (the data "
                       "order and crops have their own `data.seed`)", **SEED)
    resume: str | None = doc(None, "'latest', a checkpoint folder, or null", nonempty=True)
    batch_size: int = doc(2, "images per process per micro-step", min=1)
    gradient_accumulation_steps: int = doc(1, "micro-steps per optimizer step", min=1)
    learning_rate: float = doc(5e-5, "AdamW learning rate", above=0)
    lr_scheduler: str = choice("constant", ("constant", "constant_with_warmup", "linear", "cosine"), "LR schedule")
    lr_warmup_steps: int = doc(0, "warm-up steps of the schedule", min=0)
    adam_beta1: float = doc(0.9, "AdamW beta1", min=0, below=1)
    adam_beta2: float = doc(0.999, "AdamW beta2", min=0, below=1)
    adam_weight_decay: float = doc(1e-2, "AdamW weight decay", min=0)
    adam_epsilon: float = doc(1e-8, "AdamW epsilon", above=0)
    use_8bit_adam: bool = doc(False, "bitsandbytes AdamW8bit (pip install -e \".[lowmem]\"; also steps on CPU)")
    max_grad_norm: float = doc(1.0, "gradient clipping (0 = off)", min=0)
    mixed_precision: str = choice("fp32", ("fp32", "fp16", "bf16"), "autocast dtype of the forward; the frozen VAE and "
                                  "text encoder are stored in it (trainable weights stay fp32)")
    frozen_unet_dtype: str = choice("fp32", ("fp32", "mixed_precision"),
                                    "storage of the frozen UNet weights: fp32 (official; autocast computes in "
                                    "mixed_precision) or mixed_precision (half the memory of those weights)")
    deterministic: bool = doc(False, "deterministic GPU kernels: torch deterministic algorithms, cuBLAS workspace "
                                     ":4096:8, cuDNN deterministic without autotuning (slower; CPU runs are "
                                     "deterministic without it)")
    allow_tf32: bool = doc(False, "TF32 matmuls on Ampere+ GPUs")
    compile: bool = doc(False, "torch.compile the UNet and ControlNet")
    use_ema: bool = doc(False, "keep an exponential moving average of the trainable weights")
    ema_decay: float = doc(0.9999, "EMA decay", min=0, max=1)
    content_prompt: str = choice("caption", ("caption", "empty"),
                                 "caption: the cached content prompt (paper); empty: '' (the official release)")
    dfc: DFCConfig = field(default_factory=DFCConfig)
    onestep: OneStepConfig = field(default_factory=OneStepConfig)
    checkpoint_every: int = doc(500, "write checkpoints/step-N every N steps; 0 = never (warns: only stop_at_step "
                                     "and the final weights are written, an interrupted run starts over)", min=0)
    checkpoints_total_limit: int | None = doc(3, "keep at most this many valid checkpoints (null = all); "
                                                 "damaged ones are never deleted", min=1)
    checkpoint_hashes: bool = doc(True, "record every checkpoint file's sha256 in its checksums.json and check them "
                                        "before resuming (sizes are always checked); false skips the hashing")
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    report_to: str = choice("tensorboard", ("tensorboard", "wandb", "none"), "experiment logger")
    log_every: int = doc(10, "log losses every N steps", min=1)
    num_workers: int = doc(2, "DataLoader workers", min=0)
    device: str = doc("auto", "'auto' (accelerate decides), or 'cpu' to force the CPU", device=("auto", "cpu"))
    memory_check: bool = doc(True, "on CUDA, compare the memory plan (xpsr plan) with the free GPU memory before the "
                                   "first step and refuse, naming settings that fit (a shipped planned row is "
                                   "instant; another setting is planned on fake tensors: a minute or two at SD size)")


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


@dataclass
class EvalConfig:
    """`xpsr eval`: SR folder (vs HR folder) -> metrics.csv, summary.json, table.md."""

    sr: str = doc("???", "folder of SR images", nonempty=True)
    hr: str | None = doc(None, "folder of HR images (paired by sorted name); needed by full-reference metrics",
                          nonempty=True)
    output_dir: str = doc("???", "where metrics.csv, summary.json, table.md and the per-image cache go",
                          nonempty=True)
    metrics: list[str] = doc(["psnr", "ssim", "lpips", "dists", "fid", "niqe", "maniqa", "clipiqa", "musiq"],
                             "metrics to compute", nonempty=True, each_of=METRICS)
    crop_border: int = doc(0, "pixels cropped at each border for PSNR/SSIM (0 = official)", min=0)
    weights_dir: str | None = doc(None, "folder of metric weight files (else $XPSR_METRIC_WEIGHTS)")
    device: str = doc("auto", "'auto', 'cpu' or 'cuda'", device=DEVICE)
    label: str | None = doc(None, "name of this result in tables (default: the SR folder's name)")


# configs/<folder>/*.yaml are validated against these schemas (tests load every file).
@dataclass
class PlanConfig:
    """`xpsr plan`: peak GPU memory of one training step or one super-resolution, by category and module."""

    what: str = choice("train", ("train", "infer"), "plan one training step or one super-resolution")
    preset: str = choice("sd15", ("tiny", "sd15", "sd21", "sd15-narrow"),
                         "model shapes (random weights; only shapes matter); sd15-narrow: SD 1.5's layout with "
                         "fewer channels (the CPU validation)")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="-"))
    infer: InferConfig = field(default_factory=lambda: InferConfig(input="-", output_dir="-"))
    train_config: str | None = doc(None, "what=train: an `xpsr train` YAML that replaces the train section",
                                   nonempty=True)
    infer_config: str | None = doc(None, "what=infer: an `xpsr infer` YAML that replaces the infer section",
                                   nonempty=True)
    output_size: int = doc(512, "what=infer: output side in px (input = output / infer.upscale)", min=8)
    fragmentation: float = doc(0.10, "margin: the caching allocator's share on top of the planned peak", min=0)
    fixed_gib: float = doc(1.0, "margin: GiB for the CUDA context, cuBLAS/cuDNN workspaces and kernels", min=0)
    cards_gib: list[float] = doc([8, 12, 16, 24, 40, 80], "card sizes (GiB) to check the plan against")
    free_gib: float | None = doc(None, "compare with this much free memory (GiB) and refuse, naming settings "
                                       "that fit, if the plan does not fit (what `xpsr train` does on CUDA)", min=0)
    output: str | None = doc(None, "also write the whole plan (categories, modules, estimates) as JSON here",
                             nonempty=True)


SCHEMAS: dict[str, type] = {"model": ModelConfig, "demo": DemoConfig, "bench": BenchConfig,
                           "data": PrepareConfig, "caption": CaptionConfig, "train": TrainConfig,
                           "infer": InferConfig, "eval": EvalConfig, "serve": ServeConfig,
                           "plan": PlanConfig}

