"""A small training set made on the spot from sample photos that ship with scikit-image (no downloads)."""
from __future__ import annotations

from pathlib import Path

from xpsr.config import CaptionConfig, DatasetConfig, PrepareConfig

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def write_sample_photos(folder: str | Path, names: tuple[str, ...] = SAMPLE_PHOTOS) -> list[Path]:
    """The sample photos as RGB PNGs in ``folder`` (grey ones repeated to 3 channels); returns their paths."""
    import numpy as np
    import skimage.data

    from xpsr.data.images import save_png_atomic

    paths = []
    for name in names:
        path = Path(folder) / f"{name}.png"
        if not path.is_file():
            img = np.asarray(getattr(skimage.data, name)())
            img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3]
            save_png_atomic(np.ascontiguousarray(img), path)
        paths.append(path)
    return paths


def make_demo_data(folder: str | Path, crop_size: int = 64, crops_per_image: int = 2, seed: int = 0) -> DatasetConfig:
    """Pairs (x4) + heuristic quality prompts (LR and HR) + a fixed content prompt; returns the dataset config.

    Idempotent: every stage resumes, so calling it again costs only the checks.
    """
    from xpsr.captions.run import run_captioning
    from xpsr.data.pairs import prepare_pairs

    folder = Path(folder)
    src = write_sample_photos(folder / "sources")[0].parent
    pairs = folder / "pairs"
    prepare_pairs(PrepareConfig(inputs=[str(src)], output_dir=str(pairs), crop_size=crop_size,
                                crops_per_image=crops_per_image, seed=seed))
    cache = folder / "prompts.sqlite"
    for images, kind, captioner, source in ((pairs / "lr", "quality", "heuristic", "lr"),
                                            (pairs / "hr", "quality", "heuristic", "hr"),
                                            (pairs / "lr", "content", "fixed", "lr")):
        run_captioning(CaptionConfig(images=str(images), cache=str(cache), kind=kind, captioner=captioner,
                                     fixed_text="a photo", image_source=source, device="cpu", batch_size=64))
    return DatasetConfig(pairs=[str(pairs)], cache=str(cache), crop_size=crop_size, seed=seed)
