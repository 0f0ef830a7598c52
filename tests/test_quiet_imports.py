"""bitsandbytes stays out of the commands that do not use it (issue 15): diffusers imports peft, which imports
bitsandbytes, whose CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community" offline."""
from __future__ import annotations

import subprocess
import sys

from xpsr.apps.quiet_imports import needs_bitsandbytes
from xpsr.config import TrainConfig, load_config

PROBE = """
import sys
from xpsr.cli import main
code = main(sys.argv[1:])  # infer loads the pipeline: diffusers, peft
import peft.helpers
print("code", code, "bitsandbytes", sys.modules.get("bitsandbytes") is not None, "peft-bnb", peft.helpers.bnb)
"""


def test_infer_runs_without_importing_bitsandbytes(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE, "infer", f"input={tmp_path / 'none'}",
                           f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert "code 1 bitsandbytes False peft-bnb None" in proc.stdout, proc.stdout + proc.stderr
    assert "gemm_4bit" not in proc.stderr and "bitsandbytes" not in proc.stderr


def test_main_in_process_leaves_no_trace():
    import sys

    from xpsr.cli import main

    before = "bitsandbytes" in sys.modules
    assert main(["tables", "output_dir=unused"]) == 1
    assert ("bitsandbytes" in sys.modules) == before and sys.modules.get("bitsandbytes", 0) is not None


def test_only_8bit_adam_needs_it():
    cfg = load_config(TrainConfig, None, ["output_dir=x"])
    assert not needs_bitsandbytes("train", cfg) and not needs_bitsandbytes("infer", cfg)
    assert needs_bitsandbytes("train", load_config(TrainConfig, None, ["output_dir=x", "use_8bit_adam=true"]))
