"""Schema of one-step XPSR training (experimental, beyond the paper; docs/one-step.md)."""
from __future__ import annotations

from dataclasses import dataclass

from xpsr.config.rules import TIMESTEP, choice, doc

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class OneStepConfig:
    """One-step XPSR (experimental, beyond the paper; docs/one-step.md): a LoRA student distilled from a
    trained multi-step XPSR teacher. ``enabled=false`` trains the multi-step model as before."""

    enabled: bool = doc(False, "train the one-step student instead of the multi-step model")
    teacher: str | None = doc(None, "trained XPSR weights the student starts from and the teacher is (our "
                                    ".safetensors or a run dir); null = the freshly built model (tiny tests only)")
    timestep: int = doc(999, "the fixed timestep t* of the single UNet + ControlNet call (OSEDiff: 999)", **TIMESTEP)
    lr_latent: str = choice("mean", ("mean", "sample"), "z_lr: the VAE posterior mean of the LR or a sample")
    lora_rank: int = doc(4, "rank of the student's LoRA adapters on the UNet", min=1)
    lora_alpha: float = doc(4.0, "LoRA alpha (scale = alpha / rank)", above=0)
    lora_targets: list[str] = doc(LORA_TARGETS, "UNet module names (last parts) that get LoRA; only the stock "
                                                "UNet's modules, never the XPSR pixel attentions or SFA branches")
    controlnet: str = choice("train", ("train", "frozen"), "the student's ControlNet: trained in full (XPSR's "
                                                           "trainable set) or frozen at the teacher's weights")
    regression: str = choice("latent", ("latent", "pixel"), "regression to HR: MSE of latents, or MSE of the "
                                                            "decoded image (decodes with gradients)")
    regression_weight: float = doc(1.0, "weight of the regression term (0 = off)", min=0)
    lpips_weight: float = doc(0.0, "weight of LPIPS(decoded SR, HR) (0 = off); needs the metrics extra and the "
                                   "LPIPS weights in weights_dir, as `xpsr eval`", min=0)
    weights_dir: str | None = doc(None, "folder of metric weight files for LPIPS (else $XPSR_METRIC_WEIGHTS)")
    dfc_weight: float = doc(0.0, "weight of the DFC terms of the student's ControlNet (pixel + latent, all "
                                 "scales, as the multi-step loss without its lambda; 0 = off)", min=0)
    distill_weight: float = doc(1.0, "weight of the latent MSE to the cached multi-step teacher output (0 = off)",
                                min=0)
    teacher_infer_config: str | None = doc(None, "an `xpsr infer` YAML for the teacher's sampler; null = "
                                                 "InferConfig defaults (official test settings)")
    cache_dir: str | None = doc(None, "teacher-output cache folder (shared across runs is fine); null = "
                                      "OUTPUT_DIR/teacher_cache")
    vsd_weight: float = doc(0.0, "weight of the distribution-matching (VSD) regulariser (0 = off)", min=0)
    vsd_guidance_scale: float = doc(4.5, "CFG scale of the real score model (the frozen teacher)", min=0)
    vsd_min_timestep: int = doc(20, "smallest timestep of the VSD and fake-score noising", **TIMESTEP)
    vsd_max_timestep: int = doc(980, "largest timestep of the VSD and fake-score noising", **TIMESTEP)
    fake_lora_rank: int = doc(4, "rank of the fake score model's LoRA (a second adapter on the UNet)", min=1)
    fake_learning_rate: float = doc(1.0e-4, "learning rate of the fake score model's LoRA", above=0)
