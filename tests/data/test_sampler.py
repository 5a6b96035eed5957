"""ResumableSampler: same global batches whatever the number of processes; exact mid-epoch resume."""

from __future__ import annotations

import pytest
from torch.utils.data import BatchSampler

from lightning_rlm.data.sampler import ResumableSampler


def batches(n: int, batch: int, world: int, epoch: int = 0, **kw) -> list[list[list[int]]]:
    """Per rank, the list of its batches in pass `epoch`."""
    out = []
    for rank in range(world):
        s = ResumableSampler(n, batch, shuffle=kw.get("shuffle", True), seed=7, rank=rank, world_size=world,
                             drop_last=kw.get("drop_last", False))
        for _ in range(epoch):
            list(s)
        out.append(list(BatchSampler(s, batch, drop_last=False)))
    return out


def test_two_ranks_split_each_global_batch_of_one_rank():
    (single,) = batches(20, 4, 1, drop_last=True)
    r0, r1 = batches(20, 2, 2)
    assert len(r0) == len(r1) == len(single) == 5
    for full, a, b in zip(single, r0, r1):
        assert full == a + b


def test_epochs_differ_and_are_a_permutation():
    (e0,), (e1,) = batches(10, 10, 1, 0), batches(10, 10, 1, 1)
    assert sorted(e0[0]) == sorted(e1[0]) == list(range(10))
    assert e0 != e1


def test_resume_replays_the_interrupted_pass_without_its_consumed_batches():
    s = ResumableSampler(12, 3, shuffle=True, seed=1)
    passes = [list(s) for _ in range(3)]
    assert passes[0] != passes[1]
    resumed = ResumableSampler(12, 3, shuffle=True, seed=1)
    resumed.set_epoch(5)  # the trainer's epoch number does not matter
    resumed.resume(epoch=1, batches=2)
    assert list(resumed) == passes[1][6:]
    assert list(resumed) == passes[2]  # the next pass is whole


def test_unshuffled_eval_pads_so_ranks_run_equal_batches():
    r0, r1 = batches(5, 2, 2, shuffle=False)
    assert len(r0) == len(r1)
    assert sorted({i for b in r0 + r1 for i in b}) == list(range(5))


def test_training_under_two_processes_drops_the_incomplete_global_batch():
    r0, r1 = batches(11, 2, 2)
    assert len(r0) == len(r1) == 2


def test_bad_rank_is_rejected():
    with pytest.raises(ValueError, match="rank must be in"):
        ResumableSampler(4, 2, shuffle=False, rank=2, world_size=2)
