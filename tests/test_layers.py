"""The package's layers (docs/architecture.md) as a test: `lint-imports` keeps every contract in
.importlinter, and a change that breaks one fails with the offending import named."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # the console script sits beside this interpreter; PYTHONPATH makes grimp find the package in cwd
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_every_layer_contract_is_kept():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
    print(next(line for line in proc.stdout.splitlines() if line.startswith("Analyzed")))


def test_an_upward_import_fails_and_is_named(tmp_path):
    """A model module that imports the sampler breaks the layers and the models contract."""
    shutil.copytree(ROOT / "xpsr", tmp_path / "xpsr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    sfa = tmp_path / "xpsr" / "models" / "sfa.py"
    sfa.write_text(sfa.read_text() + "\nfrom xpsr.inference import pipeline  # noqa\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "xpsr.models.sfa -> xpsr.inference.pipeline" in proc.stdout
    assert "Models know no sampler" in proc.stdout
