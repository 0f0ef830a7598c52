"""A damaged metric weights file in weights_dir (issue 15): one line naming the file and what is wrong, exit 1,
never torch's UnpicklingError text (which suggests weights_only=False) or a traceback. torchvision's files are
checked against the SHA-256 prefix their published names carry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xpsr.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(0)
    for name in ("sr", "hr"):
        (root / name).mkdir()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / "a.png")
    return root


def _write(path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # a readable checkpoint, but not the published one
        torch.save({"features.0.weight": torch.zeros(2)}, path)


@pytest.mark.parametrize("metric, filename, kind, message", [
    ("lpips", "alexnet-owt-7be5be79.pth", "random bytes", "is not the published file (its sha256 starts"),
    ("lpips", "alexnet-owt-7be5be79.pth", "empty", "is empty (0 bytes)"),
    ("lpips", "alexnet-owt-7be5be79.pth", "another checkpoint", "is not the published file"),
    ("musiq", "musiq_koniq_ckpt-e95806b9.pth", "random bytes", "cannot be read as PyTorch weights"),
    ("musiq", "musiq_koniq_ckpt-e95806b9.pth", "empty", "is empty (0 bytes)"),
])
def test_one_line_naming_the_damaged_file(folders, tmp_path, capsys, metric, filename, kind, message):
    weights = tmp_path / "weights"
    weights.mkdir()
    _write(weights / filename, kind)
    code = main(["eval", f"sr={folders / 'sr'}", f"hr={folders / 'hr'}", f"output_dir={tmp_path / 'eval'}",
                 f"metrics=[{metric}]", f"weights_dir={weights}", "device=cpu"])
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    err = [line for line in lines if line.strip() and not line.startswith(f"eval {metric}:")]  # progress bars
    assert code == 1 and len(err) == 1, err
    assert message in err[0] and str(weights / filename) in err[0] and f"metric '{metric}'" in err[0]
    assert "weights_only" not in err[0] and "Traceback" not in err[0]
