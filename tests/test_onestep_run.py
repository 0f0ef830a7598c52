"""One-step runs end to end: exact resume across processes, `xpsr infer mode=onestep` on a folder,
merge_lora (merged == unmerged), export, and `xpsr tables` with the seconds-per-image column."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from onestep_helpers import RECIPE, TEACHER_INFER, build
from PIL import Image
from safetensors.torch import load_file


def _xpsr(*args, hash_seed: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONHASHSEED=str(hash_seed),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "xpsr.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 2-step one-step run, and one stopped after step 1 and resumed, each session its own process."""
    from xpsr.training.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("onestep")
    demo = make_demo_data(root / "data", crop_size=64)
    work = root / "run"

    def train(*overrides, hash_seed):
        _xpsr("train", "--config", str(RECIPE), f"output_dir={work}", "demo_data=false",
              f"data.pairs=[{demo.pairs[0]}]", f"data.cache={demo.cache}", "report_to=none", "seed=3",
              f"onestep.teacher_infer_config={TEACHER_INFER}", "max_steps=2", "checkpoint_every=1",
              *overrides, hash_seed=hash_seed)

    train(hash_seed=1)
    shutil.move(str(work), str(root / "straight"))
    train("stop_at_step=1", hash_seed=2)
    train("resume=latest", hash_seed=3)
    shutil.move(str(work), str(root / "resumed"))
    return {"straight": root / "straight", "resumed": root / "resumed", "demo": demo}


def test_resume_is_exact(runs):
    a = load_file(str(runs["straight"] / "final" / "trained.safetensors"))
    b = load_file(str(runs["resumed"] / "final" / "trained.safetensors"))
    assert a.keys() == b.keys() and any(".lora_B.student." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lora_a = load_file(str(runs["straight"] / "final" / "student_lora" / "adapter_model.safetensors"))
    lora_b = load_file(str(runs["resumed"] / "final" / "student_lora" / "adapter_model.safetensors"))
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    assert any(v.abs().sum() > 0 for k, v in lora_a.items() if "lora_B" in k)  # the student did train
    losses = [json.loads(line) for line in (runs["straight"] / "logs" / "losses.jsonl").read_text().splitlines()]
    assert {"regression", "dfc_pixel", "distill", "vsd", "fake_score"} <= set(losses[-1])


def test_infer_onestep_folder_export_merged_and_tables(runs, tmp_path):
    from xpsr.apps.export import export_model
    from xpsr.config import EvalConfig, ExportConfig, InferConfig, load_config
    from xpsr.inference.run import run_inference
    from xpsr.metrics.evaluate import evaluate
    from xpsr.metrics.tables import compare_table

    pairs = runs["demo"].pairs[0]
    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    lr_dir.mkdir()
    hr_dir.mkdir()
    for name in sorted(os.listdir(f"{pairs}/lr"))[:2]:
        shutil.copy(f"{pairs}/lr/{name}", lr_dir / name)
        shutil.copy(f"{pairs}/hr/{name}", hr_dir / name)

    def infer(weights, out, *extra):
        cfg = load_config(InferConfig, REPO / "configs" / "infer" / "onestep_tiny_cpu.yaml",
                          [f"input={lr_dir}", f"output_dir={tmp_path / out}", f"weights={weights}", *extra])
        return run_inference(cfg)

    assert infer(runs["straight"], "sr_onestep")["done"] == 2
    with pytest.raises(ValueError, match="one-step student"):
        infer(runs["straight"], "sr_refused", "mode=multistep")
    exported = export_model(ExportConfig(weights=str(runs["straight"]), output=str(tmp_path / "merged"),
                                         merge_lora=True))
    assert "One-step student" in (exported / "README.md").read_text()
    assert infer(exported, "sr_merged")["done"] == 2
    for name in os.listdir(tmp_path / "sr_onestep"):
        if name.endswith(".png"):
            x, y = (np.asarray(Image.open(tmp_path / d / name)).astype(int) for d in ("sr_onestep", "sr_merged"))
            assert np.abs(x - y).max() <= 1
    from xpsr.inference.diffusers_pipeline import XPSRPipeline

    pipe = XPSRPipeline.from_pretrained(exported)  # the diffusers face: the same one-step bytes as `xpsr infer`
    name = sorted(os.listdir(lr_dir))[0]
    out = pipe(str(lr_dir / name), mode="onestep", scheduler="ddim", process_size=64, lr_latent="mean",
               output_type="np").images[0]
    expected = np.asarray(Image.open((tmp_path / "sr_merged" / name).with_suffix(".png")))
    assert np.array_equal((out * 255).round().astype(np.uint8), expected)
    with pytest.raises(ValueError, match="merge_lora=true"):
        export_model(ExportConfig(weights=str(runs["straight"]), output=str(tmp_path / "unmerged")))
    multi = load_config(InferConfig, REPO / "configs" / "infer" / "tiny_cpu.yaml",
                        [f"input={lr_dir}", f"output_dir={tmp_path / 'sr_multistep'}"])
    run_inference(multi)
    for run in ("sr_onestep", "sr_multistep"):
        evaluate(EvalConfig(sr=str(tmp_path / run), hr=str(hr_dir), output_dir=str(tmp_path / f"eval_{run}"),
                            metrics=["psnr", "ssim"], device="cpu"))
    table = compare_table({"multi-step": tmp_path / "eval_sr_multistep", "one-step": tmp_path / "eval_sr_onestep"},
                          ["psnr", "ssim"])
    assert "s/img ↓" in table.splitlines()[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    seconds = json.loads((tmp_path / "sr_onestep" / "infer_report.json").read_text())["seconds_per_image"]
    assert f"{seconds:.4f}" in rows["one-step"] and "–" not in rows["one-step"]


def test_merged_equals_unmerged(tmp_path):
    """A student with large random LoRA weights: one-step SR before and after merge_lora agree."""
    from xpsr.config import InferConfig
    from xpsr.inference.pipeline import super_resolve
    from xpsr.onestep.lora import FAKE, STUDENT, adapter_parameters, drop_adapter, merge_lora

    _, modules, _, _, _ = build(tmp_path)
    drop_adapter(modules.unet, FAKE)
    with torch.no_grad():
        for p in adapter_parameters(modules.unet, STUDENT).values():
            p.normal_(0, 0.1)
    cfg = InferConfig(input="-", output_dir="-", mode="onestep", process_size=64, lr_latent="mean", color_fix="none")
    lr = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    modules.onestep_timestep = 999
    unmerged = super_resolve(modules, lr, "a cat", "blurry", cfg, torch.device("cpu"))
    merge_lora(modules.unet)
    assert not any("lora" in k for k in modules.unet.state_dict())
    merged = super_resolve(modules, lr, "a cat", "blurry", cfg, torch.device("cpu"))
    assert np.abs(unmerged.astype(int) - merged.astype(int)).max() <= 1
    assert (unmerged != merged).mean() < 0.01
    with pytest.raises(ValueError, match="no student"):
        merge_lora(modules.unet)
