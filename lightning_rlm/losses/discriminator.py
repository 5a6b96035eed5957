"""The reasoning discriminator's loss and the seed's value-threshold generator reward (pure torch).

Seed 000 (crumb, 02/26/2026), before its discriminator was a linear head: the discriminator is a generation
task (it reads a prefix and a completion, may reason, then answers "real" or "generated") trained by
REINFORCE on being right, with a value function as its baseline. The generator's reward borrows Absolute
Zero's proposer reward (``1 − solver pass-rate`` if the pass-rate is above zero, else 0) with the value as
the pass-rate: ``(1 − d_value) if d_value > t else 0``, ``t = 1/8`` simulating 8 attempts of which fewer than
one would fail.

Conventions: ``[N]`` tensors over the discriminator's inputs; ``d_value`` is the value head's estimate of the
discriminator's chance of being right about an input (its "pass rate").
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["judge_correct", "reinforce_with_value", "value_threshold_reward"]


def value_threshold_reward(d_value: Tensor, threshold: float = 0.125) -> Tensor:
    """``1 − d_value`` where ``d_value > threshold``, else 0 (``[N]``, fp32)."""
    d_value = d_value.float()
    return torch.where(d_value > threshold, 1.0 - d_value, torch.zeros_like(d_value))


def judge_correct(said_real: Tensor, is_real: Tensor) -> Tensor:
    """The discriminator's reward ``[N]``: 1.0 where its answer (``said_real``, bool) matches the truth
    (``is_real``, bool: the completion is the ground truth), else 0.0."""
    return (said_real.bool() == is_real.bool()).float()


def reinforce_with_value(seq_logp: Tensor, value: Tensor, reward: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """REINFORCE with a learned baseline.

    Args:
        seq_logp: ``[N]`` summed log-probs of the discriminator's actions (reasoning tokens and its answer),
            with grad.
        value: ``[N]`` the value head's estimate of ``reward`` (with grad; detached in the advantage).
        reward: ``[N]`` rewards (here :func:`judge_correct`).

    Returns:
        ``pg_loss = mean(−(reward − value) · seq_logp)``, ``value_loss = mean((value − reward)²)`` and the
        detached advantages ``reward − value`` ``[N]``.
    """
    reward = reward.float()
    advantage = reward - value.detach().float()  # [N]
    pg_loss = (-advantage * seq_logp.float()).mean()
    value_loss = (value.float() - reward).pow(2).mean()
    return pg_loss, value_loss, advantage
