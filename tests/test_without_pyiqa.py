"""The core install works without pyiqa (an optional extra: PolyForm Noncommercial licence).

pyiqa stays installed in the test environment; each test runs a fresh interpreter in which an import hook
makes `import pyiqa` fail exactly as it does when the package is absent, and records every attempt.
"""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from xpsr.metrics.psnr_ssim import psnr_y, ssim_y

NO_PYIQA = '''
import json, sys
attempts = []

class NoPyiqa:
    def find_spec(self, name, path=None, target=None):
        if name == "pyiqa" or name.startswith("pyiqa."):
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPyiqa())
'''
# what only pyiqa's metrics bring in (a sign that something imported it, or its metric stack, anyway);
# not bitsandbytes: transformers imports it whenever it is installed; not pandas: gradio (the `app`
# extra, imported by xpsr.apps.serve.app when installed) imports it too
PYIQA_STACK = ("pyiqa", "timm", "facexlib", "clip", "datasets")


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_PYIQA + code], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _pair_dirs(tmp_path, sizes=((40, 52), (33, 47))):
    rng = np.random.default_rng(0)
    (tmp_path / "hr").mkdir()
    (tmp_path / "sr").mkdir()
    for i, size in enumerate(sizes):
        hr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        sr = np.clip(hr.astype(int) + rng.integers(-15, 16, hr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(hr).save(tmp_path / "hr" / f"im{i}.png")
        Image.fromarray(sr).save(tmp_path / "sr" / f"im{i}.png")
    return tmp_path / "sr", tmp_path / "hr"


def test_every_module_imports_and_psnr_ssim_eval_runs_without_pyiqa(tmp_path):
    sr_dir, hr_dir = _pair_dirs(tmp_path)
    out = tmp_path / "eval"
    code = f'''
import importlib, pkgutil
import xpsr
for module in pkgutil.walk_packages(xpsr.__path__, "xpsr."):
    importlib.import_module(module.name)
from xpsr.cli import main
rc = main(["eval", "sr={sr_dir}", "hr={hr_dir}", "output_dir={out}", "metrics=[psnr,ssim]", "crop_border=4"])
print(json.dumps({{"rc": rc, "attempts": attempts, "loaded": [m for m in {PYIQA_STACK!r} if m in sys.modules]}}))
'''
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "attempts": [], "loaded": []}
    summary = json.loads((out / "summary.json").read_text())
    pairs = [(np.asarray(Image.open(sr_dir / f"im{i}.png")), np.asarray(Image.open(hr_dir / f"im{i}.png")))
             for i in range(2)]
    assert summary["psnr"] == np.mean([psnr_y(sr, hr, 4) for sr, hr in pairs])
    assert summary["ssim"] == np.mean([ssim_y(sr, hr, 4) for sr, hr in pairs])
    assert summary["settings"]["crop_border"] == 4 and 20 < summary["psnr"] < 40


def test_a_pyiqa_metric_without_pyiqa_names_the_extra_before_any_work(tmp_path):
    sr_dir, hr_dir = _pair_dirs(tmp_path)
    out = tmp_path / "eval"
    code = f'''
from xpsr.cli import main
rc = main(["eval", "sr={sr_dir}", "hr={hr_dir}", "output_dir={out}", "metrics=[psnr,lpips]"])
print(json.dumps({{"rc": rc, "attempts": attempts}}))
'''
    proc = _run(code, tmp_path)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": 1, "attempts": ["pyiqa"]}
    message = proc.stderr.strip()
    assert "\n" not in message and message.startswith("xpsr eval: metric 'lpips' needs pyiqa")
    assert 'pip install -e ".[metrics]"' in message and "PolyForm Noncommercial 1.0.0" in message
    assert not out.exists()  # refused before anything was computed or written (PSNR was not run first)
