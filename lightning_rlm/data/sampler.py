"""One sampler for every training DataLoader: seeded, sharded by global batch, resumable mid-epoch.

Why not Lightning's ``DistributedSampler``: it shards the whole epoch by rank (rank r takes every
``world``-th example), so 2 processes × B see different examples per step than 1 process × 2B, and it
cannot resume mid-epoch. Here epoch ``e``'s order is a fixed function of ``(seed, e)``; it is cut into
global batches of ``batch_size × world_size`` and rank ``r`` takes slice ``r`` of each, so every step sees
the same global batch whatever the number of processes. When resuming, the batches of the interrupted pass
that the trainer already consumed are left out (the DataModule records how many).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Indices for one rank. ``batch_size`` is per rank; the global batch is ``batch_size * world_size``.

    Shuffled epochs are ``randperm(n, seed + epoch)``. A last incomplete global batch is dropped when
    ``drop_last`` or under several processes in training (equal steps on every rank); unshuffled
    evaluation under several processes pads it by wrapping around, as ``DistributedSampler`` does, so
    every rank runs the same number of batches.
    """

    def __init__(self, num_items: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_items, self.batch_size, self.shuffle = num_items, batch_size, shuffle
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.epoch = -1  # the pass in progress; each __iter__ starts the next one
        self._skip = 0  # batches of the next pass already consumed before a restart

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the sampler counts its own passes, so a resumed run replays the same order whatever
        epoch number the trainer restores (Lightning counts a pass cut short by a stop as finished)."""

    def resume(self, epoch: int, batches: int) -> None:
        """The next pass is ``epoch``, without its first ``batches`` (per-rank) batches."""
        self.epoch, self._skip = epoch - 1, batches

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_items, generator=g).tolist()
        return list(range(self.num_items))

    def _rank_indices(self) -> list[int]:
        order, glob = self._order(), self.batch_size * self.world_size
        full = len(order) // glob * glob
        if len(order) > full and not (self.drop_last or (self.shuffle and self.world_size > 1)):
            if self.world_size == 1:
                full = len(order)
            else:  # pad the last global batch by wrapping around, so ranks run equal batches
                per_rank = -(-(len(order) - full) // self.world_size)
                need = full + per_rank * self.world_size
                order = (order * (need // max(len(order), 1) + 1))[:need]
                return [i for start in range(0, full, glob)
                        for i in order[start + self.rank * self.batch_size: start + (self.rank + 1) * self.batch_size]
                        ] + order[full + self.rank * per_rank: full + (self.rank + 1) * per_rank]
        return [i for start in range(0, full, glob)
                for i in order[start + self.rank * self.batch_size: start + (self.rank + 1) * self.batch_size]]

    def __iter__(self) -> Iterator[int]:
        self.epoch += 1
        indices = self._rank_indices()[self._skip * self.batch_size:]
        self._skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return len(self._rank_indices())  # a full pass (the count of the pass about to start)
