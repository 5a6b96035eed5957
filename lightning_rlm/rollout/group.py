"""One scored GRPO rollout batch: what the training step's hooks share (:class:`~lightning_rlm.methods.grpo.GRPO`),
and its per-step metrics under TRL's GRPOTrainer names (README: "Logged names") plus this framework's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_rlm.metrics.text import DegenerateFlag, GroupJaccard
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

    def reward_metrics(self) -> dict[str, Tensor]:
        """The total reward's mean, its mean within-group std (TRL's ``reward_std``) and the share of groups
        with one reward for all (no signal), and each reward term's mean and std."""
        total = self.rewards["total"]  # [N]
        group_std = total.view(-1, self.rollout.num_generations).std(dim=1)  # [B]
        out = {"reward": total.mean(), "reward_std": group_std.mean(),
               "frac_reward_zero_std": (group_std < 1e-6).float().mean()}
        for name, values in self.rewards.items():
            if name != "total":
                out |= {f"rewards/{name}/mean": values.mean(), f"rewards/{name}/std": values.std()}
        return out

    def completion_metrics(self) -> dict[str, Tensor]:
        """Completion lengths, the share cut at max_completion_length, the within-group token Jaccard and the
        share of degenerate (looping) completions."""
        rollout, mask = self.rollout, self.rollout.completion_mask.bool()  # [N, C]
        lengths = rollout.completion_lengths.float()  # [N]
        ids = [row[m].tolist() for row, m in zip(rollout.completion_ids, mask)]
        return {"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                "completions/max_length": lengths.max(),
                "completions/clipped_ratio": rollout.is_clipped.float().mean(),  # hit max_completion_length
                "jaccard": GroupJaccard(rollout.num_generations)(ids),
                "degenerate": DegenerateFlag(min_sentences=2.0)(self.completions)}

    def teacher_metrics(self) -> dict[str, Tensor]:
        """With teacher mixing: the teacher's share of the batch, reward and advantage of teacher vs student
        samples, and the share of hacks among the teacher's rows."""
        if self.teacher is None:
            return {}
        teacher, total = self.teacher, self.rewards["total"]  # [N] each
        out = {"teacher_frac": teacher.float().mean()}
        for side, sel in (("teacher", teacher), ("student", ~teacher)):
            if sel.any():
                out |= {f"reward_{side}": total[sel].mean(), f"advantage_{side}": self.advantages[sel].mean()}
        if self.teacher_kinds is not None and teacher.any():
            hacks = [k.startswith("hack:") for k, t in zip(self.teacher_kinds, teacher.tolist()) if t]
            out["teacher_hack_frac"] = torch.tensor(sum(hacks) / len(hacks))
        return out
