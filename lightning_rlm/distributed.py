"""Gathering and broadcasting Python objects across DDP ranks, and per-rank state in checkpoints.

Used by methods and callbacks alike; each function is a no-op wrapper when not distributed.
"""

from __future__ import annotations

from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = ["all_gather_objects", "broadcast_object", "generator_states", "own_generator", "own_rank_state",
           "rank_states", "world_info"]


def world_info() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` when not distributed.

    A collective: all ranks must call it. (`strategy.all_gather` only handles tensors, not strings.)
    """
    _, world = world_info()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` from rank `src` on every rank (a collective); `obj` itself when not distributed."""
    _, world = world_info()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_states(state: Any) -> list[Any]:
    """Every rank's `state`, in rank order (a collective under DDP; checkpoints are dumped on all ranks)."""
    return all_gather_objects(state)


def own_rank_state(states: list[Any]) -> Any:
    """This rank's entry of `rank_states` (rank 0's when resuming with fewer processes than were saved)."""
    rank, _ = world_info()
    return states[rank] if rank < len(states) else states[0]


def generator_states(generator: Optional[torch.Generator]) -> list[Any]:
    """Every rank's state of its own `generator` (None where it has none yet), for a checkpoint; a collective."""
    return rank_states(generator.get_state() if generator is not None else None)


def own_generator(states: Optional[list[Any]], device: Any = "cpu", legacy: Any = None) -> Optional[torch.Generator]:
    """This rank's generator from :func:`generator_states` (or a single `legacy` state); None when none saved."""
    state = own_rank_state(states) if states else legacy
    if state is None:
        return None
    generator = torch.Generator(device)
    generator.set_state(state)
    return generator
