"""The training loop (accelerate): DDP, accumulation, mixed precision, clipping, EMA, checkpoints,
validation, logging. `python scripts/train.py --config configs/train/xpsr_sd15.yaml key=value ...`
"""
from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from xpsr.config import TrainConfig, to_dict
from xpsr.errors import XPSRError
from xpsr.models.build import DTYPES, build_xpsr, trainable_parameters
from xpsr.training.checkpointing import (
    EMA,
    TrainState,
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from xpsr.training.step import training_step


class NonFiniteLossError(XPSRError, RuntimeError):
    """The loss became NaN/inf; the message names the step and the loss term."""


def _environment(repo: Path) -> dict:
    import accelerate
    import diffusers
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "git_commit": commit,
            "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}


def _make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                  eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError("use_8bit_adam=true needs bitsandbytes with CUDA support") from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_training(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns a summary. Raises :class:`NonFiniteLossError` on NaN/inf losses."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    from xpsr.data.dataset import build_dataset

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_with = None if cfg.report_to == "none" else cfg.report_to
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision="no" if cfg.mixed_precision == "fp32" else cfg.mixed_precision,
                              log_with=log_with, cpu=cfg.device == "cpu",
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    if cfg.demo_data:
        from xpsr.training.demo_data import make_demo_data

        with accelerator.main_process_first():
            demo = make_demo_data(out / "demo_data", crop_size=cfg.data.crop_size, seed=cfg.seed)
        cfg.data = dataclasses.replace(cfg.data, pairs=demo.pairs, cache=demo.cache)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device, weight_dtype = accelerator.device, DTYPES[cfg.mixed_precision]

    # model: frozen parts in the compute dtype, trainable weights fp32
    modules = build_xpsr(dataclasses.replace(cfg.model, seed=cfg.seed))
    for m in (modules.vae, modules.text_encoder, modules.unet):
        m.to(device)
        if weight_dtype != torch.float32:
            m.to(dtype=weight_dtype)
    modules.controlnet.to(device)
    trainable = trainable_parameters(modules.unet, modules.controlnet)
    for p in trainable.values():
        p.data = p.data.float()
    params = list(trainable.values())
    optimizer = _make_optimizer(cfg, params)
    world = accelerator.num_processes
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    ema = EMA(trainable, cfg.ema_decay) if cfg.use_ema else None
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)

    state = TrainState()
    if cfg.resume:
        ckpt = find_checkpoint(out, cfg.resume)
        if ckpt is not None:
            state = load_checkpoint(ckpt, modules.unet, modules.controlnet, optimizer, lr_scheduler, generator, ema)
            accelerator.print(f"resumed from {ckpt} at step {state.step}")

    dataset, sampler = build_dataset(cfg.data, accelerator.process_index, world, start=state.samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    unet, controlnet, optimizer, lr_scheduler = accelerator.prepare(modules.unet, modules.controlnet, optimizer,
                                                                    lr_scheduler)
    if cfg.compile:
        unet, controlnet = torch.compile(unet), torch.compile(controlnet)
    step_modules = dataclasses.replace(modules, unet=unet, controlnet=controlnet)
    controlnet.train()
    unet.train()

    resolved = to_dict(cfg)
    if accelerator.is_main_process:
        from omegaconf import OmegaConf

        (out / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        (out / "environment.json").write_text(json.dumps(_environment(Path(__file__).parent), indent=2))
        if log_with:
            # wandb writes under the run dir (offline mode works without network: WANDB_MODE=offline)
            accelerator.init_trackers("xpsr", config=_flat(resolved), init_kwargs={"wandb": {"dir": str(out)}})
    (out / "logs").mkdir(exist_ok=True)
    loss_log = open(out / "logs" / "losses.jsonl", "a") if accelerator.is_main_process else None

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    data_iter, start, last = iter(loader), time.perf_counter(), {}
    end = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.max_steps
    try:
        while state.step < end:
            with accelerator.accumulate(controlnet, unet):
                batch = _to_device(next(data_iter), device)
                result = training_step(step_modules, batch, cfg.dfc, cfg.content_prompt, generator, weight_dtype)
                for name, value in result.terms.items():
                    if not torch.isfinite(value).all():
                        raise NonFiniteLossError(
                            f"loss term '{name}' is {value.item()} at step {state.step + 1}; stopped without "
                            f"saving. The last good checkpoint is in {out / 'checkpoints'}.")
                accelerator.backward(result.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.samples += batch["hr"].shape[0]
            last = {k: v.item() for k, v in result.terms.items()}
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema.update(trainable)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                logs = {**last, "lr": lr_scheduler.get_last_lr()[0],
                        "steps_per_s": state.step / max(time.perf_counter() - start, 1e-9)}
                accelerator.log(logs, step=state.step)
                if loss_log is not None:
                    loss_log.write(json.dumps({"step": state.step, **logs}) + "\n")
                    loss_log.flush()
            stopping_early = state.step == end < cfg.max_steps
            if accelerator.is_main_process and (
                    stopping_early or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)):
                save_checkpoint(out / "checkpoints" / f"step-{state.step}", modules.unet, modules.controlnet,
                                resolved, optimizer, lr_scheduler, state, generator, ema)
                prune_checkpoints(out, cfg.checkpoints_total_limit)
            if cfg.validation.every and state.step % cfg.validation.every == 0 and accelerator.is_main_process:
                from xpsr.training.validation import run_validation

                run_validation(cfg, modules, dataset, out / "samples" / f"step-{state.step}.png", accelerator,
                               state.step, ema=ema, trainable=trainable)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and state.step == cfg.max_steps:
            from xpsr.models.checkpoint import save_trained

            save_trained(out / "final" / "trained.safetensors", modules.unet, modules.controlnet, resolved)
            if ema is not None:
                ema.swap(trainable)
                save_trained(out / "final" / "ema.safetensors", modules.unet, modules.controlnet, resolved)
                ema.swap(trainable)
    finally:
        bar.close()
        if loss_log is not None:
            loss_log.close()
        accelerator.end_training()
    seconds = time.perf_counter() - start
    return {"steps": state.step, "last": last, "seconds": round(seconds, 2),
            "steps_per_s": round(state.step / seconds, 3) if seconds > 0 else None}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
