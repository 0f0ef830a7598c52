"""Training: the tiny recipe end to end, overfitting, exact resume, trainable set, DFC toggles, ablations."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_config
from safetensors.torch import load_file

from xpsr.config import DFCConfig, TrainConfig, load_config
from xpsr.models.build import build_xpsr, trainable_parameters
from xpsr.training.dataset import build_dataset
from xpsr.training.loop import NonFiniteLossError, run_training
from xpsr.training.step import paper_latent_indices, training_step


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from xpsr.training.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), crop_size=64)


def _train_cfg(demo, out, *overrides, config=REPO / "configs" / "train" / "tiny.yaml"):
    base = [f"output_dir={out}", "demo_data=false", f"data.pairs=[{demo.pairs[0]}]", f"data.cache={demo.cache}",
            "report_to=none", "validation.every=0", "checkpoint_every=0", "num_workers=0", "device=cpu",
            "model.base=tiny", "model.conditioning_channels=[8,16,16,32]", "data.crop_size=64",
            "mixed_precision=fp32", "log_every=1"]
    return load_config(TrainConfig, config, base + list(overrides))


def _batch(demo, n=2, **data_overrides):
    cfg = dataclasses.replace(demo, original_image_ratio=0.0, **data_overrides)
    dataset, _ = build_dataset(cfg)
    items = [dataset[(i, 0)] for i in range(n)]
    return {"hr": torch.stack([x["hr"] for x in items]), "lr_cond": torch.stack([x["lr_cond"] for x in items]),
            "content_prompt": [x["content_prompt"] for x in items],
            "quality_prompt": [x["quality_prompt"] for x in items]}


def test_tiny_recipe_end_to_end_from_the_script(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config",
                           str(REPO / "configs" / "train" / "tiny.yaml"), f"output_dir={out}", "max_steps=6",
                           "checkpoint_every=2", "validation.every=6", "validation.num_inference_steps=2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 6 steps" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]  # total limit 2
    assert {p.name for p in (out / "checkpoints" / "step-6").iterdir()} >= {
        "trained.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "state.json"}
    assert (out / "final" / "trained.safetensors").is_file() and (out / "samples" / "step-6.png").is_file()
    losses = [json.loads(line) for line in (out / "logs" / "losses.jsonl").read_text().splitlines()]
    assert {"loss", "noise_mse", "dfc_pixel", "dfc_latent", "lr"} <= losses[-1].keys()
    assert list((out / "logs").rglob("events.out.tfevents*")), "tensorboard logs"
    assert (out / "config.yaml").is_file() and json.loads((out / "environment.json").read_text())["torch"]


def test_overfits_one_fixed_batch(demo):
    modules = build_xpsr(tiny_config())
    params = list(trainable_parameters(modules.unet, modules.controlnet).values())
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = _batch(demo)
    losses = []
    for _ in range(50):
        out = training_step(modules, batch, DFCConfig(), generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_resume_reproduces_the_uninterrupted_run_bitwise(demo, tmp_path):
    common = ("max_steps=4", "gradient_accumulation_steps=2", "use_ema=true", "ema_decay=0.9",
              "lr_scheduler=cosine", "lr_warmup_steps=1", "checkpoint_every=0")
    run_training(_train_cfg(demo, tmp_path / "straight", *common))
    first = run_training(_train_cfg(demo, tmp_path / "split", "stop_at_step=2", *common))
    assert first["steps"] == 2 and not (tmp_path / "split" / "final").exists()
    run_training(_train_cfg(demo, tmp_path / "split", "resume=latest", *common))
    for name in ("trained.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "straight" / "final" / name))
        b = load_file(str(tmp_path / "split" / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    straight = (tmp_path / "straight" / "logs" / "losses.jsonl").read_text().splitlines()
    split = (tmp_path / "split" / "logs" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in straight] == [json.loads(x)["loss"] for x in split]


def test_only_trainable_parameters_change(demo):
    modules = build_xpsr(tiny_config())
    before = {f"{name}.{k}": v.clone() for name in ("unet", "controlnet", "vae", "text_encoder")
              for k, v in getattr(modules, name).state_dict().items()}
    trainable = trainable_parameters(modules.unet, modules.controlnet)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3)
    for _ in range(2):
        training_step(modules, _batch(demo), DFCConfig(), generator=torch.Generator().manual_seed(1)).loss.backward()
        opt.step()
        opt.zero_grad()
    after = {f"{name}.{k}": v for name in ("unet", "controlnet", "vae", "text_encoder")
             for k, v in getattr(modules, name).state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(trainable)
    assert any(k.startswith("controlnet.") for k in changed) and any(".pixel_attentions." in k for k in changed)


def test_dfc_toggles_change_exactly_their_terms(demo):
    modules = build_xpsr(tiny_config())
    batch = _batch(demo)

    def terms(**kw):
        out = training_step(modules, batch, DFCConfig(**kw), generator=torch.Generator().manual_seed(2))
        return {k: v.item() for k, v in out.terms.items()}

    full, no_pixel, no_latent = terms(), terms(pixel=False), terms(latent=False)
    none, paper, heavy = terms(pixel=False, latent=False), terms(latent_scales="paper"), terms(weight=0.1)
    assert full["dfc_pixel"] > 0 and full["dfc_latent"] > 0
    assert no_pixel["dfc_pixel"] == 0 and no_pixel["dfc_latent"] == full["dfc_latent"]
    assert no_latent["dfc_latent"] == 0 and no_latent["dfc_pixel"] == full["dfc_pixel"]
    assert none["loss"] == pytest.approx(full["noise_mse"]) and none["noise_mse"] == full["noise_mse"]
    assert paper["dfc_pixel"] == full["dfc_pixel"] and paper["dfc_latent"] < full["dfc_latent"]
    assert heavy["dfc_latent"] == pytest.approx(2 * full["dfc_latent"])
    shapes = [torch.zeros(1, 4, s, s) for s in (8, 8, 8, 4, 4, 4, 2, 2, 2, 2)]
    assert paper_latent_indices(shapes) == [0, 3, 6]


def test_each_distinct_prompt_is_encoded_once_and_empty_content_mode(demo, monkeypatch):
    import xpsr.training.step as step_mod

    modules = build_xpsr(tiny_config())
    seen = []
    modules.text_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    batch = _batch(demo, n=4)
    batch["content_prompt"] = ["a cat", "a cat", "a dog", ""]
    batch["quality_prompt"] = ["noisy"] * 4
    training_step(modules, batch, DFCConfig(), generator=torch.Generator().manual_seed(0))
    assert seen == [3, 1]
    calls = []
    real = step_mod.encode_prompts
    monkeypatch.setattr(step_mod, "encode_prompts", lambda tok, enc, texts, dev: calls.append(texts) or real(
        tok, enc, texts, dev))
    training_step(modules, batch, DFCConfig(), "empty", generator=torch.Generator().manual_seed(0))
    assert calls[0] == [""] * 4


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "train").glob("ablation_*.yaml")))
def test_every_ablation_config_runs_one_step(demo, tmp_path, name):
    cfg = _train_cfg(demo, tmp_path, "max_steps=1", "model.base=tiny", "batch_size=1",
                     config=REPO / "configs" / "train" / name)
    main = load_config(TrainConfig, REPO / "configs" / "train" / "xpsr_sd15.yaml", ["output_dir=x"])
    differs = {k for k in ("fusion_mode",) if getattr(cfg.model, k) != getattr(main.model, k)}
    differs |= {f"dfc.{k}" for k in ("pixel", "latent") if getattr(cfg.dfc, k) != getattr(main.dfc, k)}
    assert differs, f"{name} ablates nothing"
    summary = run_training(cfg)
    assert summary["steps"] == 1 and all(v == v for v in summary["last"].values())


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_checkpoint(demo, tmp_path, monkeypatch):
    import xpsr.training.loop as loop

    real, calls = loop.training_step, []

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.terms["dfc_latent"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(loop, "training_step", flaky)
    with pytest.raises(NonFiniteLossError, match="'dfc_latent' is nan at step 3"):
        run_training(_train_cfg(demo, tmp_path, "max_steps=5", "checkpoint_every=2"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


def test_clear_errors_for_bad_setups(tmp_path):
    def train(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config",
                               str(REPO / "configs" / "train" / "tiny.yaml"), f"output_dir={tmp_path / 'o'}", *args],
                              capture_output=True, text=True, timeout=300)

    proc = train("model.base=/nonexistent/sd15")
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    proc = train("demo_data=false")
    assert proc.returncode == 1 and "`pairs` is empty" in proc.stderr
    proc = train("max_step=3")
    assert proc.returncode == 1 and "max_step" in proc.stderr
