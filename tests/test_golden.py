"""Our importer + forward reproduce the official XPSR implementation's tensors (tests/data/golden)."""
import subprocess
import sys

from conftest import GOLDEN, REPO

from xpsr.models.verify import compare, format_table


def test_every_golden_tensor_matches():
    rows = compare(GOLDEN)
    print(format_table(rows))
    names = {r.name for r in rows}
    assert "unet_sample" in names and "dfc_loss" in names and len(rows) == 25
    assert all(r.ok for r in rows), format_table(rows)


def test_verify_script_passes_and_prints_table():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "verify_official_equivalence.py"),
                           "--golden", str(GOLDEN)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unet_sample" in proc.stdout and "25/25 tensors match" in proc.stdout


def test_verify_script_fails_on_a_tampered_golden(tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    for f in GOLDEN.iterdir():
        shutil.copy(f, tmp_path / f.name)
    outputs = load_file(str(tmp_path / "outputs.safetensors"))
    outputs["unet_sample"] = outputs["unet_sample"] + 0.01
    save_file(outputs, str(tmp_path / "outputs.safetensors"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "verify_official_equivalence.py"),
                           "--golden", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "FAILED: ['unet_sample']" in proc.stdout
    del torch
