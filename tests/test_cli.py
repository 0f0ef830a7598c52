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


def test_flops_and_both_modes_benchmarks_run():
    """The measurement paths of the one-step notes: FLOPs at SD 1.5 shapes on the meta device, and seconds per
    image of both samplers on the same tiny model."""
    proc = _run("scripts/benchmark.py", "what=flops", "preset=sd15", "resolution=512", "inference_steps=20")
    assert proc.returncode == 0, proc.stderr
    flops = json.loads(proc.stdout)
    assert flops["tflops"]["multistep_total"] > 10 * flops["tflops"]["onestep_total"] > 0
    proc = _run("scripts/benchmark.py", "what=infer", "mode=both", "preset=tiny", "lr_size=16", "inference_steps=2",
                "steps=1", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    both = json.loads(proc.stdout)
    assert both["multistep"]["seconds_per_image"] > 0 and both["onestep"]["seconds_per_image"] > 0
    assert both["speedup"] == both["multistep"]["seconds_per_image"] / both["onestep"]["seconds_per_image"]


def test_gpu_suite_writes_measured_beside_expected(tmp_path, monkeypatch):
    """The suite's plumbing, on a CPU command in place of the GPU ones: one row per command, a failed
    command is a row that says so (and the exit code), the expected figures kept as written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert all(expected.startswith("EXPECTED") for _, _, expected in script.SUITE)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(script, "MEMORY", [])  # its rows plan SD 1.5 and need CUDA: tests/test_memory.py covers them
    monkeypatch.setattr(script, "SUITE", [
        ("tiny step", ["steps=1", "warmup=0", "resolution=32", "batch_size=1"], "EXPECTED: anything"),
        ("bad device", ["device=tpu"], "EXPECTED: a refusal")])
    out = tmp_path / "gpu.md"
    assert script.gpu_suite(str(out)) == 1
    table = out.read_text().splitlines()
    assert table[0] == "| command | measured | expected (not measured) |" and len(table) == 4
    assert table[2].startswith("| tiny step | ") and " ms/step" in table[2]
    assert table[2].endswith("EXPECTED: anything |")
    assert table[3].startswith("| bad device | failed (exit 1)")


def test_abbreviated_options_are_not_taken_for_config(capsys):
    """argparse would read `--c=0` (or `--conf F`) as `--config`; an abbreviation is refused, naming it."""
    import pytest

    from xpsr.cli import main

    with pytest.raises(SystemExit) as e:
        main(["caption", "cache=x", "images=x", "--c=0"])
    assert e.value.code == 2 and "unrecognized arguments: --c=0" in capsys.readouterr().err
