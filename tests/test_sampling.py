"""The training order (training/sampling.py): each epoch's order is a function of (seed, epoch)
alone, whatever else drew random numbers before; the real multi-epoch resume is in
test_resume_epochs.py."""

from __future__ import annotations

import pytest

from training.sampling import EpochCallback, EpochSampler

LENGTHS = [5, 40, 12, 33, 7, 21, 18, 9, 27, 14, 30, 11, 25, 16, 8, 36]


def orders(sampler: EpochSampler, epochs: int) -> list[list[int]]:
    found = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        found.append(list(sampler))
    return found


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["shuffled", "grouped"])
def test_each_epoch_is_a_new_permutation_that_the_global_rng_cannot_change(lengths):
    import torch

    torch.manual_seed(0)
    first = orders(EpochSampler(len(LENGTHS), seed=42, lengths=lengths, group_size=4), 3)
    torch.manual_seed(12345)
    torch.rand(1000)  # dropout masks of a few steps, say
    again = EpochSampler(len(LENGTHS), seed=42, lengths=lengths, group_size=4)
    again.set_epoch(2)  # a run resumed in its last epoch builds that epoch's order directly
    assert list(again) == first[2]
    assert orders(again, 3) == first
    assert all(sorted(order) == list(range(len(LENGTHS))) for order in first)
    assert len({tuple(order) for order in first}) == 3
    other_seed = orders(EpochSampler(len(LENGTHS), seed=43, lengths=lengths, group_size=4), 3)
    assert other_seed != first


def test_grouping_keeps_similar_lengths_together_longest_first():
    sampler = EpochSampler(len(LENGTHS), seed=42, lengths=LENGTHS, group_size=4)
    for order in orders(sampler, 3):
        assert LENGTHS[order[0]] == max(LENGTHS)  # an out-of-memory shows at the first step
        # transformers' megabatches (here 4 of 4): sorted longest first, except for the first
        # place of the one the longest example was swapped out of
        for start in range(0, len(order), 4):
            megabatch = [LENGTHS[i] for i in order[start + 1 : start + 4]]
            assert megabatch == sorted(megabatch, reverse=True)


def test_plain_shuffling_keeps_the_order_accelerates_seedable_sampler_gave():
    """group_by_length: false runs train in the same order as before the project owned the sampler."""
    from accelerate.data_loader import SeedableRandomSampler

    data = list(range(len(LENGTHS)))
    theirs = SeedableRandomSampler(data_source=data, data_seed=42)
    ours = EpochSampler(len(data), seed=42)
    for epoch in range(3):
        theirs.set_epoch(epoch)
        ours.set_epoch(epoch)
        assert list(ours) == list(theirs)


@pytest.mark.parametrize(("state_epoch", "expected"), [(None, 0), (0.0, 0), (1.0, 1), (1.5, 1), (2.9166, 2)])
def test_the_sampler_gets_the_epoch_the_loop_enters_also_when_resumed(state_epoch, expected):
    from transformers import TrainerControl, TrainerState

    sampler = EpochSampler(4, seed=0)
    callback = EpochCallback(lambda: sampler)
    callback.on_epoch_begin(None, TrainerState(epoch=state_epoch), TrainerControl())
    assert sampler.epoch == callback.epoch == expected
