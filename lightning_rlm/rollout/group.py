"""One scored GRPO rollout batch: what the training step's hooks share (:class:`~lightning_rlm.methods.grpo.GRPO`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from lightning_rlm.rollout.generate import Rollout

__all__ = ["GroupBatch"]


@dataclass
class GroupBatch:
    """One scored rollout of a prompt batch (``N = B * G`` rows) and what the inner iterations reuse."""

    batch: dict[str, Any]  # the prompt batch, with any field the method added (e.g. rh_eligible)
    rollout: Rollout
    completions: list[str]
    rewards: dict[str, Tensor]  # name -> [N], plus "total"
    advantages: Tensor  # [N]
    generation_s: float
    ref_logp: Optional[Tensor] = None  # [N, C] under the reference (beta > 0)
    old_logp: Optional[Tensor] = None  # [N, C] under the sampling policy (num_iterations > 1)
    labels: Any = None  # the method's per-completion labels (e.g. the reward-hack task's)
    stats: dict[str, Any] = field(default_factory=dict)  # what after_backward measured, for log_extra
    teacher: Optional[Tensor] = None  # [N] bool: rows drawn from the teacher pool (teacher_fraction > 0)
    teacher_kinds: Optional[list[str]] = None  # [N] the pool kind of each row ("student" for sampled rows)
