"""Throughput of the data stages on generated inputs: `prepare` pairs/s, heuristic captions/s, dataset samples/s."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xpsr.config import BenchConfig, DatasetConfig, PrepareConfig
from xpsr.data.images import save_png_atomic


def _sources(folder: Path, n: int, size: int) -> Path:
    """Real photos from scikit-image, upscaled to ``size`` px so that 512 px crops fit."""
    import cv2
    import skimage.data

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"]
    for i in range(n):
        img = np.asarray(getattr(skimage.data, names[i % len(names)])())[..., :3]
        save_png_atomic(cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC), folder / f"src{i:03d}.png")
    return folder


def run_data_bench(cfg: BenchConfig) -> dict:
    from xpsr.captions.run import run_captioning
    from xpsr.config import CaptionConfig
    from xpsr.data.pairs import prepare_pairs
    from xpsr.training.dataset import build_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = _sources(tmp / "src", cfg.batch_size, max(cfg.resolution + 256, 768))
        prep = PrepareConfig(inputs=[str(src)], output_dir=str(tmp / "pairs"), crop_size=cfg.resolution,
                             crops_per_image=2, workers=cfg.workers, device="cpu")
        stats = prepare_pairs(prep)
        result = {"what": cfg.what, "crop_size": cfg.resolution, "prepare_pairs_per_s": stats["pairs_per_s"],
                  "prepare_pairs": stats["pairs_made"], "prepare_workers": cfg.workers}
        cap = CaptionConfig(images=str(tmp / "pairs" / "lr"), cache=str(tmp / "p.sqlite"), captioner="heuristic",
                            kind="quality", batch_size=64, device="cpu")
        result["heuristic_captions_per_s"] = run_captioning(cap)["images_per_s"]
        ds_cfg = DatasetConfig(pairs=[str(tmp / "pairs")], missing_prompt="empty", crop_size=cfg.resolution)
        dataset, sampler = build_dataset(ds_cfg)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=cfg.workers)
        start, n = time.perf_counter(), 0
        for step, batch in enumerate(loader):
            n += batch["hr"].shape[0]
            if step + 1 == cfg.steps:
                break
        result["dataset_samples_per_s"] = round(n / (time.perf_counter() - start), 2)
        result["dataset_workers"] = cfg.workers
    return result
