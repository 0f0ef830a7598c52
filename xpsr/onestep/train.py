"""Training the one-step student inside the XPSR training loop (xpsr/training/loop.py).

The loop calls :func:`build_onestep` when ``onestep.enabled`` (the model, the frozen teacher parts, the
trainable set in two optimizer groups) and :func:`onestep_step` instead of the multi-step step. Checkpoints,
resume, EMA, logging and accelerate are the loop's own. The student's and the fake score model's losses are
summed into one backward: their gradients reach disjoint parameters (each is computed from the other's
detached output), so one AdamW step with two parameter groups is the alternating update with two optimizers.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from xpsr.config import InferConfig, OneStepConfig, TrainConfig, load_config
from xpsr.inference.trained_settings import TrainedSettings, mark_student, resolve_settings
from xpsr.models.build import XPSRModules, build_xpsr
from xpsr.models.dfc import dfc_loss
from xpsr.models.forward import predict_noise, unwrap
from xpsr.models.text import encode_prompts
from xpsr.onestep.lora import FAKE, STUDENT, active, adapter_parameters, attach_onestep, set_active
from xpsr.onestep.objective import (
    add_noise,
    diffusion_target,
    latent_mse,
    predicted_x0,
    vsd_surrogate,
)
from xpsr.onestep.teacher_cache import TeacherCache, sampler_settings, teacher_hash
from xpsr.training.step import StepOutput


@dataclasses.dataclass
class OneStepParts:
    """What the one-step step needs beyond the modules."""

    cfg: OneStepConfig
    teacher_controlnet: torch.nn.Module  # frozen at the teacher's weights (the student's own when frozen)
    teacher_infer: InferConfig
    cache: TeacherCache
    negative: tuple[torch.Tensor, torch.Tensor] | None = None  # (content, quality) negative embeddings for VSD
    lpips: Any = None


def teacher_infer_config(ocfg: OneStepConfig) -> InferConfig:
    cfg = load_config(InferConfig, ocfg.teacher_infer_config, ["input=teacher", "output_dir=teacher"])
    # the teacher is the multi-step model: unset settings resolve as for any multi-step weights
    return resolve_settings(dataclasses.replace(cfg, mode="multistep"), TrainedSettings())


def build_teacher(cfg: TrainConfig) -> XPSRModules:
    """The XPSR model with the teacher's weights (``onestep.teacher``; its stored model settings are used)."""
    ocfg = cfg.onestep
    if ocfg.teacher is None:
        return build_xpsr(dataclasses.replace(cfg.model, seed=cfg.seed))
    from xpsr.inference.run import _model_config_from
    from xpsr.models.checkpoint import load_trained, read_config

    path = Path(ocfg.teacher)
    if path.is_dir():
        path = path / "final" / "trained.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"onestep.teacher={ocfg.teacher}: no trained weights at {path}")
    cfg.model = _model_config_from(read_config(path), cfg.model)  # the run's saved config says what was built
    modules = build_xpsr(dataclasses.replace(cfg.model, seed=cfg.seed))
    load_trained(path, modules.unet, modules.controlnet)
    return modules


def make_lpips(ocfg: OneStepConfig, device):
    """pyiqa's LPIPS as a loss, its weights from ``weights_dir`` only (one-line error naming the extra or file)."""
    from xpsr.config import EvalConfig
    from xpsr.metrics.evaluate import import_pyiqa
    from xpsr.metrics.weights import MissingMetricWeights, offline_weights, weights_dir

    pyiqa = import_pyiqa("lpips")
    folder = weights_dir(EvalConfig(sr="-", output_dir="-", weights_dir=ocfg.weights_dir).weights_dir)
    try:
        with offline_weights("lpips", folder):
            metric = pyiqa.create_metric("lpips", device=device, as_loss=True)
    except OSError as e:
        if isinstance(e, MissingMetricWeights):
            raise
        raise MissingMetricWeights("lpips", str(e).splitlines()[0], folder) from e
    return metric.requires_grad_(False)


def build_onestep(cfg: TrainConfig, modules: XPSRModules, out: Path, device) -> tuple[OneStepParts, dict, list]:
    """Attach the adapters to ``modules`` (teacher weights, already placed), freeze the teacher parts.
    Returns (parts, trainable set, optimizer parameter groups)."""
    ocfg = cfg.onestep
    weights = (ocfg.regression_weight, ocfg.lpips_weight, ocfg.dfc_weight, ocfg.distill_weight, ocfg.vsd_weight)
    if not any(w > 0 for w in weights):
        raise ValueError("onestep: every loss weight is 0 (regression, lpips, dfc, distill, vsd); set one above 0")
    frozen_parts = (modules.unet, modules.controlnet, modules.vae, modules.text_encoder)
    teacher_id = teacher_hash(frozen_parts, cfg.model, modules.scheduler.config)
    teacher_controlnet = modules.controlnet
    if ocfg.controlnet == "train":
        teacher_controlnet = copy.deepcopy(modules.controlnet)
    attach_onestep(modules.unet, ocfg, cfg.seed)
    mark_student(modules.unet, ocfg)  # saved weights and exports say how the student is run
    for m in (*frozen_parts, teacher_controlnet):
        m.requires_grad_(False)
    student = adapter_parameters(modules.unet, STUDENT)
    if ocfg.controlnet == "train":
        student.update({f"controlnet.{k}": p for k, p in modules.controlnet.named_parameters()})
    fake = adapter_parameters(modules.unet, FAKE) if ocfg.vsd_weight > 0 else {}
    for p in (*student.values(), *fake.values()):
        p.requires_grad_(True)
    groups = [{"params": list(student.values()), "lr": cfg.learning_rate}]
    if fake:
        groups.append({"params": list(fake.values()), "lr": ocfg.fake_learning_rate})
    tcfg = teacher_infer_config(ocfg)
    cache = TeacherCache(ocfg.cache_dir or Path(out) / "teacher_cache", teacher_id, sampler_settings(tcfg))
    parts = OneStepParts(ocfg, teacher_controlnet, tcfg, cache)
    if ocfg.vsd_weight > 0:
        tok, enc = modules.tokenizer, modules.text_encoder
        parts.negative = (encode_prompts(tok, enc, [tcfg.negative_prompt], device),
                          encode_prompts(tok, enc, [tcfg.negative_quality_prompt], device))
    if ocfg.lpips_weight > 0:
        parts.lpips = make_lpips(ocfg, device)
    return parts, {**student, **fake}, groups


@torch.no_grad()
def teacher_latents(parts: OneStepParts, modules: XPSRModules, lr_cond: torch.Tensor, content: str,
                    quality: str) -> torch.Tensor:
    """The multi-step teacher's SR latents for one condition image (C, H, W), from the cache or sampled."""
    from xpsr.inference.pipeline import denoise, prompt_embeddings

    unet = unwrap(modules.unet)

    def make() -> torch.Tensor:
        teacher = dataclasses.replace(modules, unet=unet, controlnet=parts.teacher_controlnet)
        with active(unet, None):
            c, q = prompt_embeddings(teacher, content, quality, parts.teacher_infer, lr_cond.device)
            generator = torch.Generator().manual_seed(parts.teacher_infer.seed)
            return denoise(teacher, lr_cond[None], c, q, parts.teacher_infer, lr_cond.device, generator)[0]

    return parts.cache.get(lr_cond, content, quality, make).to(lr_cond.device)


def vsd_terms(parts: OneStepParts, modules: XPSRModules, z_sr: torch.Tensor, lr_cond, c, q,
              generator: torch.Generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(VSD surrogate loss of the student, diffusion loss of the fake score model); equations: docs/one-step.md."""
    ocfg, scheduler, unet = parts.cfg, modules.scheduler, unwrap(modules.unet)
    b, device = z_sr.shape[0], z_sr.device

    def draw():
        t = torch.randint(ocfg.vsd_min_timestep, ocfg.vsd_max_timestep + 1, (b,), generator=generator)
        return t.to(device), torch.randn(z_sr.shape, generator=generator).to(device)

    def score(model_unet, x, t, cc, qq, cond):
        return predict_noise(model_unet, parts.teacher_controlnet, x.to(dtype), t, cc.to(dtype), qq.to(dtype),
                             cond.to(dtype))[0].float()

    z0 = z_sr.detach()
    t, noise = draw()
    x_t = add_noise(z0, noise, t, scheduler)
    with torch.no_grad():
        with active(unet, None):  # real score: the frozen teacher with CFG
            neg_c, neg_q = (n.expand(b, -1, -1) for n in parts.negative)
            out = score(unet, torch.cat([x_t, x_t]), t.repeat(2), torch.cat([neg_c, c]), torch.cat([neg_q, q]),
                        torch.cat([lr_cond, lr_cond]))
            uncond, text = out.chunk(2)
            real = uncond + ocfg.vsd_guidance_scale * (text - uncond)
        with active(unet, FAKE):
            fake = score(unet, x_t, t, c, q, lr_cond)
    vsd = vsd_surrogate(z_sr, predicted_x0(real, x_t, t, scheduler), predicted_x0(fake, x_t, t, scheduler))
    t2, noise2 = draw()  # the fake score model learns the student's current output distribution
    with active(unet, FAKE):
        pred = score(modules.unet, add_noise(z0, noise2, t2, scheduler), t2, c, q, lr_cond)
    fake_loss = latent_mse(pred, diffusion_target(z0, noise2, t2, scheduler))
    return vsd, fake_loss


def onestep_step(parts: OneStepParts, modules: XPSRModules, batch: dict, content_prompt: str,
                 generator: torch.Generator, weight_dtype=torch.float32) -> StepOutput:
    """Loss of one batch for the student (+ the fake score model's when VSD is on); every term logged."""
    ocfg, vae, scheduler = parts.cfg, modules.vae, modules.scheduler
    hr, lr_cond = batch["hr"], batch["lr_cond"]
    b, device, sf = hr.shape[0], hr.device, vae.config.scaling_factor
    with torch.no_grad():
        posterior = vae.encode((lr_cond * 2 - 1).to(weight_dtype)).latent_dist
        z_lr = posterior.mean
        if ocfg.lr_latent == "sample":
            z_lr = z_lr + posterior.std * torch.randn(z_lr.shape, generator=generator).to(device, z_lr.dtype)
        z_lr = z_lr.float() * sf
        z_hr = vae.encode(hr.to(weight_dtype)).latent_dist.mean.float() * sf
        raw = list(batch["content_prompt"]) if content_prompt == "caption" else [""] * b
        qualities = list(batch["quality_prompt"])
        added = parts.teacher_infer.added_prompt
        c = encode_prompts(modules.tokenizer, modules.text_encoder, [f"{x.strip()} {added}".strip() for x in raw],
                           device)
        q = encode_prompts(modules.tokenizer, modules.text_encoder, qualities, device)

    set_active(unwrap(modules.unet), STUDENT)
    t = torch.full((b,), ocfg.timestep, device=device, dtype=torch.long)
    out, control = predict_noise(modules.unet, modules.controlnet, z_lr.to(weight_dtype), t, c.to(weight_dtype),
                                 q.to(weight_dtype), lr_cond.to(weight_dtype))
    z_sr = predicted_x0(out, z_lr, t, scheduler)
    zero = z_sr.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    x_sr = None
    if ocfg.regression == "pixel" and ocfg.regression_weight > 0 or ocfg.lpips_weight > 0:
        x_sr = vae.decode((z_sr / sf).to(weight_dtype)).sample.float()  # with gradients
    if ocfg.regression_weight > 0:
        reg = latent_mse(x_sr, hr) if ocfg.regression == "pixel" else latent_mse(z_sr, z_hr)
        terms["regression"] = ocfg.regression_weight * reg
    if ocfg.lpips_weight > 0:
        lp = parts.lpips(((x_sr + 1) / 2).clamp(0, 1), ((hr.float() + 1) / 2)).mean()
        terms["lpips"] = ocfg.lpips_weight * lp
    if ocfg.dfc_weight > 0:
        d = dfc_loss(control.pixel_rgbs, control.latent_preds, hr.float(), z_hr, weight=ocfg.dfc_weight)
        terms.update(dfc_pixel=d.pixel, dfc_latent=d.latent)
    if ocfg.distill_weight > 0:
        target = torch.stack([teacher_latents(parts, modules, lr_cond[i], raw[i], qualities[i]) for i in range(b)])
        terms["distill"] = ocfg.distill_weight * latent_mse(z_sr, target)
    fake_loss = zero
    if ocfg.vsd_weight > 0:
        vsd, fake_loss = vsd_terms(parts, modules, z_sr, lr_cond, c, q, generator, weight_dtype)
        terms["vsd"] = ocfg.vsd_weight * vsd
        terms["fake_score"] = fake_loss
    student = sum(v for k, v in terms.items() if k != "fake_score") if terms else zero
    return StepOutput(student + fake_loss, {"loss": student + fake_loss, "student_loss": student, **terms})
