"""`xpsr demo`: the whole system on a CPU in minutes, from photos that ship with scikit-image.

pairs (prepare) -> prompts (offline captioners) -> a small prior (tiny VAE + base UNet pre-trained on the
training photos, standing in for Stable Diffusion) -> XPSR training on top of it -> super-resolve held-out
images, with the prior alone and with the trained XPSR model -> evaluate (PSNR/SSIM, bicubic alongside)
-> report.html (LR | bicubic | before | SR | HR, metrics, loss curves).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from xpsr.config import DemoConfig, DemoPriorConfig, EvalConfig, InferConfig, PrepareConfig, TrainConfig

HELD_OUT = ("cat", "retina", "coffee")  # test photos (coffee also appears in training, a seen-content control)
CONTENT_PROMPT = "a photo"  # the fixed content prompt of the demo data (no content captioner offline)


def _bicubic(lr_dir: Path, out: Path) -> None:
    import torch
    import torch.nn.functional as F

    from xpsr.data.images import list_images, load_rgb, save_png_atomic

    for lr_path in list_images([lr_dir]):
        t = torch.from_numpy(load_rgb(lr_path)[0]).permute(2, 0, 1)[None].float() / 255
        up = F.interpolate(t, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        save_png_atomic((up[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), out / lr_path.name)


def _vae_reconstructions(base: Path, hr_dir: Path, out: Path) -> None:
    """HR -> prior's VAE -> image: how much of the HR detail this VAE keeps (not a PSNR ceiling: a
    blurrier output can score higher)."""
    import torch
    from diffusers import AutoencoderKL

    from xpsr.data.images import list_images, load_rgb, save_png_atomic

    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae").eval()
    with torch.no_grad():
        for path in list_images([hr_dir]):
            x = torch.from_numpy(load_rgb(path)[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
            y = ((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
            save_png_atomic((y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), out / path.name)


def _test_pairs(out: Path, cfg: DemoConfig) -> Path:
    """Held-out HR/LR pairs (one centre crop per photo) and their prompts, captioned as the training pairs."""
    from xpsr.captions.run import run_captioning
    from xpsr.config import CaptionConfig
    from xpsr.data.pairs import prepare_pairs
    from xpsr.training.demo_data import write_sample_photos

    test = out / "test"
    sources = write_sample_photos(out / "test_sources", HELD_OUT)[0].parent
    prepare_pairs(PrepareConfig(inputs=[str(sources)], output_dir=str(test), crop_size=cfg.crop_size * 2,
                                test_set=True, seed=cfg.seed + 1))
    for kind, captioner in (("quality", "heuristic"), ("content", "fixed")):
        run_captioning(CaptionConfig(images=str(test / "lr"), cache=str(test / "prompts.sqlite"), kind=kind,
                                     captioner=captioner, fixed_text=CONTENT_PROMPT, image_source="lr",
                                     device="cpu"))
    return test


def _heldout_noise_mse(infer: InferConfig, out: Path, test: Path, seed: int) -> dict[str, float]:
    """The noise-prediction error on the held-out pairs before and after XPSR training (same draws)."""
    from xpsr.inference.run import load_modules
    from xpsr.training.heldout import heldout_noise_mse, load_pairs

    pairs = load_pairs(test)
    return {name: heldout_noise_mse(load_modules(dataclasses.replace(infer, weights=weights)), pairs, seed=seed)
            for name, weights in (("before", None), ("after", str(out / "run")))}


def prior_prompts(infer: InferConfig) -> list[str]:
    """What the base UNet sees as content text in the demo: training caption, inference prompt, negative."""
    return [CONTENT_PROMPT, f"{CONTENT_PROMPT} {infer.added_prompt}", infer.negative_prompt, ""]


def demo_prior(output_dir: str | Path, prior: DemoPriorConfig | None = None, seed: int = 0,
               log=print) -> Path:
    """The demo's pre-trained base folder, ``output_dir/prior`` (made, or reused when its recipe matches):
    a 4x VAE + base UNet trained on the bundled photos, loadable as ``model.base`` with
    ``model.conditioning_channels=[8, 16, 32]``. ``xpsr demo output_dir=X`` makes the same folder."""
    from xpsr.training.demo_data import write_sample_photos
    from xpsr.training.prior import ensure_prior

    out = Path(output_dir).resolve()
    photos = write_sample_photos(out / "run" / "demo_data" / "sources")
    ensure_prior(out / "prior", prior or DemoPriorConfig(), photos,
                 prior_prompts(InferConfig(input="", output_dir="")), seed=seed, log=log)
    return out / "prior"


def run_demo(cfg: DemoConfig) -> Path:
    from xpsr.apps.demo_report import write_report
    from xpsr.inference.run import run_inference
    from xpsr.metrics.evaluate import evaluate
    from xpsr.models.build import build_xpsr, model_summary
    from xpsr.training.demo_data import make_demo_data
    from xpsr.training.loop import run_training

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    print(f"[1/6] training pairs and prompts in {out / 'run' / 'demo_data'}")
    make_demo_data(out / "run" / "demo_data", crop_size=cfg.crop_size, seed=cfg.seed)

    infer = InferConfig(input="", output_dir="", model=dataclasses.replace(cfg.model, base=str(out / "prior")),
                        scheduler="ddim", num_inference_steps=cfg.inference_steps, guidance_scale=cfg.guidance_scale,
                        start_from=cfg.start_from, added_noise_level=cfg.added_noise_level,
                        process_size=cfg.crop_size, dtype="fp32", device="cpu", prompts="cache", seed=cfg.seed)
    print("[2/6] the prior: tiny VAE and base UNet pre-trained on the training photos (stands in for SD)")
    start = time.perf_counter()
    prior = json.loads((demo_prior(out, cfg.prior, seed=cfg.seed) / "prior.json").read_text())
    seconds["prior"] = round(time.perf_counter() - start, 1)
    print(model_summary(build_xpsr(infer.model)))

    print(f"[3/6] XPSR training: {cfg.train_steps} steps on top of the frozen prior")
    train = TrainConfig(model=infer.model, demo_data=True, output_dir=str(out / "run"), max_steps=cfg.train_steps,
                        seed=cfg.seed, batch_size=2, learning_rate=cfg.learning_rate, checkpoint_every=0,
                        report_to="none", log_every=5, num_workers=0, device="cpu")
    train.data = dataclasses.replace(train.data, crop_size=cfg.crop_size)
    summary = run_training(train)
    seconds["xpsr_training"] = summary["seconds"]

    print("[4/6] held-out test pairs; super-resolution with the prior alone and with the trained XPSR model")
    test = _test_pairs(out, cfg)
    start = time.perf_counter()
    for folder, weights in (("sr_before", None), ("sr", str(out / "run"))):
        run_inference(dataclasses.replace(infer, input=str(test / "lr"), output_dir=str(out / folder),
                                          cache=str(test / "prompts.sqlite"), weights=weights))
    seconds["super_resolution"] = round(time.perf_counter() - start, 1)
    noise_mse = _heldout_noise_mse(infer, out, test, cfg.seed)
    _bicubic(test / "lr", out / "bicubic")
    _vae_reconstructions(out / "prior", test / "hr", out / "vae_recon")

    print("[5/6] evaluation (PSNR/SSIM on Y; learned metrics need their weights, see docs/evaluation.md)")
    results = {}
    for name, folder in (("bicubic", "bicubic"), ("prior alone (before XPSR training)", "sr_before"),
                         ("XPSR (tiny, CPU)", "sr"), ("HR through the prior's VAE", "vae_recon")):
        ev = EvalConfig(sr=str(out / folder), hr=str(test / "hr"), output_dir=str(out / "eval" / folder),
                        metrics=["psnr", "ssim"], device="cpu", label=name)
        results[name] = {k: v for k, v in evaluate(ev).items() if k != "settings"}
    (out / "demo_summary.json").write_text(json.dumps({"metrics": results, "heldout_noise_mse": noise_mse,
                                                       "seconds": seconds, "xpsr_steps": summary["steps"]}, indent=2))

    print("[6/6] report")
    report = write_report(out, test, results, seconds, summary, prior, noise_mse)
    print(f"demo report: {report}")
    return report
