"""XPSRPipeline follows diffusers' conventions: the standard __call__ arguments (or a listed reason why not),
callbacks, and parts that save and load alone (issue 15, section 3)."""
import inspect
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, randomize_zero_inits, tiny_config
from PIL import Image

from xpsr.config import InferConfig
from xpsr.inference import pipeline_args
from xpsr.inference.diffusers_pipeline import XPSRControlNetLoader, XPSRPipeline, XPSRUNetLoader
from xpsr.inference.pipeline import content_prompt_used
from xpsr.models.build import build_xpsr
from xpsr.models.text import encode_prompts

CALL = {"num_inference_steps": 2, "process_size": 32, "output_type": "np"}  # 8 px in, 32 px out
LATENT = (1, 4, 4, 4)


def _lr(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe():
    modules = build_xpsr(tiny_config())
    randomize_zero_inits(modules.controlnet, modules.unet, seed=3)
    return XPSRPipeline.from_modules(modules)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "xpsr-tiny"
    pipe.save_pretrained(folder)
    return folder


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_standard_argument_is_supported_or_listed_with_its_reason(pipe):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionUpscalePipeline

    ours = inspect.signature(XPSRPipeline.__call__).parameters
    for theirs in (StableDiffusionControlNetPipeline, StableDiffusionUpscalePipeline):
        for name, p in inspect.signature(theirs.__call__).parameters.items():
            if name == "self" or p.kind is p.VAR_KEYWORD:
                continue
            assert name in ours or name in pipeline_args.CONVENTIONS, f"{theirs.__name__}.{name} is not in the table"
    for name, (status, reason) in pipeline_args.CONVENTIONS.items():
        assert reason, name
        if status == pipeline_args.SUPPORTED:
            assert name in ours, name
        elif status == pipeline_args.REFUSED:
            assert name not in ours, name
            with pytest.raises(TypeError, match=f"does not take {name}=: {re.escape(reason)}$"):
                pipe(_lr(), **{name: 1}, **CALL)
    # the docs show the same table
    docs = "\n".join(p.read_text() for p in (REPO / "docs").rglob("*.md"))
    assert pipeline_args.convention_table() in docs


def test_image_and_prompt_by_keyword_in_any_order_and_mixups_named(pipe, tmp_path):
    lr = _lr()
    plain = pipe(lr, **CALL).images
    assert np.array_equal(pipe(prompt="", image=lr, **CALL).images, plain)
    Image.fromarray(lr).save(tmp_path / "lr.png")
    assert np.array_equal(pipe(str(tmp_path / "lr.png"), **CALL).images, plain)  # an existing file is an image
    with pytest.raises(ValueError, match="pass text as prompt="):
        pipe("a cat on a sofa", **CALL)
    with pytest.raises(ValueError, match="pass text as prompt="):  # diffusers' (prompt, image) order
        pipe("a cat on a sofa", Image.fromarray(lr), **CALL)
    with pytest.raises(TypeError, match=r"takes \(image, prompt\)"):
        pipe(image=lr, prompt=Image.fromarray(lr), **CALL)


def test_num_images_per_prompt_and_generators(pipe):
    lr, lr2 = _lr(1), _lr(2)
    single = pipe(lr, **CALL).images
    copies = pipe(lr, num_images_per_prompt=2, **CALL).images
    assert copies.shape == (2, 32, 32, 3)
    assert np.array_equal(copies[:1], single) and not np.array_equal(copies[1], copies[0])
    # one generator per output == the outputs one by one; diffusers' order: image 0's copies, then image 1's
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8)]
    batch = pipe([lr, lr2], num_images_per_prompt=2, generator=gens, **CALL).images
    alone = pipe(lr2, generator=torch.Generator().manual_seed(7), **CALL).images
    assert np.array_equal(batch[2], alone[0])
    with pytest.raises(ValueError, match="3 entries for 2 images x 2 copies"):
        pipe([lr, lr2], num_images_per_prompt=2, generator=gens[:3], **CALL)


def test_latents_replace_the_drawn_start(pipe):
    lr = _lr(3)
    options = dict(start_from="noise", scheduler="ddim", **CALL)  # DDIM: nothing else is drawn
    drawn = pipe(lr, generator=torch.Generator().manual_seed(5), **options).images
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    assert np.array_equal(pipe(lr, latents=noise, **options).images, drawn)
    assert not np.array_equal(pipe(lr, latents=noise * 0, **options).images, drawn)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 4, 4\)"):
        pipe(lr, latents=torch.zeros(1, 4, 8, 8), **options)


def test_prompt_embeds_stand_for_the_content_and_quality_prompts(pipe):
    lr, lr2 = _lr(4), _lr(5)
    cfg_neg = InferConfig(input="-", output_dir="-")

    def embed(negative, text):  # as the pipeline batches them: [negative, text] in one pass
        return encode_prompts(pipe.tokenizer, pipe.text_encoder, [negative, text])[1:]

    by_text = pipe(lr, prompt="a cat", quality_prompt="sharp", **CALL).images
    content = content_prompt_used("a cat", cfg_neg)  # embeddings are used as given: the added prompt is in them
    by_embeds = pipe(lr, prompt_embeds=embed(cfg_neg.negative_prompt, content),
                     quality_prompt_embeds=embed(cfg_neg.negative_quality_prompt, "sharp"), **CALL).images
    assert np.array_equal(by_embeds, by_text)
    negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["ugly", "a cat"])[:1]
    assert np.array_equal(pipe(lr, prompt="a cat", quality_prompt="sharp", negative_prompt_embeds=negative,
                               **CALL).images,
                          pipe(lr, prompt="a cat", quality_prompt="sharp", negative_prompt="ugly", **CALL).images)
    with pytest.raises(ValueError, match="pass prompt or prompt_embeds, not both"):
        pipe(lr, prompt="a cat", prompt_embeds=embed("", "a cat"), **CALL)
    # negative_prompt as a list: one per image (was: Cannot convert 'ListConfig' to string)
    both = pipe([lr, lr2], negative_prompt=["ugly", "blurry"], **CALL).images
    assert np.array_equal(both[1:], pipe(lr2, negative_prompt="blurry", **CALL).images)
    assert not np.array_equal(both[1:], pipe(lr2, **CALL).images)


def test_output_type_latent_is_the_final_latents(pipe):
    lr = _lr(6)
    latents = pipe(lr, **{**CALL, "output_type": "latent"}, color_fix="none").images
    assert latents.shape == LATENT
    image = ((pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    expected = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal((pipe(lr, color_fix="none", **CALL).images[0] * 255).round().astype(np.uint8), expected)


def test_scheduler_arguments_where_the_scheduler_takes_them(pipe):
    lr = _lr(7)
    steps = {k: v for k, v in CALL.items() if k != "num_inference_steps"}
    plain = pipe(lr, **CALL).images
    pipe.scheduler.set_timesteps(2)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert np.array_equal(pipe(lr, timesteps=timesteps, **steps).images, plain)  # ddpm takes timesteps
    assert not np.array_equal(pipe(lr, timesteps=[999, 500], **steps).images, plain)
    with pytest.raises(ValueError, match="not both"):
        pipe(lr, timesteps=timesteps, **CALL)
    with pytest.raises(ValueError, match="scheduler 'ddim' takes no custom timesteps; these do: ddpm, dpmsolver"):
        pipe(lr, timesteps=timesteps, scheduler="ddim", **steps)
    with pytest.raises(ValueError, match="sigmas only with use_flow_sigmas=True"):  # unipc's, for flow models
        pipe(lr, sigmas=[14.0, 2.0, 0.5], scheduler="unipc", **steps)
    with pytest.raises(ValueError, match="'ddpm' takes no custom sigmas; these do: unipc"):
        pipe(lr, sigmas=[14.0, 2.0], **steps)
    # eta: DDIM's; eta=1 draws from the generator, so it is reproducible
    ddim = pipe(lr, scheduler="ddim", **CALL).images
    assert np.array_equal(pipe(lr, scheduler="ddim", eta=0.0, **CALL).images, ddim)
    noisy = pipe(lr, scheduler="ddim", eta=1.0, **CALL).images
    assert not np.array_equal(noisy, ddim) and np.array_equal(pipe(lr, scheduler="ddim", eta=1.0, **CALL).images, noisy)
    with pytest.raises(ValueError, match="eta is a DDIM setting"):
        pipe(lr, eta=0.5, **CALL)


def test_controlnet_conditioning_scale_is_conditioning_scale(pipe):
    lr = _lr(8)
    half = pipe(lr, conditioning_scale=0.5, **CALL).images
    assert np.array_equal(pipe(lr, controlnet_conditioning_scale=0.5, **CALL).images, half)
    assert not np.array_equal(pipe(lr, **CALL).images, half)
    with pytest.raises(ValueError, match="same setting"):
        pipe(lr, controlnet_conditioning_scale=0.5, conditioning_scale=0.7, **CALL)
    with pytest.raises(ValueError, match="one ControlNet"):
        pipe(lr, controlnet_conditioning_scale=[0.5, 0.5], **CALL)


def test_cross_attention_kwargs_reach_every_attention_processor(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = []

    class Recording(AttnProcessor2_0):  # diffusers passes a processor the keywords its __call__ names
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, tag=None):
            seen.append(tag)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    before = {name: dict(getattr(pipe, name).attn_processors) for name in ("unet", "controlnet")}
    n_processors = sum(len(v) for v in before.values())  # (set_attn_processor empties the dict it restores)
    try:
        for name in before:
            getattr(pipe, name).set_attn_processor(Recording())
        plain = pipe(_lr(9), **CALL).images
        assert set(seen) == {None}
        seen.clear()
        tagged = pipe(_lr(9), cross_attention_kwargs={"tag": "x"}, **CALL).images
    finally:
        for name, processors in before.items():
            getattr(pipe, name).set_attn_processor(processors)
    # all of them: the ControlNet's SFA branches and the UNet's pixel attentions too
    assert len(seen) == CALL["num_inference_steps"] * n_processors  # each one, once per step
    assert set(seen) == {"x"} and np.array_equal(tagged, plain)
    assert pipe.cross_attention_kwargs is None  # only for that call


def test_clip_skip_skips_text_encoder_layers_for_both_prompts(pipe):
    lr = _lr(10)
    plain = pipe(lr, prompt="a cat", **CALL).images
    assert np.array_equal(pipe(lr, prompt="a cat", clip_skip=0, **CALL).images, plain)
    skipped = pipe(lr, prompt="a cat", clip_skip=1, **CALL).images
    assert not np.array_equal(skipped, plain)
    with pytest.raises(ValueError, match="clip_skip=2: the text encoder has 2 layers"):
        pipe(lr, clip_skip=2, **CALL)


def test_diffusers_cfg_cutoff_callback_and_step_state(pipe):
    from diffusers.callbacks import SDCFGCutoffCallback

    lr, three = _lr(11), {**CALL, "num_inference_steps": 3}
    plain = pipe(lr, **three).images
    cut = SDCFGCutoffCallback(cutoff_step_ratio=0.5)  # after step int(3 * 0.5) = 1: no CFG
    seen = []

    def watch(p, i, t, kwargs):
        kwargs = cut(p, i, t, kwargs)
        seen.append((i, p.num_timesteps, kwargs["prompt_embeds"].shape[0], kwargs["quality_prompt_embeds"].shape[0]))
        return kwargs

    watched = pipe(lr, callback_on_step_end=watch,
                   callback_on_step_end_tensor_inputs=["prompt_embeds", "quality_prompt_embeds"], **three).images
    assert seen == [(0, 3, 2, 2), (1, 3, 1, 2), (2, 3, 1, 1)]  # quality embeddings cut with the guidance
    direct = pipe(lr, callback_on_step_end=cut, **three).images
    assert np.array_equal(direct, watched) and not np.array_equal(direct, plain)
    last = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2)  # after the last step: no effect
    assert np.array_equal(pipe(lr, callback_on_step_end=last, **three).images, plain)
    with pytest.raises(ValueError, match="callback tensor inputs must be among"):
        pipe(lr, callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["add_text_embeds"], **CALL)
    with pytest.raises(ValueError, match=r"returned \['noise'\]"):
        pipe(lr, callback_on_step_end=lambda p, i, t, kw: {"noise": 0}, **CALL)


def test_interrupt_skips_the_remaining_steps(pipe):
    lr, three = _lr(12), {**CALL, "num_inference_steps": 3, "output_type": "latent"}
    after = []

    def record(p, i, t, kwargs):
        after.append(kwargs["latents"])
        return {}

    def stop(p, i, t, kwargs):
        after.append(i)
        p._interrupt = True
        return {}

    pipe(lr, callback_on_step_end=record, **three)
    stopped = pipe(lr, callback_on_step_end=stop, **three).images
    assert after[3:] == [0] and pipe.interrupt and torch.equal(stopped, after[0])
    pipe(lr, **CALL)
    assert not pipe.interrupt  # every call starts uninterrupted


def test_onestep_calls_the_callback_once_and_names_what_it_ignores(pipe, recwarn):
    lr, calls = _lr(13), []

    def record(p, i, t, kwargs):
        calls.append((i, int(t), p.num_timesteps))
        return {"latents": kwargs["latents"] * 0}

    with pytest.warns(UserWarning, match="ignored: num_inference_steps, guidance_scale$"):
        zeroed = pipe(lr, mode="onestep", onestep_timestep=500, callback_on_step_end=record, guidance_scale=3.0,
                      **CALL).images
    assert calls == [(0, 500, 1)]
    assert not np.array_equal(zeroed, pipe(lr, mode="onestep", onestep_timestep=500, process_size=32,
                                           output_type="np").images)
    assert not [w for w in recwarn if "onestep" in str(w.message)]  # without them: no warning


def test_parts_save_and_load_alone(pipe, saved, tmp_path):
    pipe.unet.save_pretrained(tmp_path / "unet")  # diffusers' own save of the part (was: no 'xpsr' section)
    assert _same_weights(XPSRUNetLoader.from_pretrained(tmp_path / "unet"), pipe.unet)
    pipe.controlnet.save_pretrained(tmp_path / "controlnet")
    controlnet = XPSRControlNetLoader.from_pretrained(tmp_path / "controlnet")
    assert _same_weights(controlnet, pipe.controlnet) and controlnet.xpsr_config == pipe.xpsr_config
    from_subfolder = XPSRControlNetLoader.from_pretrained(saved, subfolder="controlnet")
    assert _same_weights(from_subfolder, pipe.controlnet)
    swapped = XPSRPipeline.from_pretrained(saved, controlnet=controlnet)
    assert swapped.controlnet is controlnet
    again = XPSRPipeline.from_pipe(pipe)  # was: the UNet/ControlNet not taken over (annotations)
    assert again.unet is pipe.unet and again.controlnet is pipe.controlnet
    assert np.array_equal(again(_lr(14), **CALL).images, pipe(_lr(14), **CALL).images)
    with pytest.raises(ValueError, match="loads whole onto one device"):
        XPSRUNetLoader.from_pretrained(saved, subfolder="unet", device_map="auto")
    with pytest.raises(ValueError, match="use_safetensors=False is not supported"):
        XPSRUNetLoader.from_pretrained(saved, subfolder="unet", use_safetensors=False)


def test_device_map_as_diffusers_defines_it_for_pipelines(saved, pipe, monkeypatch):
    import xpsr.inference.pipeline_parts as parts

    on_cpu = XPSRPipeline.from_pretrained(saved, device_map="cpu")
    assert on_cpu.hf_device_map == "cpu" and on_cpu.unet.device.type == "cpu"
    balanced = XPSRPipeline.from_pretrained(saved, device_map="balanced")  # no accelerator: all on the CPU
    assert _same_weights(balanced.controlnet, pipe.controlnet) and balanced.hf_device_map is None
    monkeypatch.setattr(parts, "accelerator_count", lambda: 2)
    with pytest.raises(ValueError, match="spread the parts over 2 accelerators"):
        XPSRPipeline.from_pretrained(saved, device_map="balanced")
    with pytest.raises(NotImplementedError, match="auto not supported"):  # diffusers' own check
        XPSRPipeline.from_pretrained(saved, device_map="auto")


def test_save_pretrained_variants_shards_and_safetensors_only(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "v", variant="fp16", max_shard_size="300KB")
    files = {str(p.relative_to(tmp_path / "v")) for p in (tmp_path / "v").rglob("*.safetensors*")}
    for part in ("unet", "controlnet", "vae"):  # diffusers' names for a sharded variant
        assert f"{part}/diffusion_pytorch_model.safetensors.index.fp16.json" in files
        assert f"{part}/diffusion_pytorch_model.fp16-00001-of-00002.safetensors" in files or any(
            f.startswith(f"{part}/diffusion_pytorch_model.fp16-00002-of-") for f in files)
    assert all(".fp16" in f for f in files), files
    loaded = XPSRPipeline.from_pretrained(tmp_path / "v", variant="fp16")
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        assert _same_weights(getattr(loaded, name), getattr(pipe, name)), name
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "pickle", safe_serialization=False)


def test_enable_vae_slicing_changes_nothing(pipe):
    lr = _lr(15)
    plain = pipe([lr, lr], **CALL).images
    pipe.enable_vae_slicing()
    try:
        assert pipe.vae.use_slicing and np.array_equal(pipe([lr, lr], **CALL).images, plain)
    finally:
        pipe.disable_vae_slicing()


def _record_uploads(monkeypatch):
    import huggingface_hub

    uploads = []

    def upload_folder(repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploads.append((repo_id, {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()},
                        (folder / "README.md").read_text()))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: repo_id)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return uploads


def test_push_to_hub_uploads_the_model_card_naming_the_hub_id(pipe, saved, tmp_path, monkeypatch):
    card = (saved / "README.md").read_text()  # a plain save_pretrained writes a card too
    assert 'XPSRPipeline.from_pretrained("./xpsr-tiny")' in card and str(saved.parent) not in card
    uploads = _record_uploads(monkeypatch)
    pipe.push_to_hub("someone/xpsr-tiny")
    pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/other")
    assert [u[0] for u in uploads] == ["someone/xpsr-tiny", "someone/other"]
    for repo_id, files, readme in uploads:
        assert {"README.md", "model_index.json", "unet/config.json", "pipeline.py"} <= files
        assert f'XPSRPipeline.from_pretrained("{repo_id}")' in readme and tempfile.gettempdir() not in readme
