"""Randomness per sample, not per rank: the same mathematics on any number of processes.

A training step draws, for each sample, the VAE posterior noise, the diffusion noise and the timestep.
If each rank drew them from its own generator, 2 ranks x batch 1 and 1 rank x batch 2 would train on
different noise and never agree. Instead every sample carries its position ``k`` in the global data stream
(the k-th key the sampler deals, whatever rank takes it), and its draws come from a generator seeded by
(seed, k). The data itself (crop, flip, HR-as-condition, prompt dropout) is already a function of the
sample key (xpsr.training.dataset), so a sample is trained identically on any world size, batch size and
accumulation, and a resumed run on another world size continues exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

POSITION = "stream_position"  # the batch key that carries each sample's global stream position


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at global stream position ``position`` (independent streams per sample)."""
    state = np.random.SeedSequence([seed, int(position)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def sample_generators(seed: int, positions) -> list[torch.Generator]:
    return [sample_generator(seed, int(p)) for p in positions]


class PositionedSampler(Sampler):
    """Adds the global stream position to the keys of a :class:`~xpsr.training.dataset.WeightedStreamSampler`.

    That sampler deals the global stream round robin: rank r of W takes positions r, r+W, r+2W, ...,
    starting at ``start * W + r`` (``start`` = samples the rank has consumed).
    """

    def __init__(self, base):
        self.base = base

    def __iter__(self):
        position = self.base.start * self.base.world + self.base.rank
        for key in self.base:
            yield (*key, position)
            position += self.base.world

    def __len__(self) -> int:
        return len(self.base)


class PositionedDataset(Dataset):
    """Reads ``(index, block, position)`` keys: the wrapped sample plus its ``stream_position``."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        *inner, position = key
        return {**self.base[tuple(inner)], POSITION: position}

    def __getattr__(self, name):  # validation reads the wrapped dataset's parts
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)
