"""The text side of a rollout: what RL methods return under ``"rollout"`` and evaluation callbacks read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["TextRollout"]


@dataclass
class TextRollout:
    """Completions grouped contiguously, ``group_size`` per prompt.

    ``prompts`` (and ``references``) hold one entry per completion or one per group; ``rewards`` maps a
    name to one value per completion (or per group); ``advantages`` is per completion, or None.
    """

    completions: list[str]
    prompts: list[str] = field(default_factory=list)
    references: Optional[list[str]] = None
    rewards: dict[str, list[float]] = field(default_factory=dict)
    advantages: Optional[list[float]] = None
    group_size: int = 1
