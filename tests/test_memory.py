"""GPU memory plans (xpsr.memory): the counter, the plan against the CPU allocator's records, `xpsr plan`,
the fit decision before the first step, and the low-memory training keys (8-bit AdamW, cached VAE latents)."""
import dataclasses
import json

import pytest
import torch
from conftest import REPO

from xpsr.cli import main
from xpsr.config import PlanConfig, TrainConfig, load_config
from xpsr.memory.fit import MemoryPlanError, check_training_fits, guard_training, settings_that_fit
from xpsr.memory.gpus import GIB, Margin
from xpsr.memory.tracker import LiveBytes
from xpsr.memory.validate import measure_training

TINY_PLAN = REPO / "configs" / "plan" / "tiny_train.yaml"


def test_counter_counts_a_storage_once_and_lets_it_go():
    counter = LiveBytes()
    with counter:
        x = torch.empty(1000)
        view = x.view(10, 100)  # same storage: nothing new
        y = x + 1
        assert counter.live == 8000
        del x, view
        assert counter.live == 4000
        del y
    assert counter.live == 0 and counter.peak.bytes == 8000 and counter.peak.by_category == {"temporaries": 8000}


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", "--config", str(TINY_PLAN), f"output={out}"]) == 0
    return json.loads(out.read_text())


def test_tiny_plan_matches_the_cpu_allocator_within_5_percent(tiny_plan):
    cfg = load_config(PlanConfig, TINY_PLAN).train
    real = measure_training(cfg, "tiny")
    assert abs(tiny_plan["peak_bytes"] / real["measured"] - 1) < 0.05, (tiny_plan["peak_bytes"], real)
    # the categories are exact where they can be: every weight, and AdamW's two fp32 moments per trainable weight
    from xpsr.memory.build import build_modules

    modules = build_modules("tiny", cfg.model, device="meta")
    weights = sum(t.numel() * t.element_size() for m in (modules.unet, modules.controlnet, modules.vae,
                                                         modules.text_encoder)
                  for t in list(m.parameters()) + list(m.buffers()))
    cats = tiny_plan["by_category"]
    assert cats["parameters"] == weights
    assert cats["optimizer_state"] == pytest.approx(8 * tiny_plan["trainable_params"], rel=0.01)
    assert tiny_plan["peak_at"]["phase"] in {"forward", "backward", "optimizer"}
    assert tiny_plan["fits_gib"] == [8, 12, 16, 24, 40, 80] and tiny_plan["estimated_seconds"]["T4"] > 0


@pytest.mark.slow
def test_sd_shaped_plan_matches_the_cpu_allocator_within_5_percent():
    from xpsr.memory.validate import compare_training

    cfg = TrainConfig(output_dir="-", batch_size=1)
    cfg.data.crop_size = 128
    result = compare_training(cfg, "sd15-narrow")
    assert abs(result["error"]) < 0.05, result


def test_inference_plans_match_a_real_cpu_run():
    """fp32: the plan against the CPU allocator within 5 %. bf16 and small tiles: the plan equals our counter on
    the real tensors byte for byte; what the allocator sees beyond it is CPU kernel scratch (bf16 convolutions
    take the im2col fallback on CPU; CUDA's cuDNN workspace is bounded and in the margin)."""
    from xpsr.config import InferConfig
    from xpsr.memory.validate import compare_inference

    def cfg(*extra):
        return load_config(InferConfig, REPO / "configs" / "infer" / "tiny_cpu.yaml", ["input=x", "output_dir=y",
                                                                                       *extra])

    fp32 = compare_inference(cfg(), "tiny", 256)
    assert abs(fp32["error"]) < 0.05, fp32
    for extra in (["dtype=bf16"], ["latent_tile=8", "latent_overlap=2", "vae_decoder_tile=8"]):
        result = compare_inference(cfg(*extra), "tiny", 128)
        assert result["planned"] == result["counted"] <= result["measured"], (extra, result)


def _fake_plan(cfg: TrainConfig, preset: str) -> int:
    """Bytes by the options (shaped like the SD 1.5 table, not its numbers): what the decision logic reads."""
    gib = 14.0 if cfg.frozen_unet_dtype == "fp32" else 12.0
    gib += (0.5 if cfg.model.gradient_checkpointing else 2.5) * cfg.batch_size
    gib -= 5.0 if cfg.use_8bit_adam else 0
    return int(gib * GIB)


def test_refuses_before_the_first_step_naming_settings_that_fit():
    cfg = TrainConfig(output_dir="-", batch_size=4)
    with pytest.raises(MemoryPlanError) as e:
        check_training_fits(cfg, "sd15", free_bytes=20 * GIB, margin=Margin(0.1, 1.0), plan=_fake_plan)
    message = str(e.value)
    assert "\n" not in message and "20.0 GiB free" in message
    # 12 + 0.5 x 4 = 14 GiB with checkpointing: 16.4 GiB with the margin fits 20; bf16 alone (22 GiB) does not
    assert "settings that fit: mixed_precision=bf16 frozen_unet_dtype=mixed_precision " \
           "model.gradient_checkpointing=true" in message
    assert check_training_fits(cfg, "sd15", 40 * GIB, Margin(0.1, 1.0), _fake_plan) == _fake_plan(cfg, "sd15")
    assert settings_that_fit(cfg, "sd15", 2 * GIB, Margin(0.1, 1.0), _fake_plan) == []


def test_a_cuda_out_of_memory_error_becomes_one_line(monkeypatch):
    import xpsr.memory.fit as fit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(23.5 * GIB), 24 * GIB))
    monkeypatch.setattr(fit, "planned_peak", _fake_plan)
    cfg = TrainConfig(output_dir="-", batch_size=1, device="auto")
    with pytest.raises(MemoryPlanError) as e:
        with guard_training(cfg):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert str(e.value).startswith("CUDA ran out of memory: but the GPU has 23.5 GiB free; settings that fit:")
    with pytest.raises(MemoryPlanError, match="this setting needs"):  # 14 + 2.5 x 8 GiB: refused up front
        with guard_training(TrainConfig(output_dir="-", batch_size=8, device="auto")):
            pytest.fail("the step must not start")
    with guard_training(TrainConfig(output_dir="-", device="cpu")):  # CPU: no check at all
        pass


# --- low-memory training keys -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from xpsr.training.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), crop_size=64)


def _cfg(demo, out, *overrides):
    base = [f"output_dir={out}", "demo_data=false", f"data.pairs=[{demo.pairs[0]}]", f"data.cache={demo.cache}",
            "report_to=none", "validation.every=0", "checkpoint_every=0", "num_workers=0", "device=cpu",
            "model.base=tiny", "model.conditioning_channels=[8,16,16,32]", "data.crop_size=64",
            "mixed_precision=fp32", "log_every=1", "max_steps=2"]
    return load_config(TrainConfig, REPO / "configs" / "train" / "tiny.yaml", base + list(overrides))


def _batch(dataset, n=2):
    items = [dataset[(i, 0)] for i in range(n)]
    return {k: torch.stack([x[k] for x in items]) if torch.is_tensor(items[0][k]) else [x[k] for x in items]
            for k in ("hr", "lr_cond", "content_prompt", "quality_prompt", *(["hr_moments"] if "hr_moments" in
                                                                               items[0] else []))}


def test_8bit_adamw_trains_with_uint8_moments(demo, tmp_path):
    from xpsr.config import DFCConfig
    from xpsr.models.build import build_xpsr
    from xpsr.training.dataset import build_dataset
    from xpsr.training.loop import make_optimizer, run_training
    from xpsr.training.step import training_step

    cfg = _cfg(demo, tmp_path / "run", "use_8bit_adam=true", "learning_rate=1e-3")
    modules = build_xpsr(cfg.model)
    from xpsr.models.build import trainable_parameters

    params = list(trainable_parameters(modules.unet, modules.controlnet).values())
    optimizer = make_optimizer(cfg, params)
    batch = _batch(build_dataset(cfg.data)[0])
    losses = []
    for _ in range(30):
        out = training_step(modules, batch, DFCConfig(), generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::5]
    big = max(params, key=lambda p: p.numel())
    assert optimizer.state[big]["state1"].dtype == torch.uint8  # moments stored in 8 bits
    assert run_training(cfg)["steps"] == 2  # and the loop runs with it


def test_cached_vae_latents_are_exact_crash_safe_and_keyed_by_the_vae(demo, tmp_path):
    from xpsr.config import DFCConfig
    from xpsr.data.latent_cache import LatentCacheError
    from xpsr.models.build import build_xpsr
    from xpsr.training.dataset import PairDataError, build_dataset
    from xpsr.training.latent_cache import check_cache
    from xpsr.training.latent_cache import main as cache_main
    from xpsr.training.loop import run_training
    from xpsr.training.step import training_step

    cache = tmp_path / "latents"
    args = [f"data.pairs=[{demo.pairs[0]}]", f"data.latent_cache={cache}", "model.base=tiny"]
    assert cache_main(args) == 0
    entries = sorted(cache.glob("*.safetensors"))
    (cache / "x.safetensors.tmp").write_bytes(b"half an entry")  # what a killed run leaves
    assert cache_main(args) == 0 and sorted(cache.glob("*.safetensors")) == entries
    assert not list(cache.glob("*.tmp"))

    cached_cfg = _cfg(demo, tmp_path / "run", f"data.latent_cache={cache}")
    plain = build_dataset(_cfg(demo, tmp_path / "x").data)[0]
    cached = build_dataset(cached_cfg.data)[0]
    batch, cached_batch = _batch(plain), _batch(cached)
    modules = build_xpsr(cached_cfg.model)
    losses = [training_step(modules, b, DFCConfig(), generator=torch.Generator().manual_seed(3)).loss.item()
              for b in (batch, cached_batch)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the same sample of the same posterior
    assert run_training(cached_cfg)["steps"] == 2

    other = build_xpsr(_cfg(demo, tmp_path / "y", "model.seed=1").model)
    with pytest.raises(LatentCacheError, match="made by VAE"):
        check_cache(cache, other.vae)
    with pytest.raises(PairDataError, match="data.latent_cache needs data.crop_size"):
        build_dataset(_cfg(demo, tmp_path / "z", f"data.latent_cache={cache}", "data.crop_size=32").data)[0][(0, 0)]


def test_an_out_of_memory_error_in_inference_names_lower_memory_settings():
    from xpsr.config import InferConfig
    from xpsr.memory.fit import guard_inference

    with pytest.raises(MemoryPlanError) as e:
        with guard_inference(InferConfig(input="-", output_dir="-")):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert "\n" not in str(e.value) and "weights_storage=fp8 offload=model" in str(e.value)


def _infer_row(cfg, setting: str, size: int, gib: float, **keys) -> dict:
    from xpsr.memory.fit import INFER_KEYS

    base = {k: getattr(cfg, k) for k in INFER_KEYS}
    return {"what": "infer", "preset": "sd15", "row": f"sd15/infer/{setting}/{size}", "output_size": size,
            "peak_bytes": int(gib * GIB), **{**base, **keys}}


def test_inference_refuses_before_the_first_image_naming_planned_settings_that_fit(tmp_path, capsys):
    from types import SimpleNamespace

    from xpsr.config import InferConfig
    from xpsr.memory.fit import check_inference_fits, check_inference_memory

    cfg = load_config(InferConfig, None, ["input=x", "output_dir=y", "dtype=fp16", "mode=multistep"])
    rows = [_infer_row(cfg, "multistep fp16", 1024, 5.0), _infer_row(cfg, "multistep fp16", 2048, 9.5),
            _infer_row(cfg, "8 GB setting", 2048, 5.3, latent_tile=96, vae_decoder_tile=96, vae_tile_cache_mb=512)]
    # a 1500 px image is bounded by the 2048 px row: 9.5 x 1.1 + 1 = 11.45 GiB (shown 11.5)
    assert check_inference_fits(cfg, "sd15", 1500, 12 * GIB, rows=rows) is None
    with pytest.raises(MemoryPlanError) as e:
        check_inference_fits(cfg, "sd15", 1500, 8 * GIB, rows=rows)
    assert "\n" not in str(e.value) and "needs 11.5 GiB" in str(e.value) and "2048 px row" in str(e.value)
    assert "planned settings that fit: 8 GB setting" in str(e.value)
    with pytest.raises(MemoryPlanError, match="settings that use less: dtype=fp16 weights_storage=fp8"):
        check_inference_fits(cfg, "sd15", 1500, 4 * GIB, rows=rows)
    note = check_inference_fits(cfg, "sd15", 3000, 4 * GIB, rows=rows)  # larger than every row: said, not hidden
    assert note.startswith("memory check: no planned row of this setting covers 3000 px")
    # the hook `xpsr infer` calls: the largest image decides; tiny shapes have no rows; memory_check=false skips
    sd15 = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=768)))
    tiny = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=32)))
    import xpsr.memory.fit as fit

    real = fit.shipped_infer_rows
    fit.shipped_infer_rows = lambda preset: rows
    try:
        with pytest.raises(MemoryPlanError, match="processed at 2000 px"):
            check_inference_memory(cfg, sd15, [(512, 512), (1200, 2000)], "cuda", free_bytes=8 * GIB)
        check_inference_memory(cfg, tiny, [(1200, 2000)], "cuda", free_bytes=8 * GIB)
        check_inference_memory(dataclasses.replace(cfg, memory_check=False), sd15, [(1200, 2000)], "cuda",
                               free_bytes=8 * GIB)
    finally:
        fit.shipped_infer_rows = real


def test_the_inference_hook_sees_every_image_size_before_any_output(tmp_path):
    """run_inference calls the check once, after loading the model and before the first image, with the sizes
    the images are processed at; a refusal leaves the output folder without a single image."""
    import numpy as np
    from PIL import Image

    from xpsr.config import InferConfig
    from xpsr.inference.run import run_inference

    src = tmp_path / "lr"
    src.mkdir()
    Image.fromarray(np.zeros((20, 12, 3), np.uint8)).save(src / "a.png")
    Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(src / "b.png")
    cfg = load_config(InferConfig, REPO / "configs" / "infer" / "tiny_cpu.yaml",
                      [f"input={src}", f"output_dir={tmp_path / 'sr'}", "num_inference_steps=1", "process_size=64"])
    seen = []

    def refuse(cfg, modules, sizes, device):
        seen.append(sorted(sizes))
        raise MemoryPlanError("too big")

    with pytest.raises(MemoryPlanError):
        run_inference(cfg, before_first_image=refuse)
    # x4: 80x48 and 32x160, short side grown to process_size 64 (long side truncated), multiples of 8
    assert seen == [[(64, 320), (104, 64)]] and not list((tmp_path / "sr").glob("*.png"))


def test_shipped_configs_plan_as_documented():
    """configs/train/xpsr_sd15_{24,12}gb.yaml are planned rows of xpsr/memory/planned.jsonl (instant lookups
    for the check before the first step), and they fit where docs/gpu-memory.md says."""
    from xpsr.memory.fit import shipped_peaks, train_key

    peaks, margin = shipped_peaks(), Margin()
    big = load_config(TrainConfig, REPO / "configs" / "train" / "xpsr_sd15_24gb.yaml", allow_missing=True)
    small = load_config(TrainConfig, REPO / "configs" / "train" / "xpsr_sd15_12gb.yaml", allow_missing=True)
    assert big.batch_size == 8 and margin.needed_gib(peaks[train_key(big, "sd15")]) <= 24
    assert small.text_encoder_device == "cpu" and margin.needed_gib(peaks[train_key(small, "sd15")]) <= 12


def test_a_text_encoder_on_the_cpu_trains_alike_and_leaves_the_gpu_plan(demo, tmp_path):
    """text_encoder_device=cpu: the encoder runs where its weights are and hands its embeddings to the model's
    device; the plan drops exactly its weights (and its forward) from the GPU and adds the embeddings."""
    from xpsr.memory.build import build_modules
    from xpsr.memory.train_plan import plan_training
    from xpsr.models.text import encode_prompts
    from xpsr.training.loop import run_training

    same = run_training(_cfg(demo, tmp_path / "same"))
    cpu = run_training(_cfg(demo, tmp_path / "cpu", "text_encoder_device=cpu"))
    assert cpu["last"] == same["last"]  # on a CPU run the two places are one: the same step

    modules = build_modules("tiny", _cfg(demo, tmp_path / "m").model)
    on_meta = encode_prompts(modules.tokenizer, modules.text_encoder, ["a", "b", "a"], device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape[0] == 3  # ran on the CPU, handed to "meta"

    plans = {d: plan_training(_cfg(demo, tmp_path / "p", "batch_size=2", f"text_encoder_device={d}"), "tiny")
             for d in ("same", "cpu")}
    encoder = sum(t.numel() * t.element_size() for t in list(modules.text_encoder.parameters())
                  + list(modules.text_encoder.buffers()))
    embeds = 2 * 2 * 77 * modules.text_encoder.config.hidden_size * 4  # content + quality, batch 2, fp32
    assert plans["same"]["by_category"]["parameters"] - plans["cpu"]["by_category"]["parameters"] == encoder
    assert plans["cpu"]["by_category"]["inputs"] - plans["same"]["by_category"]["inputs"] == embeds
    assert not any(k.startswith("text_encoder") for k in plans["cpu"]["by_module"])


def test_section_keys_apply_on_top_of_the_file_the_plan_reads():
    """`xpsr plan train_config=F train.batch_size=3` plans batch 3 with the rest of F (the keys were ignored)."""
    cfg = load_config(PlanConfig, REPO / "configs" / "plan" / "sd15_train_12gb.yaml", ["train.batch_size=3"])
    assert cfg.train.batch_size == 3 and cfg.train.use_8bit_adam and cfg.train.data.latent_cache == "latents"
    cfg = load_config(PlanConfig, None, ["what=infer", "infer_config=configs/infer/xpsr_8gb.yaml",
                                         "infer.latent_tile=64"])
    assert cfg.infer.latent_tile == 64 and cfg.infer.vae_decoder_tile == 96
