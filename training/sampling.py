"""The training data order: a function of (seed, epoch) alone, so a resumed run replays it.

transformers' `group_by_length` sampler (`LengthGroupedSampler`) draws its permutation from the
global torch RNG when an epoch's iterator starts. In an uninterrupted run that RNG has by then
been advanced by every dropout mask of the epochs before; in a run resumed mid-epoch the
iterator is built (and the already-trained batches skipped) *before* the Trainer restores the
checkpoint's RNG state, so the resumed epoch was ordered by a freshly seeded RNG — the order of
epoch 0. Resumes inside epoch 0 were exact by luck; from epoch 1 on the skipped batches were not
the ones trained before the stop, so some examples were trained twice in that epoch and others
not at all, and every later step diverged.

`EpochSampler` orders each epoch with its own generator seeded with `seed + epoch` (as
accelerate's `SeedableRandomSampler` does for plain shuffling: the same order as before for
`group_by_length: false`), grouping by length or not. It ignores the global RNG, so neither
dropout nor the moment RNG state is restored can change it, and every data-parallel rank
computes the same permutation before accelerate deals its batches out.

The trainer sets the epoch at every epoch start (`EpochCallback`): accelerate's `set_epoch`
does not reach a sampler behind both a `SkipBatchSampler` (resume) and a `BatchSamplerShard`
(several processes).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices


class EpochSampler(Sampler[int]):
    """A shuffled order of `size` indices per epoch; with `lengths`, grouped by length into
    runs of `group_size` (transformers' megabatch grouping, on this sampler's generator)."""

    def __init__(self, size: int, seed: int, lengths: Sequence[int] | None = None, group_size: int = 1) -> None:
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} examples")
        self.size = size
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None
        self.group_size = group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        if self.lengths is None:
            return torch.randperm(self.size, generator=generator).tolist()
        return get_length_grouped_indices(self.lengths, self.group_size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.size


def example_lengths(dataset, input_name: str, length_column: str | None) -> list[int]:
    """Token count of every row, as transformers' group_by_length computes it."""
    columns = getattr(dataset, "column_names", None) or []
    if length_column and length_column in columns:
        return [int(n) for n in dataset[length_column]]
    if input_name in columns:
        return [len(ids) for ids in dataset[input_name]]
    return [len(row[input_name]) for row in dataset]


class EpochCallback(TrainerCallback):
    """Hands the sampler the index of the epoch that is starting (also the resumed one)."""

    def __init__(self, sampler_of) -> None:
        self.sampler_of = sampler_of  # () -> EpochSampler | None: the trainer builds it late
        self.epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is epochs done, fractional mid-epoch (a resumed state): its floor is the
        # epoch the loop is entering, the same `global_step // steps_per_epoch` the Trainer skips by.
        self.epoch = math.floor(state.epoch or 0.0)
        sampler = self.sampler_of()
        if sampler is not None:
            sampler.set_epoch(self.epoch)
        return control
