"""The `xpsr` entry point and the benchmark script, as a user runs them."""
import json
import os
import subprocess
import sys

from conftest import REPO


def _run(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_help_lists_every_key_with_defaults():
    proc = _run("-m", "xpsr.cli", "demo", "--help")
    assert proc.returncode == 0
    for key in ("model.fusion_mode", "model.pixel_attention_init", "output_dir", "train_steps"):
        assert key in proc.stdout


def test_config_typo_exits_2_naming_the_key():
    proc = _run("-m", "xpsr.cli", "demo", "model.fusion_mod=sfa")
    assert proc.returncode == 1 and "fusion_mod" in proc.stderr


def test_benchmark_script_emits_json():
    proc = _run("scripts/benchmark.py", "steps=1", "warmup=0", "resolution=32", "batch_size=1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["preset"] == "tiny" and result["step_s_mean"] > 0 and result["trainable_params"] > 0
    proc = _run("scripts/benchmark.py", "steps=1", "warmup=0", "resolution=32", "batch_size=1", "include_data=true",
                "workers=0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["include_data"] is True  # stdout is pure JSON even though data prep prints
