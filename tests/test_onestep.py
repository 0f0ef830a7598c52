"""One-step XPSR (xpsr.onestep): adapters, loss terms, formulas, the teacher cache."""
from __future__ import annotations

import pytest
import torch
from conftest import DATA
from onestep_helpers import batch, build, only

from xpsr.onestep.lora import FAKE, STUDENT, adapter_parameters, lora_module_names, set_active
from xpsr.onestep.objective import add_noise, diffusion_target, predicted_x0, vsd_surrogate

PINNED = DATA / "onestep_tiny_lora_keys.txt"


def test_trainable_set_is_pinned_and_the_rest_frozen(tmp_path):
    cfg, modules, parts, trainable, groups = build(tmp_path)
    unet_keys = sorted(k for k in trainable if k.startswith("unet."))
    assert unet_keys == PINNED.read_text().split(), "LoRA key set changed; regenerate tests/data/" + PINNED.name
    assert all(".lora_A." in k or ".lora_B." in k for k in unet_keys)
    assert not any(".pixel_attentions." in k or "_transformer." in k for k in unet_keys)
    controlnet = {f"controlnet.{k}" for k, _ in modules.controlnet.named_parameters()}
    assert {k for k in trainable if k.startswith("controlnet.")} == controlnet
    mine = {id(p) for p in trainable.values()}
    for model in (modules.unet, modules.vae, modules.text_encoder, parts.teacher_controlnet):
        for name, p in model.named_parameters():
            assert p.requires_grad == (id(p) in mine), name
    # two optimizer groups: the student (learning_rate) and the fake score model (fake_learning_rate)
    assert [g["lr"] for g in groups] == [cfg.learning_rate, cfg.onestep.fake_learning_rate]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in adapter_parameters(modules.unet, FAKE).values()}


def test_lora_targets_only_the_configured_stock_modules(make_tiny):
    unet = make_tiny().unet
    names = lora_module_names(unet, ["to_q", "proj_out"])
    assert names and all(n.endswith((".to_q", ".proj_out")) for n in names)
    assert not any(".pixel_attentions." in n for n in names)
    with pytest.raises(ValueError, match="match no"):
        lora_module_names(unet, ["no_such_layer"])


def test_adapters_switch_between_student_fake_and_teacher(tmp_path):
    from conftest import run, tiny_inputs

    _, modules, _, _, _ = build(tmp_path)
    inputs = tiny_inputs(modules, batch=1)
    set_active(modules.unet, None)
    teacher = run(modules, inputs)[0]
    set_active(modules.unet, STUDENT)
    assert torch.equal(run(modules, inputs)[0], teacher)  # B starts at zero: the student starts as the teacher
    with torch.no_grad():
        for p in adapter_parameters(modules.unet, STUDENT).values():
            p.normal_(0, 0.05)
    student = run(modules, inputs)[0]
    set_active(modules.unet, FAKE)
    fake = run(modules, inputs)[0]
    set_active(modules.unet, None)
    assert torch.equal(run(modules, inputs)[0], teacher)
    assert not torch.allclose(student, teacher) and torch.equal(fake, teacher)


def _grads(modules, parts, trainable):
    student = adapter_parameters(modules.unet, STUDENT)
    fake = adapter_parameters(modules.unet, FAKE)
    control = {k: p for k, p in trainable.items() if k.startswith("controlnet.")}

    def norm(group):
        return sum(float(p.grad.abs().sum()) for p in group.values() if p.grad is not None)

    frozen = [p for m in (modules.vae, modules.text_encoder, parts.teacher_controlnet) for p in m.parameters()]
    frozen += [p for k, p in modules.unet.named_parameters() if f"unet.{k}" not in trainable]
    assert all(p.grad is None for p in frozen)
    return norm(student), norm(fake), norm(control)


@pytest.mark.parametrize("term", ["regression", "distill", "dfc", "vsd", "lpips"])
def test_one_training_step_of_each_term_reaches_only_its_parameters(tmp_path, term, monkeypatch):
    import xpsr.onestep.train as train

    if term == "lpips":  # random LPIPS weights (ENVIRONMENT.md): the term's wiring, not its values
        import pyiqa

        monkeypatch.setattr(train, "make_lpips", lambda ocfg, device: pyiqa.create_metric(
            "lpips", net="squeeze", pretrained=False, pnet_rand=True, as_loss=True, device="cpu"))
    overrides = only(term) + (["onestep.vsd_weight=0.5"] if term == "vsd" else [])
    cfg, modules, parts, trainable, _ = build(tmp_path, *overrides)
    with torch.no_grad():  # a student that differs from the teacher, so every term has a gradient
        for p in adapter_parameters(modules.unet, STUDENT).values():
            p.normal_(0, 0.02)
    out = train.onestep_step(parts, modules, batch(), "caption", torch.Generator().manual_seed(0))
    expected = {"regression": "regression", "distill": "distill", "dfc": "dfc_pixel", "vsd": "vsd", "lpips": "lpips"}
    assert expected[term] in out.terms and torch.isfinite(out.loss)
    out.loss.backward()
    student, fake, control = _grads(modules, parts, trainable)
    assert control > 0
    assert (student > 0) == (term != "dfc")  # the DFC heads read the ControlNet only
    assert (fake > 0) == (term == "vsd")  # the fake score model learns only from its own diffusion loss


def test_vsd_and_fake_losses_reach_disjoint_parameters(tmp_path):
    from xpsr.onestep.train import vsd_terms

    _, modules, parts, trainable, _ = build(tmp_path, *only("vsd"))
    with torch.no_grad():
        for p in adapter_parameters(modules.unet, STUDENT).values():
            p.normal_(0, 0.02)
    z_sr = torch.randn(2, 4, 8, 8, requires_grad=True)
    b = batch()
    c = torch.randn(2, 77, modules.unet.config.cross_attention_dim)  # the tokenizer pads to 77
    q = torch.randn(2, 77, modules.unet.config.cross_attention_dim)
    vsd, fake = vsd_terms(parts, modules, z_sr, b["lr_cond"], c, q, torch.Generator().manual_seed(0), torch.float32)
    vsd.backward()
    assert z_sr.grad is not None and _grads(modules, parts, trainable)[1] == 0
    fake.backward()
    assert _grads(modules, parts, trainable)[1] > 0


def test_vsd_surrogate_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    real, fake = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    vsd_surrogate(z, real, fake).backward()
    for i in range(2):  # by hand: d/dz = (fake - real) / mean|z - real| / numel
        w = (z[i].detach() - real[i]).abs().mean()
        torch.testing.assert_close(z.grad[i], (fake[i] - real[i]) / w / z.numel())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_forward_process(prediction):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = add_noise(x0, noise, t, sched)
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)  # by hand
    target = diffusion_target(x0, noise, t, sched)
    torch.testing.assert_close(predicted_x0(target, x_t, t, sched), x0, atol=2e-4, rtol=1e-4)
    if prediction == "epsilon":  # the one-step formula as README writes it
        torch.testing.assert_close(predicted_x0(noise, x_t, t, sched), (x_t - (1 - ab).sqrt() * noise) / ab.sqrt())


def test_lpips_term_without_weights_says_what_is_missing(tmp_path):
    from xpsr.config import OneStepConfig
    from xpsr.metrics.weights import MissingMetricWeights
    from xpsr.onestep.train import make_lpips

    with pytest.raises(MissingMetricWeights, match="lpips"):
        make_lpips(OneStepConfig(lpips_weight=1.0, weights_dir=str(tmp_path)), torch.device("cpu"))


def test_all_terms_off_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="every loss weight is 0"):
        build(tmp_path, *[f"onestep.{t}_weight=0" for t in ("regression", "lpips", "dfc", "distill", "vsd")])


def test_validation_of_a_onestep_run_samples_in_one_step(tmp_path):
    from onestep_helpers import onestep_config

    from xpsr.training.validation import validation_infer_config

    cfg = onestep_config(tmp_path, "onestep.timestep=900")
    infer = validation_infer_config(cfg, scale=4)
    assert (infer.mode, infer.onestep_timestep, infer.lr_latent) == ("onestep", 900, cfg.onestep.lr_latent)


def test_a_teacher_checkpoint_decides_the_model_and_the_saved_config(tmp_path):
    """The run's config (saved with every checkpoint, read by `xpsr infer`) names the teacher's model settings."""
    from conftest import tiny_config
    from onestep_helpers import onestep_config

    from xpsr.config import to_dict
    from xpsr.models.build import build_xpsr
    from xpsr.models.checkpoint import save_trained
    from xpsr.onestep.train import build_teacher

    other = tiny_config(conditioning_channels=[16, 32, 96, 256])
    teacher = build_xpsr(other)
    path = save_trained(tmp_path / "teacher.safetensors", teacher.unet, teacher.controlnet, {"model": to_dict(other)})
    cfg = onestep_config(tmp_path, f"onestep.teacher={path}")
    modules = build_teacher(cfg)
    assert cfg.model.conditioning_channels == [16, 32, 96, 256]
    assert torch.equal(modules.controlnet.controlnet_cond_embedding.conv_in.weight,
                       teacher.controlnet.controlnet_cond_embedding.conv_in.weight)


def test_the_peft_adapter_folder_loads_back_into_a_fresh_unet(make_tiny, tmp_path):
    """`final/student_lora` (peft's layout) is usable on its own: loaded into a fresh UNet it holds the same
    LoRA weights and gives the same UNet output; a folder that is not an adapter is named."""
    from xpsr.config import OneStepConfig
    from xpsr.onestep.lora import attach_adapter, load_adapter, save_adapter

    cfg = OneStepConfig()
    trained, fresh = make_tiny().unet, make_tiny().unet
    attach_adapter(trained, STUDENT, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=1)
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for p in adapter_parameters(trained, STUDENT).values():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    save_adapter(trained, tmp_path / "student_lora")
    load_adapter(fresh, tmp_path / "student_lora")
    a, b = adapter_parameters(trained, STUDENT), adapter_parameters(fresh, STUDENT)
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(trained(sample, 10, text).sample, fresh(sample, 10, text).sample)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(fresh, tmp_path)
