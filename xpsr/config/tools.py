"""Config schemas of the tools around the pipeline -- `xpsr bench` and `xpsr tables` (re-exported by
xpsr/config/); the value rules next to each field are explained in xpsr/config/rules.py."""
from __future__ import annotations

from dataclasses import dataclass

from xpsr.config.rules import DEVICE, FUSION_MODES, METRICS, SEED, choice, doc


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
    resolution: int = doc(64, "HR image size in pixels (latents are 1/8)", min=8, multiple_of=8)
    batch_size: int = doc(2, "images per step", min=1)
    steps: int = doc(5, "timed steps", min=1)
    warmup: int = doc(2, "untimed steps first", min=0)
    device: str = doc("auto", "'auto', 'cpu' or 'cuda'", device=DEVICE)
    dtype: str = choice("fp32", ("fp32", "bf16", "fp16"), "autocast dtype of the forward (trainable weights stay fp32)")
    frozen_unet_dtype: str = choice("fp32", ("fp32", "mixed_precision"),
                                    "what=train: frozen UNet weights in fp32 (official) or in `dtype`")
    deterministic: bool = doc(False, "what=train: deterministic GPU kernels, as `xpsr train deterministic=true`")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward")
    compile: bool = doc(False, "torch.compile the UNet and ControlNet")
    fusion_mode: str = choice("sfa", FUSION_MODES, "fusion mode of the benchmarked model")
    seed: int = doc(0, "random seed", **SEED)
    workers: int = doc(2, "worker processes of prepare and of the DataLoader (what=data, include_data=true)",
                      min=0)
    include_data: bool = doc(False, "what=train: batches from the DataLoader + text encoder (tiny preset only)")
    lr_size: int = doc(128, "what=infer: LR input size (output = 4x)", min=2, multiple_of=2)
    tiled: bool = doc(True, "what=infer: tiled latent diffusion (64-latent tiles) and VAE (512 px encoder / "
                            "64-latent decoder tiles)")
    inference_steps: int = doc(20, "what=infer: denoising steps", min=1)


@dataclass
class TablesConfig:
    """`xpsr tables`: our eval folders side by side (ablations), optionally beside the paper's numbers."""

    runs: dict[str, str] = doc({}, "label -> `xpsr eval` output folder, e.g. runs.sfa=eval/sfa")
    metrics: list[str] = doc(["psnr", "ssim", "lpips", "dists", "fid", "niqe", "maniqa", "clipiqa", "musiq"],
                             "columns", nonempty=True, each_of=METRICS)
    compare: str | None = choice(None, ("paper",), "'paper' (or null): add the published rows")
    dataset: str | None = choice(None, ("DIV2K-Val", "RealSR", "DRealSR"), "which published table (or null)")
    output_dir: str = doc("???", "where table.md and pd_scatter.png go", nonempty=True)
    distortion: str = doc("psnr", "x axis of the perception-distortion plot", choices=METRICS)
    perception: str = doc("lpips", "y axis of the perception-distortion plot; also picks the images of the "
                                   "visual comparison (largest spread across runs)", choices=METRICS)
    visual_images: int = doc(4, "rows of visual.png (side-by-side crops of every run's SR and the HR); 0 = none", min=0)
    visual_crop: int = doc(192, "crop size in px of visual.png, placed where the runs differ most", min=8)
