"""Checkpoints and final weights under FSDP: every rank gathers the sharded weights, the optimizer state and
the EMA (xpsr.distributed.fsdp.gather), the main process writes the same files as under DDP."""
from __future__ import annotations

from xpsr.distributed.fsdp import gather
from xpsr.models.checkpoint import save_trained
from xpsr.training.checkpointing import prune_checkpoints, save_checkpoint
from xpsr.training.integrity import disk_full_is_an_error


def save_gathered_checkpoint(s) -> None:
    """``checkpoints/step-N`` of a sharded session (``s``: the loop's Session); collective."""
    unet, controlnet, optimizer, ema = gather(s.pair, s.optimizer.optimizer, s.ema)
    if s.accelerator.is_main_process:
        save_checkpoint(s.out / "checkpoints" / f"step-{s.state.step}", unet, controlnet, s.resolved, optimizer,
                        s.lr_scheduler, s.state, s.generator, ema, hashes=s.cfg.checkpoint_hashes,
                        rank_generators=s.rank_generators)
        prune_checkpoints(s.out, s.cfg.checkpoints_total_limit)
    s.accelerator.wait_for_everyone()


def save_gathered_final(s) -> None:
    """final/trained.safetensors (and final/ema.safetensors) of a sharded session; collective."""
    unet, controlnet, _, _ = gather(s.pair)
    ema = gather(s.pair, ema=s.ema, use_ema=True)[:2] if s.ema is not None else None
    if s.accelerator.is_main_process:
        with disk_full_is_an_error(f"the final weights {s.out / 'final'}"):
            save_trained(s.out / "final" / "trained.safetensors", unet, controlnet, s.resolved)
            if ema is not None:
                save_trained(s.out / "final" / "ema.safetensors", *ema, s.resolved)
    s.accelerator.wait_for_everyone()
