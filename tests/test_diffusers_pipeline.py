"""XPSRPipeline (a diffusers DiffusionPipeline over super_resolve) and `xpsr export`: the saved folder rebuilds the
same model strictly, the pipeline gives `xpsr infer`'s bytes, diffusers' own loaders, the model card."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import GOLDEN, randomize_zero_inits, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file

from xpsr.cli import main
from xpsr.config import DatasetConfig, InferConfig, TrainConfig, load_config, to_dict
from xpsr.data.images import save_png_atomic
from xpsr.inference.diffusers_pipeline import XPSRPipeline
from xpsr.inference.pipeline import super_resolve
from xpsr.models.build import build_xpsr
from xpsr.models.checkpoint import CheckpointMismatchError, save_trained

STEPS = 2
CALL = {"num_inference_steps": STEPS, "process_size": 64}  # 16 px in, 64 px out, processed at 64 px


def _lr(seed=0, size=16):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir as training leaves it (final/ and one checkpoint), from a tiny model with every path live."""
    root = tmp_path_factory.mktemp("train")
    m = build_xpsr(tiny_config())
    randomize_zero_inits(m.controlnet, m.unet, seed=3)
    pairs = root / "pairs"
    pairs.mkdir()
    (pairs / "manifest.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n')
    run = root / "run"
    cfg = TrainConfig(output_dir=str(run), model=tiny_config(), max_steps=2,
                      data=DatasetConfig(pairs=[str(pairs)], cache=str(root / "prompts.sqlite")))
    save_trained(run / "final" / "trained.safetensors", m.unet, m.controlnet, to_dict(cfg))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    step = run / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    shutil.copy(run / "final" / "trained.safetensors", step / "trained.safetensors")
    (step / "state.json").write_text(json.dumps({"step": 1, "samples": 2}))
    return run, m


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "xpsr-tiny"
    assert main(["export", f"weights={run_dir[0]}", f"output={out}", "base_model=example/sd-base"]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(exported):
    return XPSRPipeline.from_pretrained(exported)


def test_pipeline_gives_the_bytes_of_xpsr_infer(run_dir, exported, pipe, tmp_path):
    lr = tmp_path / "lr" / "photo.png"
    save_png_atomic(_lr(), lr)
    common = [f"input={lr}", "num_inference_steps=2", "process_size=64", "device=cpu"]
    assert main(["infer", *common, f"output_dir={tmp_path / 'run'}", f"weights={run_dir[0]}"]) == 0
    assert main(["infer", *common, f"output_dir={tmp_path / 'export'}", f"weights={exported}"]) == 0
    image = pipe(Image.open(lr), **CALL).images[0]  # no prompts: empty content, heuristic quality, as infer
    save_png_atomic(np.asarray(image), tmp_path / "pipe.png")
    expected = (tmp_path / "run" / "photo.png").read_bytes()
    assert (tmp_path / "pipe.png").read_bytes() == expected
    assert (tmp_path / "export" / "photo.png").read_bytes() == expected
    assert image.size == (64, 64)


def test_saved_folder_rebuilds_the_in_memory_model(run_dir, pipe, tmp_path):
    from xpsr import XPSRPipeline as exported_name

    assert exported_name is XPSRPipeline
    memory = XPSRPipeline.from_modules(run_dir[1])
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        a, b = getattr(memory, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert pipe.xpsr_config == run_dir[1].config
    lr = _lr(1)
    assert np.array_equal(memory(lr, output_type="np", **CALL).images, pipe(lr, output_type="np", **CALL).images)
    # saving a loaded pipeline writes the same model again, without where it was loaded from
    pipe.save_pretrained(tmp_path / "again")
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == "XPSRPipeline" and "_name_or_path" not in index
    assert index["unet"] == ["xpsr.inference.diffusers_pipeline", "XPSRUNetLoader"]
    assert index["controlnet"] == ["xpsr.inference.diffusers_pipeline", "XPSRControlNetLoader"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    again = XPSRPipeline.from_pretrained(tmp_path / "again")
    assert all(torch.equal(v, again.controlnet.state_dict()[k]) for k, v in pipe.controlnet.state_dict().items())


def test_output_types_batches_and_generators(pipe):
    lr, lr2 = _lr(2), _lr(3)
    pil = pipe(lr, **CALL).images
    assert isinstance(pil, list) and pil[0].size == (64, 64) and pil[0].mode == "RGB"
    as_np = pipe(lr, output_type="np", **CALL).images
    as_pt = pipe(torch.from_numpy(lr).permute(2, 0, 1) / 255.0, output_type="pt", **CALL).images
    assert as_np.shape == (1, 64, 64, 3) and as_np.dtype == np.float32
    assert np.array_equal(as_np[0], np.asarray(pil[0]) / np.float32(255))
    assert as_pt.shape == (1, 3, 64, 64) and torch.equal(as_pt, torch.from_numpy(as_np).permute(0, 3, 1, 2))
    # a CPU generator seeded with s == seed=s; a batch with one generator per image == the images one by one
    seeded = pipe(lr, output_type="np", generator=torch.Generator().manual_seed(7), **CALL).images
    assert np.array_equal(seeded, pipe(lr, output_type="np", seed=7, **CALL).images)
    assert not np.array_equal(seeded, as_np)
    batch = pipe([lr, lr2], output_type="np", generator=[torch.Generator().manual_seed(7) for _ in range(2)],
                 prompt=["", "a cat"], **CALL).images
    assert np.array_equal(batch[0], seeded[0])
    assert np.array_equal(batch[1], pipe(lr2, prompt="a cat", output_type="np", seed=7, **CALL).images[0])
    (images,) = pipe(lr, return_dict=False, output_type="np", **CALL)
    assert np.array_equal(images, as_np)


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])  # diffusers 0.42's name and its deprecated one
def test_from_pretrained_in_half_precision_loads_every_part_in_that_dtype(exported, keyword):
    half = XPSRPipeline.from_pretrained(exported, **{keyword: torch.bfloat16})
    for name in ("vae", "text_encoder", "unet", "controlnet"):
        dtypes = {p.dtype for p in getattr(half, name).parameters()}
        assert dtypes == {torch.bfloat16}, (name, dtypes)
    # the XPSR parts still load strictly in half precision (the pixel attention and SFA keys are there)
    assert any("pixel_attention" in k for k in half.unet.state_dict())
    image = half(_lr(), **CALL).images[0]
    assert image.size == (64, 64)


def test_arguments_map_onto_infer_config(pipe, monkeypatch):
    import xpsr.inference.diffusers_pipeline as module

    seen = {}

    def fake(modules, lr, content, quality, cfg, device, **hooks):
        seen.update(content=content, quality=quality, cfg=cfg, device=device)
        return np.zeros((4, 4, 3), np.uint8)

    monkeypatch.setattr(module, "super_resolve", fake)
    pipe(_lr(), prompt="a dog", quality_prompt="sharp", guidance_scale=5.5, negative_prompt="bad",
         color_fix="wavelet", upscale=2)
    cfg = seen["cfg"]
    assert (seen["content"], seen["quality"]) == ("a dog", "sharp")
    assert (cfg.guidance_scale, cfg.negative_prompt, cfg.color_fix, cfg.upscale) == (5.5, "bad", "wavelet", 2)
    defaults = InferConfig(input="-", output_dir="-")
    assert cfg.num_inference_steps == 20 and cfg.negative_quality_prompt == defaults.negative_quality_prompt
    assert cfg.scheduler == "ddpm" and cfg.vae_tile == defaults.vae_tile and seen["device"].type == "cpu"
    from xpsr.captions.heuristic import describe, measure

    pipe(_lr())
    assert seen["content"] == "" and seen["quality"] == describe(measure(_lr()))
    with pytest.raises(TypeError, match="unknown options"):
        pipe(_lr(), colour_fix="adain")
    with pytest.raises(TypeError, match="not per-call"):
        pipe(_lr(), weights="x")
    with pytest.raises(ValueError, match="color_fix"):
        pipe(_lr(), color_fix="sepia")
    with pytest.raises(ValueError, match="output_type"):
        pipe(_lr(), output_type="latents")


def test_callback_every_step_and_progress_bar(pipe, capsys):
    calls = []

    def record(p, i, t, kwargs):
        calls.append((i, int(t), kwargs["latents"].shape))
        return {}

    lr = _lr(4)
    pipe.set_progress_bar_config(desc="xpsr-steps")
    plain = pipe(lr, output_type="np", callback_on_step_end=record, **CALL).images
    assert [c[0] for c in calls] == list(range(STEPS)) and calls[0][2] == (1, 4, 8, 8)
    assert [c[1] for c in calls] == sorted((c[1] for c in calls), reverse=True)
    assert "xpsr-steps" in capsys.readouterr().err
    assert np.array_equal(plain, pipe(lr, output_type="np", **CALL).images)  # a callback returning {} changes nothing

    def zero_last(p, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0} if i == STEPS - 1 else {}

    assert not np.array_equal(plain, pipe(lr, output_type="np", callback_on_step_end=zero_last, **CALL).images)
    capsys.readouterr()
    pipe.set_progress_bar_config(desc="xpsr-steps", disable=True)
    pipe(lr, **CALL)
    assert "xpsr-steps" not in capsys.readouterr().err


def test_vae_tiling_switches_our_tiled_path_and_offload_needs_an_accelerator(pipe):
    lr = _lr(5)
    quality = "sharp"

    def direct(vae_tile):
        cfg = InferConfig(input="-", output_dir="-", vae_tile=vae_tile, **CALL)
        return super_resolve(pipe, lr, "", quality, cfg, torch.device("cpu"))

    try:
        pipe.enable_vae_tiling(32)
        tiled = np.asarray(pipe(lr, quality_prompt=quality, **CALL).images[0])
        pipe.disable_vae_tiling()
        whole = np.asarray(pipe(lr, quality_prompt=quality, **CALL).images[0])
    finally:
        pipe.enable_vae_tiling()
    assert np.array_equal(tiled, direct(32)) and np.array_equal(whole, direct(0))
    assert not pipe.vae.use_tiling  # diffusers' own VAE tiling stays off
    assert pipe.model_cpu_offload_seq == "text_encoder->unet->vae"
    with pytest.raises(RuntimeError, match="accelerator"):  # this CPU-only machine
        pipe.enable_model_cpu_offload()
    # the hooks themselves (here moving to the CPU, a no-op move): same bytes through them
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        assert len(pipe._all_hooks) == 4 and hasattr(pipe.vae, "_hf_hook")
        assert np.array_equal(np.asarray(pipe(lr, quality_prompt=quality, **CALL).images[0]), direct(512))
    finally:
        pipe.remove_all_hooks()


def test_diffusers_own_loader_with_the_custom_pipeline_file(exported, pipe, monkeypatch, tmp_path):
    import diffusers.utils.dynamic_modules_utils as dynamic
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # diffusers copies pipeline.py there
    with pytest.raises(AttributeError, match="XPSRPipeline"):  # diffusers looks the class up in diffusers only
        DiffusionPipeline.from_pretrained(exported)
    with pytest.raises(ValueError, match="trust_remote_code"):  # even for a local file, in diffusers 0.42
        DiffusionPipeline.from_pretrained(exported, custom_pipeline=str(exported))
    loaded = DiffusionPipeline.from_pretrained(exported, custom_pipeline=str(exported), trust_remote_code=True)
    assert type(loaded) is XPSRPipeline
    lr = _lr(6)
    assert np.array_equal(loaded(lr, output_type="np", **CALL).images, pipe(lr, output_type="np", **CALL).images)
    by_file = DiffusionPipeline.from_pretrained(exported, custom_pipeline=str(exported / "pipeline.py"),
                                                trust_remote_code=True)  # README's other spelling
    assert type(by_file) is XPSRPipeline


def _tampered(exported, tmp_path, part, edit):
    folder = tmp_path / "tampered"
    shutil.copytree(exported, folder)
    edit(folder / part)
    return folder


def _edit_weights(change):
    def edit(part):
        f = part / "diffusion_pytorch_model.safetensors"
        state = load_file(f)
        change(state)
        save_file(state, f)
    return edit


def test_tampered_folder_fails_with_a_readable_mismatch(exported, tmp_path, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dynamic
    from diffusers import DiffusionPipeline

    fusion = next(k for k in load_file(exported / "controlnet" / "diffusion_pytorch_model.safetensors")
                  if ".fusion_transformer." in k)
    missing = _tampered(exported, tmp_path / "a", "controlnet", _edit_weights(lambda s: s.pop(fusion)))
    with pytest.raises(CheckpointMismatchError, match="missing keys") as e:
        XPSRPipeline.from_pretrained(missing)
    assert fusion in str(e.value)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        DiffusionPipeline.from_pretrained(missing, custom_pipeline=str(missing), trust_remote_code=True)
    extra = _tampered(exported, tmp_path / "b", "unet",
                      _edit_weights(lambda s: s.update({"up_blocks.0.extra.weight": torch.zeros(2)})))
    with pytest.raises(CheckpointMismatchError, match="unexpected keys.*\n.*up_blocks.0.extra.weight"):
        XPSRPipeline.from_pretrained(extra)

    def content_only(part):
        config = json.loads((part / "config.json").read_text())
        config["xpsr"]["fusion_mode"] = "content_only"
        (part / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        XPSRPipeline.from_pretrained(_tampered(exported, tmp_path / "c", "controlnet", content_only))
    out = tmp_path / "sr"
    save_png_atomic(_lr(), tmp_path / "lr.png")
    assert main(["infer", f"input={tmp_path / 'lr.png'}", f"output_dir={out}", f"weights={missing}"]) == 1


def test_hub_ids_go_through_snapshot_download(exported, tmp_path):
    from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

    # how huggingface_hub caches a repo: refs/main -> a commit, snapshots/<commit>/ -> the files
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--xpsr-tiny"
    shutil.copytree(exported, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = XPSRPipeline.from_pretrained("someone/xpsr-tiny", cache_dir=str(tmp_path / "hub"))
    assert loaded.xpsr_config.fusion_mode == "sfa"
    with pytest.raises(FileNotFoundError, match="could not fetch 'someone/absent'"):
        XPSRPipeline.from_pretrained("someone/absent", cache_dir=str(tmp_path / "hub"))
    # why we download first: diffusers' own download step refuses component classes from outside diffusers
    index = json.loads((exported / "model_index.json").read_text())
    files = [str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file()]
    with pytest.raises(ValueError, match="xpsr.inference.diffusers_pipeline.py"):
        _get_custom_components_and_folders("someone/xpsr-tiny", index, files)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_from_a_run_writes_a_model_card_that_says_how_to_reproduce_it(run_dir, exported, tmp_path):
    files = {p.name for p in exported.iterdir()}
    assert {"model_index.json", "unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler",
            "README.md", "pipeline.py", "xpsr_train_config.yaml"} <= files
    card = (exported / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "example/sd-base"
    assert meta["pipeline_tag"] == "image-to-image" and "super-resolution" in meta["tags"]
    pairs = json.loads(json.dumps(yaml.safe_load((exported / "xpsr_train_config.yaml").read_text())))["data"]["pairs"]
    assert f"`{pairs[0]}`: 3 LR/HR pairs" in card and "steps: 2 of 2" in card
    assert "xpsr train --config xpsr_train_config.yaml output_dir=runs/reproduce" in card
    assert "xpsr export weights=runs/reproduce output=OUT" in card
    # the usage snippet names the folder relatively, never this machine's absolute path (issue 15)
    assert 'XPSRPipeline.from_pretrained("./xpsr-tiny")' in card and str(exported) not in card
    # the stored training config is a valid `xpsr train` config, so the command above runs
    cfg = load_config(TrainConfig, exported / "xpsr_train_config.yaml", ["output_dir=elsewhere"])
    assert cfg.max_steps == 2 and cfg.data.pairs == pairs
    # a checkpoint folder: the step comes from its state
    out = tmp_path / "step1"
    assert main(["export", f"weights={run_dir[0] / 'checkpoints' / 'step-1'}", f"output={out}"]) == 0
    card = (out / "README.md").read_text()
    assert "steps: 1 of 2" in card and "base_model" not in _front_matter(card)
    # a run that did not finish points at its checkpoints
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "step-1").mkdir(parents=True)
    assert main(["export", f"weights={unfinished}", f"output={tmp_path / 'none'}"]) == 1


def test_export_refuses_to_overwrite_and_pushing_offline_keeps_the_folder(run_dir, exported, tmp_path, capsys):
    assert main(["export", f"weights={run_dir[0]}", f"output={exported}"]) == 1
    assert "already has files" in capsys.readouterr().err
    out = tmp_path / "pushed"
    assert main(["export", f"weights={run_dir[0]}", f"output={out}", "push_to_hub=someone/xpsr-tiny"]) == 1
    err = capsys.readouterr().err
    assert "could not push" in err and f"hf upload someone/xpsr-tiny {out}" in err
    assert 'XPSRPipeline.from_pretrained("someone/xpsr-tiny")' in (out / "README.md").read_text()
    assert XPSRPipeline.from_pretrained(out).xpsr_config == run_dir[1].config


def _official_base(folder):
    """A base-model folder that fits the official golden weights (16-wide text encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from xpsr.models.tiny import build_tiny_base

    parts = build_tiny_base()
    tok = parts["tokenizer"]
    torch.manual_seed(0)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    return folder


def test_export_from_the_official_format(tmp_path, capsys):
    from xpsr.models.official import load_official

    assert main(["export", f"weights={GOLDEN}", f"output={tmp_path / 'bad'}"]) == 1  # model.base=tiny: 32 wide
    assert "text encoder is 32 wide" in capsys.readouterr().err
    base = _official_base(tmp_path / "base")
    out = tmp_path / "official"
    assert main(["export", f"weights={GOLDEN}", f"output={out}", f"model.base={base}",
                 "base_model=stable-diffusion-v1-5/stable-diffusion-v1-5", "license=other"]) == 0
    pipe = XPSRPipeline.from_pretrained(out)
    unet, controlnet, _ = load_official(GOLDEN)
    for ours, theirs in ((pipe.unet, unet), (pipe.controlnet, controlnet)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pipe(_lr(), output_type="np", **CALL).images.shape == (1, 64, 64, 3)
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "other" and meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "official XPSR release" in card and f"xpsr export weights={GOLDEN} output=OUT model.base={base}" in card
    assert not (out / "xpsr_train_config.yaml").exists()
