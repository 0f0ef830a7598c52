"""Shared fixtures: tiny random models built in code, no downloads."""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from xpsr.config import ModelConfig  # noqa: E402

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden" / "official_tiny"
REPO = Path(__file__).resolve().parent.parent


def tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(base="tiny", conditioning_channels=[8, 16, 16, 32])
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def make_tiny():
    """Factory: a fresh tiny XPSR model (cheap enough to build per test)."""
    from xpsr.models.build import build_xpsr

    def make(**overrides):
        return build_xpsr(tiny_config(**overrides))

    return make


def tiny_inputs(modules, batch: int = 2, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of one forward for a tiny model: latents, timesteps, prompts, LR/HR images."""
    g = torch.Generator().manual_seed(seed)
    width = modules.unet.config.cross_attention_dim
    return {
        "noisy_latents": torch.randn(batch, 4, size // 8, size // 8, generator=g),
        "timesteps": torch.randint(0, 1000, (batch,), generator=g),
        "content_embeds": torch.randn(batch, 7, width, generator=g),
        "quality_embeds": torch.randn(batch, 9, width, generator=g),
        "lr_cond": torch.rand(batch, 3, size, size, generator=g),
        "hr_image": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
        "hr_latents": torch.randn(batch, 4, size // 8, size // 8, generator=g),
    }


def run(modules, inputs, unet=None, controlnet=None, scale: float = 1.0):
    from xpsr.models.forward import predict_noise

    return predict_noise(unet or modules.unet, controlnet or modules.controlnet, inputs["noisy_latents"],
                         inputs["timesteps"], inputs["content_embeds"], inputs["quality_embeds"],
                         inputs["lr_cond"], conditioning_scale=scale)


def randomize_zero_inits(*models, seed: int = 1) -> None:
    """Fill zero-initialised trainable weights (zero-convs, zero proj_out) with noise so every path counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                if p.requires_grad and p.abs().max() == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def make_sources(folder: Path, n: int = 3, size: int = 96) -> Path:
    """A few real photos (scikit-image sample data, shipped offline), resized to ``size`` px."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"][:n]:
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        img.resize((size + 17, size), Image.BICUBIC).save(folder / f"{name}.png")
    return folder


def prepare_config(inputs, out, **overrides):
    from xpsr.config import PrepareConfig, load_config

    args = [f"inputs=[{','.join(str(i) for i in inputs)}]", f"output_dir={out}", "crop_size=64"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(PrepareConfig, REPO / "configs" / "data" / "xpsr.yaml", args)


def write_png_bomb(path: Path, side: int = 30000) -> Path:
    """A valid all-black 1-bit PNG of ``side`` x ``side`` px (30000: 900 Mpx, ~110 KB): a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row, comp = b"\x00" * (1 + (side + 7) // 8), zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@contextlib.contextmanager
def served_client(folder, *overrides: str):
    """The tiny CPU web app (configs/serve/tiny_cpu.yaml) served in this process on a free port of 127.0.0.1, and
    a gradio_client on it; results and Gradio's temporary files under ``folder``."""
    import socket

    from gradio_client import Client

    from xpsr.apps.serve.app import serve
    from xpsr.config import ServeConfig, load_config

    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(ServeConfig, REPO / "configs" / "serve" / "tiny_cpu.yaml",
                      [f"output_dir={folder / 'results'}", f"port={port}", *overrides])
    app = serve(cfg, block=False)
    try:
        yield Client(app.local_url, verbose=False, analytics_enabled=False)
    finally:
        app.close()


def write_clip_without_frames(path: Path) -> None:
    """A Matroska file whose video stream holds no frame, beside some audio (so the file itself is valid; MP4
    would drop the empty stream)."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        a = c.add_stream("aac", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for p in [*a.encode(frame), *a.encode(), *s.encode()]:
            c.mux(p)
