"""The training loop (accelerate): DDP, accumulation, mixed precision, clipping, EMA, checkpoints,
validation, logging. `python scripts/train.py --config configs/train/xpsr_sd15.yaml key=value ...`

`run_training` reads top to bottom as the steps of a session: set up the accelerator and seeds, build the
model, the optimizer and LR schedule, resume, the data, the run files; then per optimizer step: the
forward/backward of each micro-batch, then EMA, logs, checkpoint and validation; at the end, the final
weights. Every step is one function below; `Session` carries what they share.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from xpsr.config import TrainConfig, to_dict
from xpsr.distributed.fsdp import TrainedPair, after_prepare, enable_fsdp_on_cpu
from xpsr.distributed.streams import POSITION, PositionedDataset, PositionedSampler, sample_generators
from xpsr.distributed.world import continue_on, global_batch
from xpsr.errors import XPSRError
from xpsr.models.build import DTYPES, XPSRModules, build_xpsr, trainable_parameters
from xpsr.training.checkpointing import (
    EMA,
    TrainState,
    find_checkpoint,
    keep_log_until,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temp,
    save_checkpoint,
    warn_if_schedule_changes,
)
from xpsr.training.dataset import build_dataset
from xpsr.training.determinism import deterministic_mode, seed_everything
from xpsr.training.integrity import CheckpointWarning, disk_full_is_an_error, write_text_atomic
from xpsr.training.latent_cache import check_cache
from xpsr.training.runfiles import _flat, environment
from xpsr.training.sharded import save_gathered_checkpoint, save_gathered_final
from xpsr.training.step import training_step
from xpsr.training.trainable import reachable_only


class NonFiniteLossError(XPSRError, RuntimeError):
    """The loss became NaN/inf; the message names the step and the loss term."""


@dataclasses.dataclass
class Session:
    """What the steps of one training session share."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    weight_dtype: torch.dtype
    modules: XPSRModules  # unwrapped: checkpoints and validation read these
    trainable: dict[str, torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    ema: EMA | None
    generator: torch.Generator  # one-step training's noise (multi-step draws per sample: distributed.streams)
    state: TrainState = dataclasses.field(default_factory=TrainState)
    dataset: Any = None
    loader: Any = None
    step_modules: XPSRModules | None = None  # prepared (and compiled) UNet/ControlNet for the forward
    resolved: dict = dataclasses.field(default_factory=dict)  # the config as saved with every checkpoint
    loss_log: Any = None
    onestep: Any = None  # xpsr.onestep.train.OneStepParts when training the one-step student
    pair: Any = None  # under FSDP: the sharded UNet + ControlNet as one module (xpsr.distributed.fsdp)
    rank_generators: list | None = None  # every rank's generator state at the last checkpoint (several ranks)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.trainable.values())


def run_training(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns a summary. Raises :class:`NonFiniteLossError` on NaN/inf losses."""
    check_checkpoint_settings(cfg)
    with deterministic_mode(cfg.deterministic), disk_full_is_an_error(f"the run dir {cfg.output_dir}"):
        accelerator, out = setup_accelerator(cfg)
        s = build_session(cfg, accelerator, out)
        resume(s)
        make_data(s)
        prepare_for_training(s)
        write_run_files(s)
        end = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.max_steps
        bar = tqdm(total=cfg.max_steps, initial=s.state.step, desc="train",
                   disable=not accelerator.is_main_process)
        data_iter, start, last = iter(s.loader), time.perf_counter(), {}
        try:
            while s.state.step < end:
                last, optimizer_stepped = micro_step(s, next(data_iter))
                if optimizer_stepped:
                    after_optimizer_step(s, last, end, start)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
            finish(s)
        finally:
            bar.close()
            if s.loss_log is not None:
                s.loss_log.close()
            accelerator.end_training()
    seconds = time.perf_counter() - start
    return {"steps": s.state.step, "last": last, "seconds": round(seconds, 2),
            "steps_per_s": round(s.state.step / seconds, 3) if seconds > 0 else None}


def check_checkpoint_settings(cfg: TrainConfig) -> None:
    """checkpoint_every=0 means no periodic checkpoints (warned: a crash loses the session);
    checkpoints_total_limit=0 would delete the checkpoint just written."""
    if cfg.checkpoint_every < 0:
        raise XPSRError(f"checkpoint_every={cfg.checkpoint_every}: use a number of steps, or 0 for no checkpoints")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise XPSRError(f"checkpoints_total_limit={cfg.checkpoints_total_limit}: keep at least 1 checkpoint "
                        f"(null keeps all)")
    if cfg.checkpoint_every == 0:
        warnings.warn("checkpoint_every=0: no checkpoints are written during training (only at stop_at_step and "
                      "the final weights), so an interrupted run cannot resume", CheckpointWarning, stacklevel=3)


def setup_accelerator(cfg: TrainConfig):
    """The accelerator (DDP, accumulation, autocast), the run dir, the demo data if asked, global seeds."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision="no" if cfg.mixed_precision == "fp32" else cfg.mixed_precision,
                              log_with=None if cfg.report_to == "none" else cfg.report_to, cpu=cfg.device == "cpu",
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    enable_fsdp_on_cpu(accelerator)
    if accelerator.is_fsdp2 and (cfg.validation.every or cfg.onestep.enabled):
        raise XPSRError("under FSDP, validation.every must be 0 (validation needs the whole model in one process: "
                        "sample the checkpoints with `xpsr infer`) and onestep.enabled false")
    seed_everything(cfg.seed, accelerator.process_index)
    if cfg.demo_data:
        from xpsr.training.demo_data import make_demo_data

        with accelerator.main_process_first():
            demo = make_demo_data(out / "demo_data", crop_size=cfg.data.crop_size, seed=cfg.seed)
        cfg.data = dataclasses.replace(cfg.data, pairs=demo.pairs, cache=demo.cache)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.validation.every:
        from xpsr.training.validation import validation_infer_config

        validation_infer_config(cfg, scale=4)  # fail now, naming the key, not at the first validation
    return accelerator, out


def build_session(cfg: TrainConfig, accelerator, out: Path) -> Session:
    """The model placed and cast as the official script does, the optimizer, the LR schedule, EMA."""
    device, weight_dtype = accelerator.device, DTYPES[cfg.mixed_precision]
    if cfg.onestep.enabled:
        from xpsr.onestep.train import build_teacher

        modules = build_teacher(cfg)
    else:
        modules = build_xpsr(dataclasses.replace(cfg.model, seed=cfg.seed))
    # The official script casts only the VAE and the text encoder; the frozen UNet stays fp32 and autocast
    # computes in half precision. frozen_unet_dtype=mixed_precision also stores it in half precision.
    half = [modules.vae, modules.text_encoder]
    if cfg.frozen_unet_dtype == "mixed_precision":
        half.append(modules.unet)
    on_device = [modules.vae, modules.text_encoder, modules.unet, modules.controlnet]
    if cfg.text_encoder_device == "cpu":  # stays fp32 on the CPU (half precision is slow there); see encode_prompts
        on_device.remove(modules.text_encoder)
    for m in on_device:
        m.to(device)
        if m in half and weight_dtype != torch.float32:
            m.to(dtype=weight_dtype)
    onestep = None
    if cfg.onestep.enabled:  # the student's LoRA + ControlNet, and the fake score model's LoRA (own LR)
        from xpsr.onestep.train import build_onestep

        onestep, trainable, groups = build_onestep(cfg, modules, out, device)
    else:
        # heads whose loss term the recipe switches off are frozen: DDP needs every trainable one to get a gradient
        trainable = reachable_only(trainable_parameters(modules.unet, modules.controlnet), modules.controlnet,
                                   cfg.dfc)
        groups = list(trainable.values())
    for p in trainable.values():
        p.data = p.data.float()  # master weights in fp32
    optimizer = make_optimizer(cfg, groups)
    world = accelerator.num_processes
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process, hence the factor `world`
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    return Session(cfg=cfg, out=out, accelerator=accelerator, weight_dtype=weight_dtype, modules=modules,
                   trainable=trainable, optimizer=optimizer, lr_scheduler=lr_scheduler,
                   ema=EMA(trainable, cfg.ema_decay) if cfg.use_ema else None,
                   generator=torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index),
                   onestep=onestep)


def make_optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    """AdamW over ``params`` (parameters, or parameter groups with their own ``lr``)."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                  eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError('use_8bit_adam=true needs bitsandbytes: pip install -e ".[lowmem]"') from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def resume(s: Session) -> None:
    """Remove what an interrupted save left; with ``resume``: weights, optimizer, schedule, EMA, every RNG
    and the data position of the newest valid checkpoint (or the one named)."""
    if s.accelerator.is_main_process:
        for path in remove_stale_temp(s.out):
            s.accelerator.print(f"removed {path}, left by an interrupted save")
    if not s.cfg.resume:
        return
    ckpt = _choose_checkpoint(s)
    if ckpt is None:
        return
    s.state = load_checkpoint(ckpt, s.modules.unet, s.modules.controlnet, s.optimizer, s.lr_scheduler, s.generator,
                              s.ema, rank=s.accelerator.process_index)
    world, cfg = s.accelerator.num_processes, s.cfg
    s.state, change = continue_on(s.state, world, global_batch(cfg.batch_size, cfg.gradient_accumulation_steps,
                                                               world), str(ckpt))
    s.accelerator.print(f"resumed from {ckpt} at step {s.state.step}")
    if change:
        s.accelerator.print(change)
    warn_if_schedule_changes(s.cfg.lr_scheduler, s.state.max_steps, s.cfg.max_steps)


def _choose_checkpoint(s: Session) -> Path | None:
    """The main process verifies the checkpoints (hashing them once, not once per GPU) and every process
    resumes from its choice."""
    found, error = None, None
    if s.accelerator.is_main_process:
        try:
            found = find_checkpoint(s.out, s.cfg.resume, hashes=s.cfg.checkpoint_hashes)
        except (XPSRError, FileNotFoundError) as e:
            error = e
    if s.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        found, message = broadcast_object_list([found, None if error is None else str(error)])
        if message is not None and error is None:
            raise XPSRError(message)
    if error is not None:
        raise error
    return found


def make_data(s: Session) -> None:
    """The dataset and a loader that continues at the resumed data position."""
    s.dataset, sampler = build_dataset(s.cfg.data, s.accelerator.process_index, s.accelerator.num_processes,
                                       start=s.state.samples)
    if s.cfg.data.latent_cache:  # cached HR moments: refuse those of another VAE (docs/gpu-memory.md)
        check_cache(s.cfg.data.latent_cache, s.modules.vae)
    # Each sample carries its global stream position (it seeds its noise and timestep). Its own generator: the
    # workers' base seed comes from it, not from the global RNG (which differs between straight and resumed runs).
    s.loader = torch.utils.data.DataLoader(
        PositionedDataset(s.dataset), batch_size=s.cfg.batch_size, sampler=PositionedSampler(sampler),
        num_workers=s.cfg.num_workers, pin_memory=s.accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(s.cfg.seed * 1000 + s.accelerator.process_index))


def prepare_for_training(s: Session) -> None:
    """accelerate wraps the UNet/ControlNet (DDP, autocast; or FSDP2 as one pair), the optimizer and the
    schedule; optional compile."""
    if s.accelerator.is_fsdp2:
        old = [p for group in s.optimizer.param_groups for p in group["params"]]
        s.pair, s.optimizer, s.lr_scheduler = s.accelerator.prepare(
            TrainedPair(s.modules.unet, s.modules.controlnet), s.optimizer, s.lr_scheduler)
        s.trainable = after_prepare(s.pair, s.optimizer.optimizer, old, s.trainable, s.ema)
        s.step_modules = s.modules
        s.pair.train()
        return
    unet, controlnet, s.optimizer, s.lr_scheduler = s.accelerator.prepare(
        s.modules.unet, s.modules.controlnet, s.optimizer, s.lr_scheduler)
    if s.cfg.compile:
        unet, controlnet = torch.compile(unet), torch.compile(controlnet)
    s.step_modules = dataclasses.replace(s.modules, unet=unet, controlnet=controlnet)
    controlnet.train()
    unet.train()


def write_run_files(s: Session) -> None:
    """config.yaml, environment.json, the experiment tracker and logs/losses.jsonl (main process)."""
    s.resolved = to_dict(s.cfg)
    (s.out / "logs").mkdir(exist_ok=True)
    if not s.accelerator.is_main_process:
        return
    from omegaconf import OmegaConf

    write_text_atomic(s.out / "config.yaml", OmegaConf.to_yaml(s.resolved))
    write_text_atomic(s.out / "environment.json", json.dumps(environment(Path(__file__).parent), indent=2))
    if s.cfg.report_to != "none":
        # wandb writes under the run dir (offline mode works without network: WANDB_MODE=offline)
        s.accelerator.init_trackers("xpsr", config=_flat(s.resolved), init_kwargs={"wandb": {"dir": str(s.out)}})
    # rows after the resumed step are logged again by this session; a row torn by a kill is dropped
    dropped = keep_log_until(s.out / "logs" / "losses.jsonl", s.state.step)
    if dropped:
        s.accelerator.print(dropped)
    # unbuffered: a row is one write, so nothing is left in a buffer to fail again at close on a full disk
    s.loss_log = open(s.out / "logs" / "losses.jsonl", "ab", buffering=0)


def micro_step(s: Session, batch: dict) -> tuple[dict[str, float], bool]:
    """Forward and backward of one micro-batch; the optimizer steps when accumulation is complete.
    Returns (loss terms, whether that was an optimizer step)."""
    cfg, accelerator = s.cfg, s.accelerator
    synced = [s.pair] if s.pair is not None else [s.step_modules.controlnet, s.step_modules.unet]
    with accelerator.accumulate(*synced):
        batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        if s.onestep is not None:
            from xpsr.onestep.train import onestep_step

            result = onestep_step(s.onestep, s.step_modules, batch, cfg.content_prompt, s.generator, s.weight_dtype)
        else:
            generators = sample_generators(cfg.seed, batch[POSITION].tolist())
            result = training_step(s.step_modules, batch, cfg.dfc, cfg.content_prompt, generators, s.weight_dtype,
                                   predict=s.pair)
        for name, value in result.terms.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(
                    f"loss term '{name}' is {value.item()} at step {s.state.step + 1}; stopped without "
                    f"saving. The last good checkpoint is in {s.out / 'checkpoints'}.")
        accelerator.backward(result.loss)
        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
            for group in s.optimizer.param_groups:  # each group on its own (one group but for one-step VSD)
                accelerator.clip_grad_norm_(group["params"], cfg.max_grad_norm)
        s.optimizer.step()
        s.lr_scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
    s.state.samples += batch["hr"].shape[0]
    return {k: v.item() for k, v in result.terms.items()}, accelerator.sync_gradients


def after_optimizer_step(s: Session, last: dict[str, float], end: int, start: float) -> None:
    """Count the step, update EMA, then log, checkpoint and validate when due."""
    cfg, state = s.cfg, s.state
    state.step += 1
    if s.ema is not None:
        s.ema.update(s.trainable)
    if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
        logs = {**last, "lr": s.lr_scheduler.get_last_lr()[0],
                "steps_per_s": state.step / max(time.perf_counter() - start, 1e-9)}
        s.accelerator.log(logs, step=state.step)
        if s.loss_log is not None:
            row = (json.dumps({"step": state.step, **logs}) + "\n").encode()
            with disk_full_is_an_error(s.loss_log.name):
                if s.loss_log.write(row) != len(row):  # a short write: the disk filled up mid-row
                    raise OSError(errno.ENOSPC, "short write", s.loss_log.name)
    stopping_early = state.step == end < cfg.max_steps
    due = stopping_early or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)
    if due:
        state.max_steps, state.world = cfg.max_steps, s.accelerator.num_processes
        state.global_batch = global_batch(cfg.batch_size, cfg.gradient_accumulation_steps, state.world)
        if state.world > 1:  # collective: each rank's generator goes into the checkpoint (rank 0 writes it)
            from accelerate.utils import gather_object

            s.rank_generators = gather_object([s.generator.get_state()])
    if s.pair is not None:  # FSDP: every rank gathers, the main process writes; no validation
        if due:
            save_gathered_checkpoint(s)
        return
    if not s.accelerator.is_main_process:
        return
    if due:
        save_checkpoint(s.out / "checkpoints" / f"step-{state.step}", s.modules.unet, s.modules.controlnet,
                        s.resolved, s.optimizer, s.lr_scheduler, state, s.generator, s.ema,
                        hashes=cfg.checkpoint_hashes, rank_generators=s.rank_generators)
        prune_checkpoints(s.out, cfg.checkpoints_total_limit)
    if cfg.validation.every and state.step % cfg.validation.every == 0:
        from xpsr.training.validation import run_validation

        run_validation(cfg, s.modules, s.dataset, s.out / "samples" / f"step-{state.step}.png", s.accelerator,
                       state.step, ema=s.ema, trainable=s.trainable)


def finish(s: Session) -> None:
    """At max_steps: final/trained.safetensors (and final/ema.safetensors with EMA)."""
    s.accelerator.wait_for_everyone()
    if s.pair is not None and s.state.step == s.cfg.max_steps:
        return save_gathered_final(s)
    if not (s.accelerator.is_main_process and s.state.step == s.cfg.max_steps):
        return
    from xpsr.models.checkpoint import save_trained

    with disk_full_is_an_error(f"the final weights {s.out / 'final'}"):
        save_trained(s.out / "final" / "trained.safetensors", s.modules.unet, s.modules.controlnet, s.resolved)
        if s.onestep is not None:  # the student's adapter in peft's layout too (the weights above include it)
            from xpsr.onestep.lora import save_adapter

            save_adapter(s.modules.unet, s.out / "final" / "student_lora")
        if s.ema is not None:
            s.ema.swap(s.trainable)
            save_trained(s.out / "final" / "ema.safetensors", s.modules.unet, s.modules.controlnet, s.resolved)
            s.ema.swap(s.trainable)
