"""Config schemas of the Real-ESRGAN second-order degradation used by `xpsr prepare` (re-exported by
xpsr/config/); the value rules next to each field are explained in xpsr/config/rules.py."""
from __future__ import annotations

from dataclasses import dataclass, field

from xpsr.config.rules import choice, doc

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest")
PROBABILITY = {"min": 0.0, "max": 1.0}


@dataclass
class KernelConfig:
    """One blur stage's kernel sampler (Real-ESRGAN's random mixed kernels)."""

    sizes: list[int] = doc([7, 9, 11, 13, 15, 17, 19, 21], "odd kernel sizes to choose from", nonempty=True,
                           min=3, odd=True)
    sinc_prob: float = doc(0.1, "probability of a sinc (ringing) kernel instead of a blur kernel",
                            **PROBABILITY)
    kinds: list[str] = doc(list(KERNEL_KINDS), "blur kernel kinds", nonempty=True, each_of=KERNEL_KINDS)
    kind_probs: list[float] = doc([0.45, 0.25, 0.12, 0.03, 0.12, 0.03], "probability of each kind (one per kind)",
                                   weights=True)
    sigma: list[float] = doc([0.2, 3.0], "sigma range of Gaussian-type kernels", ordered=True, above=0)
    betag: list[float] = doc([0.5, 4.0], "beta range of generalized Gaussian kernels", ordered=True,
                             above=0)
    betap: list[float] = doc([1.0, 2.0], "beta range of plateau kernels", ordered=True, above=0)

    def validate(self) -> list[tuple[str, str]]:
        if len(self.kind_probs) != len(self.kinds):
            return [("kind_probs", f"must have one probability per kind ({len(self.kinds)} kinds)")]
        return []


@dataclass
class StageConfig:
    """One degradation stage: blur -> random resize -> noise -> JPEG."""

    blur_prob: float = doc(1.0, "probability of blurring in this stage", **PROBABILITY)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    resize_prob: list[float] = doc([0.2, 0.7, 0.1], "probabilities of up / down / keep", length=3,
                                    weights=True)
    resize_range: list[float] = doc([0.15, 1.5], "resize factor range", ordered=True, above=0)
    resize_modes: list[str] = doc(["area", "bilinear", "bicubic"], "interpolation modes, chosen uniformly",
                                   nonempty=True, each_of=RESIZE_MODES)
    gaussian_noise_prob: float = doc(0.5, "Gaussian noise, else Poisson noise", **PROBABILITY)
    noise_range: list[float] = doc([1.0, 30.0], "Gaussian noise sigma range (on the 0-255 scale)",
                                     ordered=True, min=0)
    poisson_scale_range: list[float] = doc([0.05, 3.0], "Poisson noise scale range", ordered=True,
                                             min=0)
    gray_noise_prob: float = doc(0.4, "probability that the noise is the same in all channels",
                                  **PROBABILITY)
    jpeg_prob: float = doc(1.0, "probability of JPEG compression in this stage", **PROBABILITY)
    jpeg_range: list[int] = doc([30, 95], "JPEG quality range", ordered=True, min=1, max=100)


def _second_stage() -> "StageConfig":
    return StageConfig(blur_prob=0.8, kernel=KernelConfig(sigma=[0.2, 1.5]), resize_prob=[0.3, 0.4, 0.3],
                       resize_range=[0.3, 1.2], noise_range=[1.0, 25.0], poisson_scale_range=[0.05, 2.5])


@dataclass
class DegradationConfig:
    """Real-ESRGAN second-order degradation; defaults are Real-ESRGAN's published ones."""

    stage1: StageConfig = field(default_factory=StageConfig)
    second_order_prob: float = doc(1.0, "probability of running the second stage at all",
                                    **PROBABILITY)
    stage2: StageConfig = field(default_factory=_second_stage)
    final_sinc_prob: float = doc(0.8, "probability of the final sinc filter", **PROBABILITY)
    final_sinc_sizes: list[int] = doc([7, 9, 11, 13, 15, 17, 19, 21], "kernel sizes of the final sinc filter",
                                     nonempty=True, min=3, odd=True)
    kernel_pad_to: int = doc(21, "every kernel is zero-padded to this size (at least the largest "
                                 "kernel size)", odd=True)
    usm_gt: bool = doc(True, "unsharp-mask the HR crop (saved as the HR image)")
    degrade_sharpened: bool = doc(True, "with usm_gt: degrade the sharpened crop (official make_train.py, "
                                        "Real-ESRGAN); false = degrade the plain crop (recipe v1 order, ablation)")
    jpeg_codec: str = choice("torch", ("torch", "opencv"), "'torch': BasicSR DiffJPEG's arithmetic with hard "
                             "rounding and float quality (official); 'opencv': a real 8-bit codec, integer quality")
    usm_weight: float = doc(0.5, "USM weight", min=0)
    usm_radius: int = doc(50, "USM Gaussian size (made odd)", min=1)
    usm_threshold: float = doc(10.0, "USM threshold on the 0-255 scale", min=0)

    def validate(self) -> list[tuple[str, str]]:
        largest = max(self.stage1.kernel.sizes + self.stage2.kernel.sizes + self.final_sinc_sizes)
        if self.kernel_pad_to < largest:
            return [("kernel_pad_to", f"must be at least the largest of sizes and final_sinc_sizes ({largest})")]
        return []
