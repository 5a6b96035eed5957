"""Reading text rollouts out of step outputs.

The contract between RL methods and evaluation callbacks: `training_step` / `validation_step` return a
dict with a `"rollout"` key (besides `"loss"`) whose value is a
:class:`~lightning_rlm.rollout.TextRollout` (prompts, completions, references, rewards, advantages,
group_size; a plain dict with those keys is read too), with completions grouped contiguously,
`group_size` per prompt. Callbacks receive the step's outputs in `on_train_batch_end` /
`on_validation_batch_end` and call `get_rollout(outputs)`. The DDP object helpers live in
:mod:`lightning_rlm.distributed` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from lightning_rlm.distributed import all_gather_objects, broadcast_object, world_info
from lightning_rlm.rollout.text import TextRollout

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


def get_rollout(outputs: Any) -> TextRollout | None:
    """The text rollout in a step's outputs, or None.

    Accepts the outputs dict (`outputs["rollout"]`), the rollout itself (a `TextRollout`, a dict with its
    keys, or an object with a `completions` attribute holding strings); anything else (a loss tensor,
    None, a tensor-only rollout) gives None. Missing optional fields get their defaults.
    """
    candidate = outputs.get("rollout", outputs) if isinstance(outputs, Mapping) else outputs
    if isinstance(candidate, Mapping):
        fields = {k: candidate[k] for k in _ROLLOUT_KEYS if k in candidate}
    elif hasattr(candidate, "completions"):
        fields = {k: getattr(candidate, k) for k in _ROLLOUT_KEYS if hasattr(candidate, k)}
    else:
        return None
    completions = fields.get("completions")
    if not isinstance(completions, Sequence) or not all(isinstance(c, str) for c in completions):
        return None  # e.g. a rollout of token tensors: no text to read
    return TextRollout(completions=list(completions), prompts=list(fields.get("prompts") or []),
                       references=fields.get("references"), rewards=dict(fields.get("rewards") or {}),
                       advantages=fields.get("advantages"), group_size=int(fields.get("group_size") or 1))


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
