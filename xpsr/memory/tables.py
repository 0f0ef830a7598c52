"""The settings docs/gpu-memory.md tabulates (as `xpsr plan` overrides) and the Markdown of planned rows."""
from __future__ import annotations

from xpsr.memory.gpus import GIB, GPUS

OFFICIAL = ["train.mixed_precision=fp16", "train.frozen_unet_dtype=fp32"]
HALF = ["train.mixed_precision=bf16", "train.frozen_unet_dtype=mixed_precision"]
CKPT = HALF + ["train.model.gradient_checkpointing=true"]
ADAM8 = CKPT + ["train.use_8bit_adam=true"]
CACHED = ADAM8 + ["train.data.latent_cache=latents"]
TEXT_CPU = CACHED + ["train.text_encoder_device=cpu"]
TRAIN_SETTINGS = {
    "official (fp16 autocast, frozen UNet fp32)": OFFICIAL,
    "bf16, frozen parts bf16": HALF,
    "+ gradient checkpointing": CKPT,
    "+ 8-bit AdamW": ADAM8,
    "+ cached VAE latents": CACHED,
    "+ text encoder on the CPU": TEXT_CPU,
}
INFER_SETTINGS = {
    "multistep fp16 (20 steps, CFG)": ["infer.dtype=fp16", "infer.mode=multistep"],
    "one-step fp16": ["infer.dtype=fp16", "infer.mode=onestep"],
    "8 GB setting, xpsr_8gb.yaml": ["infer_config=configs/infer/xpsr_8gb.yaml"],
    # the official sampler's tiling (latent tiles of 320 only above 2560 px output): no tiles up to there
    "official config, fp16": ["infer_config=configs/infer/xpsr_official.yaml", "infer.dtype=fp16"],
}


def _train(preset: str, setting: str, batch: int) -> tuple[str, list[str]]:
    return (f"{preset}/train/{setting}/b{batch}",
            [f"preset={preset}", "what=train", f"train.batch_size={batch}", "train.data.crop_size=512",
             *TRAIN_SETTINGS[setting]])


def _infer(preset: str, setting: str, size: int) -> tuple[str, list[str]]:
    return (f"{preset}/infer/{setting}/{size}",
            [f"preset={preset}", "what=infer", f"output_size={size}", *INFER_SETTINGS[setting]])


def _rows() -> list[tuple[str, list[str]]]:
    """Most wanted first: a run may end before the last rows (each takes minutes on one CPU core)."""
    names = list(TRAIN_SETTINGS)
    rows = []
    for preset in ("sd15", "sd21"):
        rows += [_train(preset, names[0], 1), _train(preset, names[4], 1), _train(preset, names[3], 8),
                 _train(preset, names[4], 8), _infer(preset, "multistep fp16 (20 steps, CFG)", 512),
                 _infer(preset, "one-step fp16", 512), _train(preset, names[2], 8), _train(preset, names[1], 1),
                 _infer(preset, "multistep fp16 (20 steps, CFG)", 1024), _infer(preset, "one-step fp16", 1024),
                 _train(preset, names[0], 2), _train(preset, names[2], 1), _train(preset, names[3], 1),
                 _infer(preset, "multistep fp16 (20 steps, CFG)", 2048), _infer(preset, "one-step fp16", 2048),
                 _infer(preset, "8 GB setting, xpsr_8gb.yaml", 2048),
                 _train(preset, names[4], 4), _train(preset, names[4], 2), _train(preset, names[0], 4),
                 _train(preset, names[5], 1), _train(preset, names[5], 8), _train(preset, names[0], 8),
                 _train(preset, names[1], 8)]
    for preset in ("sd15", "sd21"):
        rows += [_infer(preset, "official config, fp16", size) for size in (512, 1024, 2048, 4096)]
    for preset in ("sd15", "sd21"):  # last: 4096 px output is hundreds of tiles, an hour of CPU per row
        rows += [_infer(preset, "8 GB setting, xpsr_8gb.yaml", 4096), _infer(preset, "one-step fp16", 4096),
                 _infer(preset, "multistep fp16 (20 steps, CFG)", 4096)]
    return rows


ROWS = _rows()


def _fits(row: dict) -> str:
    return f"{row['fits_gib'][0]:g} GB" if row["fits_gib"] else "none (> 80 GB)"


def _times(row: dict) -> str:
    est = row.get("estimated_seconds", {})
    return " | ".join(f"{est[g.name]:.2f}" if g.name in est else "" for g in GPUS)


def _order(settings: dict, row: dict) -> int:
    name = row["row"].split("/")[2]
    return list(settings).index(name) if name in settings else len(settings)


def _table(rows: list[dict], title: str, size_key: str, size_title: str) -> list[str]:
    """One Markdown table of planned rows: peak, peak with margin, smallest card, estimated times per card."""
    gpus = " | ".join(g.name for g in GPUS)
    return [f"\n#### {title} (ESTIMATED seconds per {'step' if size_key == 'batch_size' else 'image'} on the right)\n",
            f"| setting | {size_title} | planned peak GiB | with margin GiB | smallest card | {gpus} |",
            "| --- | --- | --- | --- | --- |" + " --- |" * len(GPUS)] + [
        f"| {r['row'].split('/')[2]} | {r[size_key]} | {r['peak_bytes'] / GIB:.2f} | "
        f"{r['margin']['needed_gib']:.2f} | {_fits(r)} | {_times(r)} |" for r in rows]


def markdown(rows: list[dict]) -> str:
    """The training and the inference table of planned rows (GiB; estimated seconds per step / image)."""
    out = []
    for preset in ("sd15", "sd21"):
        rows = [r for r in rows if r["row"].split("/")[2] in (TRAIN_SETTINGS if r["what"] == "train" else
                                                               INFER_SETTINGS)]  # settings no longer tabulated
        train = sorted((r for r in rows if r["preset"] == preset and r["what"] == "train"),
                       key=lambda r: (_order(TRAIN_SETTINGS, r), r["batch_size"]))
        if train:
            out += _table(train, f"{preset}: one training step at 512 px", "batch_size", "batch")
        infer = sorted((r for r in rows if r["preset"] == preset and r["what"] == "infer"),
                       key=lambda r: (_order(INFER_SETTINGS, r), r["output_size"]))
        if infer:
            out += _table(infer, f"{preset}: one super-resolution (x4)", "output_size", "output px")
    return "\n".join(out)
