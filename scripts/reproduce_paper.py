#!/usr/bin/env python
"""Reproduce the paper's evaluation: prepare -> caption -> infer -> eval -> tables, per test set.

    python scripts/reproduce_paper.py --out repro --weights runs/xpsr/final/trained.safetensors \\
        --base /models/sd15 --realsr /data/RealSR --drealsr /data/DRealSR --div2k-val /data/DIV2K_valid_HR

RealSR/DRealSR folders hold HR/ and LR/ (centre crops); DIV2K-Val is a folder of HR images, degraded by
`prepare test_set=true`. Each stage runs as its own process: some pyiqa metrics patch transformers
globally, so captioning and metrics never share one. Re-running resumes every stage.
"""
import argparse
import subprocess
import sys
from pathlib import Path

XPSR = [sys.executable, "-m", "xpsr.cli"]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run(cmd: list[str], dry: bool) -> None:
    print("+", " ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", help="our trained weights, a run dir, or an official XPSR folder")
    p.add_argument("--base", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="SD folder or 'tiny'")
    p.add_argument("--realsr"), p.add_argument("--drealsr"), p.add_argument("--div2k-val")
    p.add_argument("--captioner-model", default="llava-hf/llava-1.5-7b-hf")
    p.add_argument("--offline-captions", action="store_true", help="heuristic quality + empty content prompts")
    p.add_argument("--metrics", default="psnr,ssim,lpips,dists,fid,niqe,maniqa,clipiqa,musiq")
    p.add_argument("--infer-config", default=str(CONFIGS / "infer" / "xpsr_official.yaml"))
    p.add_argument("--infer-override", action="append", default=[], help="extra key=value for `xpsr infer`")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args()
    out = Path(a.out)
    sets = {k: v for k, v in {"RealSR": a.realsr, "DRealSR": a.drealsr, "DIV2K-Val": a.div2k_val}.items() if v}
    if not sets:
        p.error("give at least one of --realsr, --drealsr, --div2k-val")
    for name, src in sets.items():
        pairs = out / name / "pairs"
        if name == "DIV2K-Val":
            run(XPSR + ["prepare", "--config", str(CONFIGS / "data" / "xpsr.yaml"), f"inputs=[{src}]",
                        f"output_dir={pairs}", "test_set=true"], a.dry_run)
        else:
            run(XPSR + ["prepare", f"paired_hr={Path(src) / 'HR'}", f"paired_lr={Path(src) / 'LR'}",
                        f"output_dir={pairs}"], a.dry_run)
        cache = out / "prompts.sqlite"
        if a.offline_captions:
            run(XPSR + ["caption", "--config", str(CONFIGS / "caption" / "heuristic_quality.yaml"),
                        f"images={pairs / 'lr'}", f"cache={cache}"], a.dry_run)
            run(XPSR + ["caption", "--config", str(CONFIGS / "caption" / "empty_content.yaml"),
                        f"images={pairs / 'lr'}", f"cache={cache}"], a.dry_run)
        else:
            for cfg in ("llava_content.yaml", "llava_quality.yaml"):
                run(XPSR + ["caption", "--config", str(CONFIGS / "caption" / cfg), f"images={pairs / 'lr'}",
                            f"cache={cache}", f"model={a.captioner_model}"], a.dry_run)
        sr = out / name / "sr"
        infer = XPSR + ["infer", "--config", a.infer_config, f"input={pairs / 'lr'}", f"output_dir={sr}",
                        f"model.base={a.base}", f"cache={cache}", *a.infer_override]
        run(infer + ([f"weights={a.weights}"] if a.weights else []), a.dry_run)
        run(XPSR + ["eval", f"sr={sr}", f"hr={pairs / 'hr'}", f"output_dir={out / name / 'eval'}",
                    f"metrics=[{a.metrics}]", "label=ours"], a.dry_run)
        run(XPSR + ["tables", f"runs.ours={out / name / 'eval'}", f"metrics=[{a.metrics}]", "compare=paper",
                    f"dataset={name}", f"output_dir={out / name / 'tables'}"], a.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
