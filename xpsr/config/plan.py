"""Schema of ``xpsr plan``: the GPU memory plan of a training or an inference setting (xpsr/memory/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from xpsr.config.infer import InferConfig
from xpsr.config.rules import choice, doc
from xpsr.config.train import TrainConfig


@dataclass
class PlanConfig:
    """`xpsr plan`: peak GPU memory of one training step or one super-resolution, by category and module."""

    # files read into a section by the config loader, under the section's own keys (xpsr.config.loader)
    SECTION_FILES: ClassVar[dict[str, str]] = {"train_config": "train", "infer_config": "infer"}

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
