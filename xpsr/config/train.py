"""Schemas of ``xpsr train``: the run, its loss terms (DFC) and validation during training."""
from __future__ import annotations

from dataclasses import dataclass, field

from xpsr.config.data import DatasetConfig
from xpsr.config.model import ModelConfig
from xpsr.config.onestep import OneStepConfig
from xpsr.config.rules import COLOR_FIXES, SCHEDULERS, SEED, TIMESTEP, choice, doc


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
    text_encoder_device: str = choice("same", ("same", "cpu"),
                                      "where the frozen text encoder lives: same (the training device; official) "
                                      "or cpu (kept in fp32 on the CPU, prompt embeddings moved to the GPU: saves "
                                      "its weights there, 0.23 GiB at SD 1.5 in half precision, 0.66 at SD 2.1)")
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
