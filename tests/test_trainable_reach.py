"""Every recipe's trainable parameters get a gradient in every step (what DDP needs: no unused parameters)."""
import pytest
import torch
from conftest import REPO

from xpsr.config import DFCConfig, TrainConfig, load_config
from xpsr.models.build import build_xpsr, trainable_parameters
from xpsr.training import loop
from xpsr.training.trainable import paper_head_indices, unreachable_heads

RECIPES = sorted(p.name for p in (REPO / "configs" / "train").glob("*.yaml"))
# tiny shapes for every recipe; the one-step ones also get the tiny teacher sampler and no LPIPS weights
TINY = ["model.base=tiny", "model.conditioning_channels=[8,16,16,32]", "data.crop_size=64", "batch_size=2",
        "gradient_accumulation_steps=1", "device=cpu", "mixed_precision=fp32", "frozen_unet_dtype=fp32",
        "num_workers=0", "report_to=none", "validation.every=0", "checkpoint_every=0", "max_steps=1",
        "use_8bit_adam=false", "demo_data=false",
        "data.latent_cache=null"]  # the 12 GB recipe reads cached HR latents; tests/test_memory.py covers them
ONESTEP = ["onestep.teacher=null", "onestep.lpips_weight=0",
           f"onestep.teacher_infer_config={REPO / 'configs' / 'infer' / 'onestep_tiny_teacher.yaml'}"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from xpsr.training.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), crop_size=64)


def tiny_recipe(name: str, demo, out, *extra) -> TrainConfig:
    text = (REPO / "configs" / "train" / name).read_text()
    overrides = TINY + [f"output_dir={out}", f"data.pairs=[{demo.pairs[0]}]", f"data.cache={demo.cache}"]
    if "onestep" in text:
        overrides += ONESTEP
    return load_config(TrainConfig, REPO / "configs" / "train" / name, overrides + list(extra))


def one_step_grads(cfg: TrainConfig) -> dict[str, torch.Tensor | None]:
    """Run the loop's own set-up and one micro-step; the gradients as the optimizer saw them."""
    accelerator, out = loop.setup_accelerator(cfg)
    s = loop.build_session(cfg, accelerator, out)
    loop.make_data(s)
    loop.prepare_for_training(s)
    seen = {}
    step = s.optimizer.step

    def capture(*args, **kwargs):
        seen.update({k: None if p.grad is None else p.grad.clone() for k, p in s.trainable.items()})
        return step(*args, **kwargs)

    s.optimizer.step = capture
    loop.micro_step(s, next(iter(s.loader)))
    accelerator.end_training()
    return seen


@pytest.mark.parametrize("name", RECIPES)
def test_every_trainable_parameter_of_every_recipe_gets_a_gradient(demo, tmp_path, name):
    grads = one_step_grads(tiny_recipe(name, demo, tmp_path / "run"))
    assert grads, "no trainable parameters"
    missing = sorted(k for k, g in grads.items() if g is None)
    assert not missing, f"{name}: {len(missing)} trainable parameters get no gradient, e.g. {missing[:5]}"


def test_switched_off_heads_are_frozen_and_kept_in_the_weights(demo, tmp_path):
    cfg = tiny_recipe("ablation_no_dfc.yaml", demo, tmp_path / "run")
    accelerator, out = loop.setup_accelerator(cfg)
    s = loop.build_session(cfg, accelerator, out)
    every = trainable_parameters(s.modules.unet, s.modules.controlnet)
    off = set(every) - set(s.trainable)
    assert off and all("to_rgbs" in k or "dfc_latent_head" in k for k in off)
    assert all(not every[k].requires_grad for k in off)
    in_optimizer = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert not any(id(every[k]) in in_optimizer for k in off)


def test_paper_scales_rule_from_the_config_matches_the_step_rule():
    from conftest import tiny_config, tiny_inputs

    from xpsr.training.step import paper_latent_indices

    modules = build_xpsr(tiny_config())
    x = tiny_inputs(modules, batch=1)
    out = modules.controlnet(x["noisy_latents"], x["timesteps"], x["content_embeds"], x["lr_cond"],
                             quality_embeds=x["quality_embeds"])
    assert paper_head_indices(modules.controlnet.config) == paper_latent_indices(out.latent_preds)
    names = unreachable_heads(modules.controlnet, DFCConfig(latent_scales="paper"))
    used = set(paper_head_indices(modules.controlnet.config))
    assert names and not any(f"dfc_latent_heads.{i}." in n for n in names for i in used)
