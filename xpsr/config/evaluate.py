"""Schema of ``xpsr eval``."""
from __future__ import annotations

from dataclasses import dataclass

from xpsr.config.rules import DEVICE, METRICS, doc


@dataclass
class EvalConfig:
    """`xpsr eval`: SR folder (vs HR folder) -> metrics.csv, summary.json, table.md."""

    sr: str = doc("???", "folder of SR images", nonempty=True)
    hr: str | None = doc(None, "folder of HR images (paired by sorted name); needed by full-reference metrics",
                          nonempty=True)
    output_dir: str = doc("???", "where metrics.csv, summary.json, table.md and the per-image cache go",
                          nonempty=True)
    metrics: list[str] = doc(["psnr", "ssim", "lpips", "dists", "fid", "niqe", "maniqa", "clipiqa", "musiq"],
                             "metrics to compute", nonempty=True, each_of=METRICS)
    crop_border: int = doc(0, "pixels cropped at each border for PSNR/SSIM (0 = official)", min=0)
    weights_dir: str | None = doc(None, "folder of metric weight files (else $XPSR_METRIC_WEIGHTS)")
    device: str = doc("auto", "'auto', 'cpu' or 'cuda'", device=DEVICE)
    label: str | None = doc(None, "name of this result in tables (default: the SR folder's name)")
