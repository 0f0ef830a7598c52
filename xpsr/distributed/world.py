"""Resuming on another number of processes.

The data stream is global (xpsr.training.dataset.WeightedStreamSampler deals it round robin over the ranks)
and every sample's noise is keyed by its stream position (xpsr.distributed.streams), so a checkpoint
records where the *global* stream stands: ``samples`` per rank x ``world``. A resume on W' processes starts
each rank at global position / W' and continues the exact sample order. What may change is the global
batch (batch_size x accumulation x processes): then the run goes on, but with another effective batch
(and the same learning rate), which the resume says in one line.
"""
from __future__ import annotations

import dataclasses

from xpsr.errors import XPSRError


class WorldSizeError(XPSRError, ValueError):
    """The checkpoint's global data position cannot be split evenly over the new number of processes."""


def rescale_position(samples: int, saved_world: int | None, world: int, where: str) -> int:
    """Samples per rank for ``world`` processes that continue a stream where ``saved_world`` ranks each
    consumed ``samples`` (None: a checkpoint older than this record, taken as the same world size)."""
    if saved_world is None or saved_world == world:
        return samples
    position = samples * saved_world
    if position % world:
        raise WorldSizeError(
            f"{where}: saved by {saved_world} processes at global data position {position}, which {world} "
            f"processes cannot split evenly; resume on a number of processes that divides {position}")
    return position // world


def describe_change(saved_world: int | None, saved_global_batch: int | None, world: int,
                    global_batch: int) -> str | None:
    """One line when the resume runs on another world size or global batch; None when nothing changes."""
    if saved_world in (None, world) and saved_global_batch in (None, global_batch):
        return None
    text = (f"resuming a run saved on {saved_world} process(es) on {world}: the sample order continues "
            f"exactly (global stream position kept)")
    if saved_global_batch not in (None, global_batch):
        text += (f"; the global batch changes from {saved_global_batch} to {global_batch} samples per step "
                 f"(batch_size x gradient_accumulation_steps x processes), the learning rate does not")
    return text


def global_batch(batch_size: int, accumulation: int, world: int) -> int:
    """Samples per optimizer step over all processes."""
    return batch_size * accumulation * world


def continue_on(state, world: int, batch: int, where: str):
    """A resumed TrainState (``world``, ``samples``, ``global_batch`` as saved) moved onto ``world`` processes
    with a global batch of ``batch``; returns (state, the one-line note or None)."""
    note = describe_change(state.world, state.global_batch, world, batch)
    return dataclasses.replace(state, samples=rescale_position(state.samples, state.world, world, where)), note
