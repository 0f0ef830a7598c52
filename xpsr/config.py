"""Configuration: dataclass schemas merged with YAML files and ``key=value`` overrides (OmegaConf).

Every stage reads one schema. ``load_config(Schema, path, overrides)`` fails fast, naming the key and
the file, on unknown keys, wrong types and values outside a field's ``choices``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

FUSION_MODES = ("sfa", "sequential", "content_only", "quality_only")


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key and where it came from."""


def choice(default: str, choices: Sequence[str], doc: str) -> Any:
    return field(default=default, metadata={"choices": tuple(choices), "doc": doc})


def doc(default: Any, text: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    """What to build: the base Stable Diffusion parts and the XPSR additions."""

    base: str = doc("tiny", "'tiny' (random tiny model built in code), a local diffusers folder, or a hub id")
    revision: str | None = doc(None, "hub revision when `base` is a hub id")
    fusion_mode: str = choice("sfa", FUSION_MODES, "how content and quality prompts meet (README: Fusion modes)")
    sfa_down_blocks: list[int] | None = doc(None, "ControlNet down blocks with SFA; null = every cross-attention block")
    sfa_mid: bool = doc(True, "SFA in the ControlNet mid block")
    unet_sfa: bool = doc(False, "also put SFA into the UNet's cross-attention blocks (not in the paper)")
    pixel_attention: bool = doc(True, "pixel-aware attention in every UNet up-block layer")
    pixel_attention_init: str = choice("zero", ("zero", "random"),
                                       "'zero': proj_out starts at 0 so the UNet starts unchanged; 'random': official")
    dfc_pixel_heads: bool = doc(True, "RGB side outputs of the conditioning embedding (pixel-space DFC)")
    dfc_latent_heads: bool = doc(True, "one 3x3 conv per ControlNet residual to latent channels (latent-space DFC)")
    rrdb: bool = doc(False, "two RRDBs after the conditioning embedding's first conv, growth = its width, BasicSR's "
                            "0.1-scaled init (official `use_rrdb`)")
    conditioning_channels: list[int] = doc([16, 32, 96, 256], "conditioning-embedding widths (3 stride-2 stages)")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward (enabled after injection)")
    seed: int = doc(0, "seed for the tiny preset and for freshly initialised XPSR weights")


@dataclass
class DemoConfig:
    """`xpsr demo`: the whole pipeline on bundled photos with the tiny model, on CPU, into one HTML report."""

    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: str = doc("xpsr_demo", "where pairs, prompts, the run, SR images, metrics and report.html go")
    train_steps: int = doc(300, "training steps of the tiny model")
    crop_size: int = doc(64, "HR crop size of the demo pairs")
    inference_steps: int = doc(20, "denoising steps when super-resolving the held-out images")
    seed: int = doc(0, "seed of everything")


@dataclass
class BenchConfig:
    what: str = choice("train", ("train", "data", "infer", "flops"),
                       "train: one training step (forward + backward + AdamW); data: prepare pairs/s, heuristic "
                       "captions/s, dataset samples/s; infer: seconds per image; flops: FLOPs per image of the "
                       "multi-step and the one-step sampler (meta device, no weights, no compute)")
    mode: str = choice("multistep", ("multistep", "onestep", "both"),
                       "what=infer: the multi-step sampler, the one-step student (an untrained LoRA adapter), or "
                       "both in the same run")
    preset: str = choice("tiny", ("tiny", "sd15", "sd21"), "model shapes; sd15/sd21 use random weights")
    resolution: int = doc(64, "HR image size in pixels (latents are 1/8)")
    batch_size: int = doc(2, "images per step")
    steps: int = doc(5, "timed steps")
    warmup: int = doc(2, "untimed steps first")
    device: str = doc("auto", "'auto', 'cpu' or 'cuda'")
    dtype: str = choice("fp32", ("fp32", "bf16", "fp16"), "autocast dtype of the forward (trainable weights stay fp32)")
    frozen_unet_dtype: str = choice("fp32", ("fp32", "mixed_precision"),
                                    "what=train: frozen UNet weights in fp32 (official) or in `dtype`")
    deterministic: bool = doc(False, "what=train: deterministic GPU kernels, as `xpsr train deterministic=true`")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward")
    compile: bool = doc(False, "torch.compile the UNet and ControlNet")
    fusion_mode: str = choice("sfa", FUSION_MODES, "fusion mode of the benchmarked model")
    seed: int = doc(0, "random seed")
    workers: int = doc(2, "worker processes of prepare and of the DataLoader (what=data, include_data=true)")
    include_data: bool = doc(False, "what=train: batches from the DataLoader + text encoder (tiny preset only)")
    lr_size: int = doc(128, "what=infer: LR input size (output = 4x)")
    tiled: bool = doc(True, "what=infer: tiled latent diffusion (64-latent tiles) and VAE (512 px encoder / "
                            "64-latent decoder tiles)")
    inference_steps: int = doc(20, "what=infer: denoising steps")


@dataclass
class KernelConfig:
    """One blur stage's kernel sampler (Real-ESRGAN's random mixed kernels)."""

    sizes: list[int] = doc([7, 9, 11, 13, 15, 17, 19, 21], "odd kernel sizes to choose from")
    sinc_prob: float = doc(0.1, "probability of a sinc (ringing) kernel instead of a blur kernel")
    kinds: list[str] = doc(["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"],
                           "blur kernel kinds")
    kind_probs: list[float] = doc([0.45, 0.25, 0.12, 0.03, 0.12, 0.03], "probability of each kind")
    sigma: list[float] = doc([0.2, 3.0], "sigma range of Gaussian-type kernels")
    betag: list[float] = doc([0.5, 4.0], "beta range of generalized Gaussian kernels")
    betap: list[float] = doc([1.0, 2.0], "beta range of plateau kernels")


@dataclass
class StageConfig:
    """One degradation stage: blur -> random resize -> noise -> JPEG."""

    blur_prob: float = doc(1.0, "probability of blurring in this stage")
    kernel: KernelConfig = field(default_factory=KernelConfig)
    resize_prob: list[float] = doc([0.2, 0.7, 0.1], "probabilities of up / down / keep")
    resize_range: list[float] = doc([0.15, 1.5], "resize factor range")
    resize_modes: list[str] = doc(["area", "bilinear", "bicubic"], "interpolation modes, chosen uniformly")
    gaussian_noise_prob: float = doc(0.5, "Gaussian noise, else Poisson noise")
    noise_range: list[float] = doc([1.0, 30.0], "Gaussian noise sigma range (on the 0-255 scale)")
    poisson_scale_range: list[float] = doc([0.05, 3.0], "Poisson noise scale range")
    gray_noise_prob: float = doc(0.4, "probability that the noise is the same in all channels")
    jpeg_prob: float = doc(1.0, "probability of JPEG compression in this stage")
    jpeg_range: list[int] = doc([30, 95], "JPEG quality range")


def _second_stage() -> "StageConfig":
    return StageConfig(blur_prob=0.8, kernel=KernelConfig(sigma=[0.2, 1.5]), resize_prob=[0.3, 0.4, 0.3],
                       resize_range=[0.3, 1.2], noise_range=[1.0, 25.0], poisson_scale_range=[0.05, 2.5])


@dataclass
class DegradationConfig:
    """Real-ESRGAN second-order degradation; defaults are Real-ESRGAN's published ones."""

    stage1: StageConfig = field(default_factory=StageConfig)
    second_order_prob: float = doc(1.0, "probability of running the second stage at all")
    stage2: StageConfig = field(default_factory=_second_stage)
    final_sinc_prob: float = doc(0.8, "probability of the final sinc filter")
    final_sinc_sizes: list[int] = doc([7, 9, 11, 13, 15, 17, 19, 21], "kernel sizes of the final sinc filter")
    kernel_pad_to: int = doc(21, "every kernel is zero-padded to this size")
    usm_gt: bool = doc(True, "unsharp-mask the HR crop (saved as the HR image)")
    degrade_sharpened: bool = doc(True, "with usm_gt: degrade the sharpened crop (official make_train.py, "
                                        "Real-ESRGAN); false = degrade the plain crop (recipe v1 order, ablation)")
    jpeg_codec: str = choice("torch", ("torch", "opencv"), "'torch': BasicSR DiffJPEG's arithmetic with hard "
                             "rounding and float quality (official); 'opencv': a real 8-bit codec, integer quality")
    usm_weight: float = doc(0.5, "USM weight")
    usm_radius: int = doc(50, "USM Gaussian size (made odd)")
    usm_threshold: float = doc(10.0, "USM threshold on the 0-255 scale")


@dataclass
class PrepareConfig:
    """`xpsr prepare`: HR folders -> hr/, lr/, manifest.jsonl, report.json."""

    inputs: list[str] = doc([], "HR image folders (searched recursively)")
    output_dir: str = doc("???", "where hr/, lr/, manifest.jsonl and report.json go")
    seed: int = doc(0, "global seed; every pair's randomness derives from (seed, source hash, crop, variant)")
    scale: int = doc(4, "super-resolution factor")
    crop_size: int = doc(512, "HR crop size in pixels")
    crops_per_image: int = doc(1, "random crops per image and variant")
    variants: int = doc(1, "degraded variants (epochs) per crop position")
    test_set: bool = doc(False, "one crop per image (DIV2K-Val style) instead of crops_per_image random crops")
    test_crop: str = choice("centre", ("centre", "seeded"), "test_set crop position: the centre or a seeded one")
    small_images: str = choice("pad", ("pad", "skip"), "images smaller than the crop: reflect-pad or skip")
    paired_hr: str | None = doc(None, "import an existing paired set: its HR folder")
    paired_lr: str | None = doc(None, "import an existing paired set: its LR folder (paired by sorted name)")
    workers: int = doc(0, "worker processes (0 = in-process)")
    device: str = doc("cpu", "device for the torch degradation ops ('cpu', 'cuda')")
    share_draws_every: int = doc(1, "pairs per group sharing the official per-batch draws (make_train.py: 10; "
                                    "groups: consecutive sources of the sorted input list, per crop and variant)")
    degradation: DegradationConfig = field(default_factory=DegradationConfig)


@dataclass
class CaptionConfig:
    """`xpsr caption`: write content or quality prompts of a folder of images into the prompt cache."""

    images: str = doc("???", "folder of images to caption (recursive)")
    cache: str = doc("???", "prompt cache file (SQLite)")
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
    batch_size: int = doc(8, "images per generate call (halved automatically on out-of-memory)")
    max_new_tokens: int = doc(77, "longest answer in tokens")
    num_beams: int = doc(1, "1 = greedy decoding")
    dtype: str = choice("fp16", ("fp16", "bf16", "fp32"), "MLLM weights dtype (fp32 on CPU)")
    device: str = doc("auto", "'auto' (the accelerate process's device), 'cpu', 'cuda'")
    trust_remote_code: bool = doc(False, "allow models that ship their own code (only if you trust them)")
    pause_s: float = doc(0.0, "sleep after each batch (shared machines, rate limits, crash tests)")


@dataclass
class CaptionExportConfig:
    cache: str = doc("???", "prompt cache file")
    output: str = doc("???", "JSONL file to write")


@dataclass
class CaptionImportConfig:
    cache: str = doc("???", "prompt cache file (created if missing)")
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
    crop_size: int = doc(512, "HR training crop (a multiple of the scale); LR crop = crop_size / scale")
    hflip: bool = doc(True, "random horizontal flip (same for LR and HR)")
    original_image_ratio: float = doc(0.1, "probability of conditioning on the HR image itself, with its own "
                                           "quality prompt (official `original_image_ratio`)")
    content_dropout: float = doc(0.0, "probability of an empty content prompt (for classifier-free guidance)")
    quality_dropout: float = doc(0.0, "probability of an empty quality prompt (for classifier-free guidance)")
    return_lr: bool = doc(False, "also return the native-size LR crop")
    seed: int = doc(0, "seed of the per-sample randomness (crop, flip, dropout)")
    allow_old_recipe: bool = doc(False, "read pair folders made by an older `prepare` recipe (warning) "
                                        "instead of failing; README: Data")
    bad_manifest_lines: str = choice("error", ("error", "skip"),
                                     "manifest lines that cannot be used (bad JSON, missing keys, paths leaving "
                                     "the folder): fail naming them, or skip them with a warning naming them")
    check_hashes: bool = doc(True, "compare each image read with the manifest's hr_hash/lr_hash (a changed or "
                                   "swapped file fails naming the pair)")


@dataclass
class DFCConfig:
    """Degradation-free constraint terms of the training loss."""

    weight: float = doc(0.05, "lambda: every DFC term is multiplied by it (paper and official code: 0.05)")
    pixel: bool = doc(True, "pixel-space terms (RGB side outputs vs resized HR)")
    latent: bool = doc(True, "latent-space terms (latent heads vs resized HR latents)")
    latent_scales: str = choice("all", ("all", "paper"),
                                "all: one term per ControlNet residual + mid (official, 13 for SD 1.5); "
                                "paper: one term at each of the 3 finest latent resolutions")


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class OneStepConfig:
    """One-step XPSR (experimental, beyond the paper; README: One-step XPSR): a LoRA student distilled from a
    trained multi-step XPSR teacher. ``enabled=false`` trains the multi-step model as before."""

    enabled: bool = doc(False, "train the one-step student instead of the multi-step model")
    teacher: str | None = doc(None, "trained XPSR weights the student starts from and the teacher is (our "
                                    ".safetensors or a run dir); null = the freshly built model (tiny tests only)")
    timestep: int = doc(999, "the fixed timestep t* of the single UNet + ControlNet call (OSEDiff: 999)")
    lr_latent: str = choice("mean", ("mean", "sample"), "z_lr: the VAE posterior mean of the LR or a sample")
    lora_rank: int = doc(4, "rank of the student's LoRA adapters on the UNet")
    lora_alpha: float = doc(4.0, "LoRA alpha (scale = alpha / rank)")
    lora_targets: list[str] = doc(LORA_TARGETS, "UNet module names (last parts) that get LoRA; only the stock "
                                                "UNet's modules, never the XPSR pixel attentions or SFA branches")
    controlnet: str = choice("train", ("train", "frozen"), "the student's ControlNet: trained in full (XPSR's "
                                                           "trainable set) or frozen at the teacher's weights")
    regression: str = choice("latent", ("latent", "pixel"), "regression to HR: MSE of latents, or MSE of the "
                                                            "decoded image (decodes with gradients)")
    regression_weight: float = doc(1.0, "weight of the regression term (0 = off)")
    lpips_weight: float = doc(0.0, "weight of LPIPS(decoded SR, HR) (0 = off); needs the metrics extra and the "
                                   "LPIPS weights in weights_dir, as `xpsr eval`")
    weights_dir: str | None = doc(None, "folder of metric weight files for LPIPS (else $XPSR_METRIC_WEIGHTS)")
    dfc_weight: float = doc(0.0, "weight of the DFC terms of the student's ControlNet (pixel + latent, all "
                                 "scales, as the multi-step loss without its lambda; 0 = off)")
    distill_weight: float = doc(1.0, "weight of the latent MSE to the cached multi-step teacher output (0 = off)")
    teacher_infer_config: str | None = doc(None, "an `xpsr infer` YAML for the teacher's sampler; null = "
                                                 "InferConfig defaults (official test settings)")
    cache_dir: str | None = doc(None, "teacher-output cache folder (shared across runs is fine); null = "
                                      "OUTPUT_DIR/teacher_cache")
    vsd_weight: float = doc(0.0, "weight of the distribution-matching (VSD) regulariser (0 = off)")
    vsd_guidance_scale: float = doc(4.5, "CFG scale of the real score model (the frozen teacher)")
    vsd_min_timestep: int = doc(20, "smallest timestep of the VSD and fake-score noising")
    vsd_max_timestep: int = doc(980, "largest timestep of the VSD and fake-score noising")
    fake_lora_rank: int = doc(4, "rank of the fake score model's LoRA (a second adapter on the UNet)")
    fake_learning_rate: float = doc(1.0e-4, "learning rate of the fake score model's LoRA")


@dataclass
class ValidationConfig:
    """Validation samples with the inference code (`xpsr.inference`): the settings of ``infer_config``
    (an `xpsr infer` YAML; null = InferConfig's defaults, the official test config), then the sampling keys
    below on top. Their defaults are the official validation (train.py `log_validation` + xpsr_valid.yaml)."""

    every: int = doc(0, "validate every N steps (0 = never)")
    num_images: int = doc(2, "validation pairs, taken in order from the first data folder")
    infer_config: str | None = doc(None, "an `xpsr infer` YAML for prompts, resize, tiling, colour fix...; "
                                         "null = InferConfig defaults (the official test config)")
    scheduler: str = doc("unipc", "sampler, as `xpsr infer scheduler=` (official validation: UniPC)")
    num_inference_steps: int = doc(20, "sampling steps (official: 20)")
    guidance_scale: float = doc(5.5, "classifier-free guidance (paper 5.5; official validation config 4.5)")
    start_from: str = doc("lr", "initial latent, as `xpsr infer start_from=` (official: the LR latent, twice noised)")
    added_noise_level: int = doc(400, "timestep of the second noising of the LR latent (official validation: 400; "
                                      "official test: 800)")
    color_fix: str = doc("none", "colour fix, as `xpsr infer color_fix=` (official validation: none)")
    use_ema: bool = doc(True, "sample with the EMA weights when EMA is on")


@dataclass
class TrainConfig:
    """`xpsr train`: one recipe = model + data + optimisation + logging."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    demo_data: bool = doc(False, "make a small dataset from bundled sample photos under output_dir (tiny recipe)")
    output_dir: str = doc("???", "run directory: checkpoints/, final/, logs/, samples/, config.yaml")
    max_steps: int = doc(1000, "optimizer steps")
    stop_at_step: int | None = doc(None, "end this session at this step with a checkpoint (time-limited jobs); "
                                         "the LR schedule still targets max_steps; resume=latest continues")
    seed: int = doc(0, "seed of noise, timesteps, fresh weights, demo data and the global RNGs (the data "
                       "order and crops have their own `data.seed`)")
    resume: str | None = doc(None, "'latest', a checkpoint folder, or null")
    batch_size: int = doc(2, "images per process per micro-step")
    gradient_accumulation_steps: int = doc(1, "micro-steps per optimizer step")
    learning_rate: float = doc(5e-5, "AdamW learning rate")
    lr_scheduler: str = choice("constant", ("constant", "constant_with_warmup", "linear", "cosine"), "LR schedule")
    lr_warmup_steps: int = doc(0, "warm-up steps of the schedule")
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.999, "AdamW beta2")
    adam_weight_decay: float = doc(1e-2, "AdamW weight decay")
    adam_epsilon: float = doc(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = doc(False, "bitsandbytes AdamW8bit (needs a CUDA build of bitsandbytes)")
    max_grad_norm: float = doc(1.0, "gradient clipping (0 = off)")
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
    ema_decay: float = doc(0.9999, "EMA decay")
    content_prompt: str = choice("caption", ("caption", "empty"),
                                 "caption: the cached content prompt (paper); empty: '' (the official release)")
    dfc: DFCConfig = field(default_factory=DFCConfig)
    onestep: OneStepConfig = field(default_factory=OneStepConfig)
    checkpoint_every: int = doc(500, "write checkpoints/step-N every N steps")
    checkpoints_total_limit: int | None = doc(3, "keep at most this many checkpoints (null = all)")
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    report_to: str = choice("tensorboard", ("tensorboard", "wandb", "none"), "experiment logger")
    log_every: int = doc(10, "log losses every N steps")
    num_workers: int = doc(2, "DataLoader workers")
    device: str = doc("auto", "'auto' (accelerate decides), or 'cpu' to force the CPU")


@dataclass
class InferConfig:
    """`xpsr infer`: LR images -> SR images."""

    input: str = doc("???", "an LR image or a folder of them (recursive)")
    output_dir: str = doc("???", "where SR images go, named like the inputs (.png)")
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: str | None = doc(None, "our trained .safetensors, a run dir (final/), an exported folder, an "
                                    "official XPSR folder; null = the freshly built model (tiny smoke tests)")
    mode: str = choice("multistep", ("multistep", "onestep"),
                       "multistep: the XPSR sampler; onestep: one UNet + ControlNet call at onestep_timestep, no "
                       "CFG (weights of a one-step run; README: One-step XPSR)")
    onestep_timestep: int | None = doc(None, "mode=onestep: the timestep t*; null = the one the run was trained "
                                             "with (999 for weights that do not say)")
    scheduler: str = choice("ddpm", ("ddpm", "ddim", "unipc", "dpmsolver++"), "sampler (official test: DDPM)")
    num_inference_steps: int = doc(20, "denoising steps (official: 20)")
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
    lr_latent: str = choice("sample", ("sample", "mean"),
                            "start_from=lr|sdedit: the LR latent is a sample of the VAE posterior drawn with the "
                            "seeded generator (official: latent_dist.sample), or its mean")
    added_noise_level: int = doc(800, "start_from=lr: timestep of the second noising; start_from=sdedit: the "
                                      "timestep sampling starts at (the first scheduled one at or below it)")
    upscale: int = doc(4, "output = upscale x input")
    resize: str = choice("pil", ("pil", "torch"),
                         "pil (official test script): 8-bit PIL bicubic x upscale, PIL bilinear up to process_size, "
                         "and PIL bicubic back to the output size; torch: one float bicubic resize each way")
    process_size: int = doc(512, "outputs whose short side is smaller are processed with this short side (sizes "
                                 "rounded down to multiples of 8, as the official script), then resized back")
    color_fix: str = choice("adain", ("adain", "wavelet", "none"), "colour correction against the LR (official: adain)")
    color_fix_8bit: bool = doc(False, "as the official test script: the SR rounded to 8 bits before the colour fix "
                                      "and the fixed image truncated to 8 bits after it (its ToPILImage); false: "
                                      "the fix on floats, rounded once at the end")
    seed: int = doc(0, "seed of the initial noise and the sampler")
    dtype: str = choice("fp32", ("fp32", "fp16", "bf16"), "weights and compute dtype")
    device: str = doc("auto", "'auto' (the accelerate process's device), 'cpu', 'cuda'")
    latent_tile: int = doc(64, "latent tile size (x8 px); larger latents are denoised tile by tile (see "
                               "latent_tiling); 0 = never tile")
    latent_overlap: int = doc(16, "overlap of latent tiles")
    latent_tiling: str = choice("ours", ("ours", "official"),
                                "ours: tile when a side exceeds latent_tile, Gaussian weights sigma = tile/4; "
                                "official: the official pipeline's rule (tile only when h*w > latent_tile^2, "
                                "square tiles, its weights; official values latent_tile=320 latent_overlap=8)")
    vae_tile: int = doc(1024, "VAE encoder tile in px (official encoder_tiled_size 1024), padded by the encoder's "
                              "receptive field (120 px for SD's VAE); images up to tile + 2 x padding (1264 px "
                              "for SD's VAE; the official tiles above 1088) are encoded whole; 0 = never tile")
    vae_decoder_tile: int = doc(224, "VAE decoder tile in latents (official decoder_tiled_size 224), padded by "
                                     "the decoder's receptive field (18 latents for SD's VAE); latents up to "
                                     "tile + 2 x padding (260 for SD's VAE; the official tiles above 246) are "
                                     "decoded whole; 0 = never tile")
    vae_tile_attention: str = choice("global", ("global", "tile"),
                                     "tiled VAE mid-block attention. global: every tile attends to the keys/values "
                                     "of the whole image (exact; keeps them in memory); tile: attends within its "
                                     "padded tile, as the official tiled VAE (approximate)")
    vae_tile_cache_mb: int = doc(2048, "tiled VAE: MB of tile states kept between the whole-image GroupNorm "
                                       "sweeps; beyond it tiles are recomputed (slower, memory stays bounded)")
    prompts: str = choice("cache", ("cache", "fixed"), "cache: prompts of each input from the prompt cache; "
                          "fixed: `prompt`/`quality_prompt` for every image")
    cache: str | None = doc(None, "prompt cache file (prompts=cache)")
    caption_first: list[str] = doc([], "caption configs (e.g. configs/caption/llava_content.yaml, "
                                       "llava_quality.yaml) run on the inputs into `cache` before SR; already "
                                       "cached images are skipped, and the captioners are freed before SR starts. "
                                       "`cache` defaults to OUTPUT_DIR/prompts.sqlite then")
    caption_missing: bool = doc(True, "prompts=cache: images without prompts get a heuristic quality prompt and an "
                                      "empty content prompt instead of an error")
    prompt: str = doc("", "prompts=fixed: content prompt")
    quality_prompt: str = doc("", "prompts=fixed: quality prompt")


@dataclass
class ExportConfig:
    """`xpsr export`: trained or official XPSR weights -> a diffusers folder with a model card."""

    weights: str = doc("???", "a training run dir (final/trained.safetensors), a checkpoint folder "
                              "(checkpoints/step-N), a trained .safetensors file, an official XPSR folder "
                              "(imported), or an exported folder")
    output: str = doc("???", "the folder to write (model_index.json, components, README.md model card)")
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
    port: int = doc(7860, "port to listen on")
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: str | None = doc(None, "as `xpsr infer weights=`; null = the freshly built model (tiny, no downloads)")
    device: str = doc("auto", "'auto' (cuda if available), 'cpu', 'cuda'")
    dtype: str = choice("fp32", ("fp32", "fp16", "bf16"), "weights and compute dtype")
    scheduler: str = choice("ddpm", ("ddpm", "ddim", "unipc", "dpmsolver++"), "sampler (official test: DDPM)")
    num_inference_steps: int = doc(20, "default of the steps control")
    guidance_scale: float = doc(4.5, "default of the guidance control")
    seed: int = doc(0, "default of the seed control")
    color_fix: str = choice("adain", ("adain", "wavelet", "none"), "default of the colour-fix control")
    upscale: int = doc(4, "default of the upscale control (1-8)")
    process_size: int = doc(512, "as `xpsr infer process_size=`: small outputs are processed at this short side")
    latent_tile: int = doc(64, "default latent tile of the tiling control (x8 px)")
    latent_overlap: int = doc(16, "overlap of latent tiles")
    vae_tile: int = doc(512, "VAE tile in px while tiling is on")
    untiled_max_side: int = doc(1024, "processing sizes with a longer side above this (px) are always tiled, "
                                      "whatever the tiling control says")
    max_output_pixels: int = doc(4096 * 4096, "uploads whose output (input x upscale) has more pixels are refused "
                                              "with a message (checked from the file header, before decoding)")
    max_file_mb: int = doc(50, "largest upload in MB (Gradio refuses bigger files)")
    content_captioner: str | None = doc(None, "caption config (kind=content) that fills the content prompt, e.g. "
                                              "configs/caption/llava_content.yaml, loaded once on first use; "
                                              "null = the content prompt starts empty")
    output_dir: str | None = doc(None, "where result PNGs are written for download; null = a new temporary folder")


@dataclass
class EvalConfig:
    """`xpsr eval`: SR folder (vs HR folder) -> metrics.csv, summary.json, table.md."""

    sr: str = doc("???", "folder of SR images")
    hr: str | None = doc(None, "folder of HR images (paired by sorted name); needed by full-reference metrics")
    output_dir: str = doc("???", "where metrics.csv, summary.json, table.md and the per-image cache go")
    metrics: list[str] = doc(["psnr", "ssim", "lpips", "dists", "fid", "niqe", "maniqa", "clipiqa", "musiq"],
                             "metrics to compute")
    crop_border: int = doc(0, "pixels cropped at each border for PSNR/SSIM (0 = official)")
    weights_dir: str | None = doc(None, "folder of metric weight files (else $XPSR_METRIC_WEIGHTS)")
    device: str = doc("auto", "'auto', 'cpu' or 'cuda'")
    label: str | None = doc(None, "name of this result in tables (default: the SR folder's name)")


@dataclass
class TablesConfig:
    """`xpsr tables`: our eval folders side by side (ablations), optionally beside the paper's numbers."""

    runs: dict[str, str] = doc({}, "label -> `xpsr eval` output folder, e.g. runs.sfa=eval/sfa")
    metrics: list[str] = doc(["psnr", "ssim", "lpips", "dists", "fid", "niqe", "maniqa", "clipiqa", "musiq"],
                             "columns")
    compare: str | None = doc(None, "'paper' to add the published rows")
    dataset: str | None = doc(None, "which published table: DIV2K-Val, RealSR, DRealSR")
    output_dir: str = doc("???", "where table.md and pd_scatter.png go")
    distortion: str = doc("psnr", "x axis of the perception-distortion plot")
    perception: str = doc("lpips", "y axis of the perception-distortion plot; also picks the images of the "
                                   "visual comparison (largest spread across runs)")
    visual_images: int = doc(4, "rows of visual.png (side-by-side crops of every run's SR and the HR); 0 = none")
    visual_crop: int = doc(192, "crop size in px of visual.png, placed where the runs differ most")


# configs/<folder>/*.yaml are validated against these schemas (tests load every file).
SCHEMAS: dict[str, type] = {"model": ModelConfig, "demo": DemoConfig, "bench": BenchConfig,
                           "data": PrepareConfig, "caption": CaptionConfig, "train": TrainConfig,
                           "infer": InferConfig, "eval": EvalConfig, "serve": ServeConfig}


def _check_choices(obj: Any, source: str, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, source, key + ".")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{source}: key '{key}' = {value!r} is not one of {list(f.metadata['choices'])}")


def _load_with_inherit(path: Path, seen: tuple = ()) -> Any:
    """A YAML file; its optional top-level ``inherit: OTHER.yaml`` (relative to it) is loaded first."""
    if path in seen:
        raise ConfigError(f"{path}: `inherit` loops back to itself")
    node = OmegaConf.load(path)
    parent = node.pop("inherit", None) if isinstance(node, DictConfig) else None
    if parent is None:
        return node
    parent_path = (path.parent / str(parent)).resolve()
    if not parent_path.is_file():
        raise ConfigError(f"{path}: inherit target {parent_path} does not exist")
    return OmegaConf.merge(_load_with_inherit(parent_path, seen + (path,)), node)


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                allow_missing: bool = False) -> T:
    """Defaults of ``schema`` <- YAML at ``path`` <- ``key=value`` overrides; returns a ``schema`` instance."""
    merged = OmegaConf.structured(schema)
    source = "defaults"
    try:
        if path is not None:
            path = Path(path)
            source = str(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, _load_with_inherit(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        if overrides:
            source = f"{source} + overrides {list(overrides)}" if path else f"overrides {list(overrides)}"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{source}: bad key '{key}': {reason}") from None
    if allow_missing:  # validation of a config file whose mandatory keys come on the command line
        merged = OmegaConf.merge(merged, {k: "<set on the command line>" for k in OmegaConf.missing_keys(merged)})
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        raise ConfigError(f"{source}: key '{key}' needs a value ({str(e).splitlines()[0]})") from None
    _check_choices(obj, source)
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-serialisable dict of a config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def describe(schema: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every leaf of ``schema``: what `--help` prints."""
    rows = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            rows += describe(type(f.default_factory()), key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("doc", "")
        if "choices" in f.metadata:
            text += f" {{{'|'.join(f.metadata['choices'])}}}"
        rows.append((key, default, text))
    return rows
