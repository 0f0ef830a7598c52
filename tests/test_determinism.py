"""The same seed gives the same bytes, across processes (CPU).

Each run is a fresh Python process (`python -m xpsr.cli ...`) with a different PYTHONHASHSEED, so
hash-order dependence and per-process seeds (torch 2.14 seeds its default generator at random per
process) would show. The thread count is pinned to one, because CPU kernels split reductions by
thread (1 and 2 threads gave weights 3e-6 apart after 3 tiny steps); one thread is also the fastest on a
busy machine. A run dir's config (saved in every checkpoint) names its own paths, so runs that must
match byte for byte are made in the same folder one after the other (the previous one moved aside).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import load_file

CHECKPOINT_FILES = ("trained.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "state.json")


def _xpsr(*args, hash_seed: int, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONHASHSEED=str(hash_seed),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "xpsr.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Training runs of the tiny recipe, each session in its own process. Returns {name: run dir}."""
    from xpsr.training.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("det")
    demo = make_demo_data(root / "data", crop_size=64)
    work = root / "run"  # every session runs here, so paths in the saved configs are the same

    def train(*overrides, hash_seed):
        _xpsr("train", "--config", str(REPO / "configs" / "train" / "tiny.yaml"), f"output_dir={work}",
              "demo_data=false", f"data.pairs=[{demo.pairs[0]}]", f"data.cache={demo.cache}", "report_to=none",
              "validation.every=0", "seed=11", "checkpoint_every=2", "checkpoints_total_limit=null",
              "log_every=1", *overrides, hash_seed=hash_seed)

    def keep(name):
        shutil.move(str(work), str(root / name))
        return root / name

    out = {}
    train("max_steps=4", hash_seed=1)
    out["a"] = keep("a")
    train("max_steps=4", hash_seed=2)
    out["b"] = keep("b")
    train("max_steps=4", "stop_at_step=2", hash_seed=3)
    train("max_steps=4", "resume=latest", hash_seed=4)
    out["stopped_and_resumed"] = keep("stopped_and_resumed")
    train("max_steps=2", hash_seed=5)
    train("max_steps=4", "resume=latest", hash_seed=6)
    out["extended"] = keep("extended")
    return out


def _tensors(path):
    return load_file(str(path))


def _config(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["config"]) if "config" in f.metadata() else f.metadata()


def _assert_same_tensors(a, b, name):
    x, y = _tensors(a), _tensors(b)
    assert x.keys() == y.keys(), name
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{name}: {k} differs"


def _losses(run):
    rows = [json.loads(line) for line in (run / "logs" / "losses.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]  # the one wall-clock field


def test_the_same_command_twice_writes_identical_checkpoints(runs):
    a, b = runs["a"], runs["b"]
    for step in (2, 4):
        for name in CHECKPOINT_FILES:
            assert (a / "checkpoints" / f"step-{step}" / name).read_bytes() == \
                   (b / "checkpoints" / f"step-{step}" / name).read_bytes(), f"step-{step}/{name}"
    assert (a / "final" / "trained.safetensors").read_bytes() == (b / "final" / "trained.safetensors").read_bytes()
    assert _losses(a) == _losses(b) and len(_losses(a)) == 4
    # the checkpoint carries every RNG: torch's global one must be seeded, not the per-process default
    rng = _tensors(a / "checkpoints" / "step-2" / "rng.safetensors")
    assert set(rng) >= {"generator", "torch_cpu"}


def _assert_resumed_equals_straight(straight, resumed):
    ckpt_a, ckpt_b = straight / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4"
    for name in ("optimizer.pt", "scheduler.pt", "rng.safetensors", "state.json"):
        assert (ckpt_a / name).read_bytes() == (ckpt_b / name).read_bytes(), name
    # the saved config differs by resume/stop_at_step (metadata); the weights must not differ by a bit
    _assert_same_tensors(ckpt_a / "trained.safetensors", ckpt_b / "trained.safetensors", "step-4")
    _assert_same_tensors(straight / "final" / "trained.safetensors", resumed / "final" / "trained.safetensors",
                         "final")
    assert _losses(straight) == _losses(resumed)


def test_stop_at_step_then_resume_latest_equals_the_straight_run(runs):
    _assert_resumed_equals_straight(runs["a"], runs["stopped_and_resumed"])
    assert _config(runs["stopped_and_resumed"] / "final" / "trained.safetensors")["resume"] == "latest"


def test_resuming_with_a_larger_max_steps_continues_a_constant_schedule_exactly(runs):
    extended = runs["extended"]
    assert json.loads((extended / "checkpoints" / "step-2" / "state.json").read_text())["max_steps"] == 2
    _assert_resumed_equals_straight(runs["a"], extended)


def test_infer_twice_writes_identical_png_bytes(runs, tmp_path):
    import numpy as np
    import skimage.data
    from PIL import Image

    Image.fromarray(np.asarray(skimage.data.chelsea())).resize((24, 16)).save(tmp_path / "cat.png")
    outputs = []
    for hash_seed in (7, 8):
        out = tmp_path / f"sr{hash_seed}"
        _xpsr("infer", "--config", str(REPO / "configs" / "infer" / "tiny_cpu.yaml"), f"input={tmp_path / 'cat.png'}",
              f"output_dir={out}", f"weights={runs['a'] / 'final' / 'trained.safetensors'}", "prompts=fixed",
              "prompt=a blurry photo of a cat", "quality_prompt=slightly noisy, low quality", "seed=3",
              hash_seed=hash_seed)
        outputs.append((out / "cat.png").read_bytes())
    assert outputs[0] == outputs[1]
    assert Image.open(tmp_path / "sr7" / "cat.png").size == (96, 64)


def test_safetensors_metadata_is_written_in_sorted_order(tmp_path):
    """safetensors orders __metadata__ keys by a randomly seeded hash map (a new order per save); our
    checkpoints sort them, so the same weights and config always give the same bytes."""
    from xpsr.models.checkpoint import _atomic_save

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    metadata = {"format": "x", "config": '{"k": "\u00e9\\n"}', "zeta": "a\tb", "alpha": "1"}
    blobs = set()
    for i in range(8):
        _atomic_save(tensors, tmp_path / f"{i}.safetensors", metadata)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    blob = blobs.pop()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert list(header["__metadata__"]) == ["alpha", "config", "format", "zeta"]
    assert header["__metadata__"] == metadata
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
