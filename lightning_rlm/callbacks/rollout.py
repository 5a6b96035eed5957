"""Reading text rollouts out of step outputs, and gathering Python objects across DDP ranks.

The contract between RL methods and evaluation callbacks: `training_step` / `validation_step` return a
dict with a `"rollout"` key (besides `"loss"`) whose value is a plain dict

    {"prompts": list[str], "completions": list[str], "references": list[str] | None,
     "rewards": dict[str, list[float]], "advantages": list[float] | None, "group_size": int}

with completions grouped contiguously, `group_size` per prompt. `prompts` (and `references`) may hold
one entry per completion or one per group. Callbacks receive that dict as `outputs` in
`on_train_batch_end` / `on_validation_batch_end` and call `get_rollout(outputs)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "all_gather_objects",
    "broadcast_object",
    "get_rollout",
    "per_completion",
    "per_group",
    "world_info",
]

_ROLLOUT_KEYS = ("prompts", "completions", "references", "rewards", "advantages", "group_size")


def get_rollout(outputs: Any) -> dict[str, Any] | None:
    """The text rollout in a step's outputs, or None.

    Accepts the outputs dict (`outputs["rollout"]`), the rollout dict itself, or an object with a
    `completions` attribute holding strings; anything else (a loss tensor, None, a tensor-only rollout)
    gives None. Missing optional keys are filled: `references`/`advantages` None, `rewards` {},
    `group_size` 1, `prompts` [].
    """
    candidate = outputs.get("rollout", outputs) if isinstance(outputs, Mapping) else outputs
    if isinstance(candidate, Mapping):
        rollout = dict(candidate)
    elif hasattr(candidate, "completions"):
        rollout = {k: getattr(candidate, k) for k in _ROLLOUT_KEYS if hasattr(candidate, k)}
    else:
        return None
    completions = rollout.get("completions")
    if not isinstance(completions, Sequence) or not all(isinstance(c, str) for c in completions):
        return None  # e.g. a rollout of token tensors: no text to read
    rollout["completions"] = list(completions)
    rollout.setdefault("prompts", [])
    rollout["prompts"] = list(rollout["prompts"] or [])
    rollout.setdefault("references", None)
    rollout["rewards"] = dict(rollout.get("rewards") or {})
    rollout.setdefault("advantages", None)
    rollout["group_size"] = int(rollout.get("group_size") or 1)
    return rollout


def per_completion(values: Sequence[T] | None, n: int, group_size: int) -> list[T | None]:
    """Expand a per-completion or per-group list to one entry per completion (None where unknown)."""
    if not values:
        return [None] * n
    if len(values) == n:
        return list(values)
    if group_size > 1 and len(values) * group_size == n:
        return [values[i // group_size] for i in range(n)]
    raise ValueError(
        f"expected {n} or {n // max(group_size, 1)} values for {n} completions, got {len(values)}"
    )


def per_group(values: Sequence[T] | None, n: int, group_size: int) -> list[T]:
    """One entry per group from a per-completion or per-group list (the first of each group)."""
    if not values:
        return []
    if group_size > 1 and len(values) == n:
        return list(values[::group_size])
    return list(values)


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
