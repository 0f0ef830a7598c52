"""Schemas of the data stage: ``xpsr prepare`` (pairs) and the paired dataset that training reads."""
from __future__ import annotations

from dataclasses import dataclass, field

from xpsr.config.degradation import DegradationConfig
from xpsr.config.rules import SEED, choice, doc
from xpsr.config.video import VideoPrepareConfig


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
    video: VideoPrepareConfig = field(default_factory=VideoPrepareConfig)

    def validate(self) -> list[tuple[str, str]]:
        if self.crop_size % self.scale:  # else the LR crop is rounded: 130 px HR would get a 32 px LR
            return [("crop_size", f"must be a multiple of scale ({self.scale})")]
        if self.video.clips and self.share_draws_every != 1:  # a clip is already a group sharing its draws
            return [("share_draws_every", "must be 1 with video.clips=true (a clip shares all its draws)")]
        return []


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
