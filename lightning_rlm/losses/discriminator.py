"""GAN-RL's discriminator losses and generator rewards (pure torch).

The head discriminator (:func:`discriminator_stats`) is a 2-way classifier trained with cross-entropy,
generated = class 0, ground truth = class 1; its P(ground truth) on a generated completion is the generator's
``"prob"`` reward (:func:`gan_rewards`, which adds the length term ``length_weight · min(len, target) / target``).

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

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rlm.checks import check_at_least

__all__ = [
    "RewardForm",
    "discriminator_stats",
    "gan_rewards",
    "judge_correct",
    "reasoning_discriminator_stats",
    "reinforce_with_value",
    "value_threshold_reward",
]

RewardForm = Literal["prob", "value_threshold"]


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


def gan_rewards(
    d_prob: Tensor,
    lengths: Tensor,
    *,
    form: RewardForm = "prob",
    target_length: int,
    length_weight: float = 0.5,
    threshold: float = 0.125,
    d_value: Optional[Tensor] = None,
) -> Tensor:
    """Generator rewards ``[B]`` from the discriminator's P(ground truth) ``d_prob [B]`` and lengths ``[B]``.

    ``"prob"``: ``d_prob``. ``"value_threshold"``: with ``d_value`` the discriminator's probability of being
    right about this generated sample (default ``1 − d_prob``; the reasoning discriminator's value head gives
    its own), ``1 − d_value`` if ``d_value > threshold`` else 0. Both plus
    ``length_weight · min(length, target_length) / target_length``.
    """
    check_at_least(1, target_length=target_length)
    d_prob = d_prob.float()
    if form == "prob":
        base = d_prob  # [B]
    elif form == "value_threshold":
        base = value_threshold_reward(1.0 - d_prob if d_value is None else d_value, threshold)  # [B]
    else:
        raise ValueError(f"reward must be 'prob' or 'value_threshold', got {form!r}")
    length_term = lengths.float().clamp(max=target_length) / target_length  # [B]
    return base + length_weight * length_term  # [B]


def discriminator_stats(logits_gen: Tensor, logits_real: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of the discriminator (generated = class 0, ground truth = class 1) and its statistics.

    Args:
        logits_gen: ``[B, 2]`` logits on prefix + generated completion.
        logits_real: ``[B', 2]`` logits on prefix + ground-truth completion.

    Returns:
        The mean cross-entropy over the ``B + B'`` inputs, and detached ``d_acc_generated``, ``d_acc_real``,
        ``d_prob_generated`` (mean P(ground truth) on generated) and ``d_prob_real``.
    """
    logits = torch.cat([logits_gen, logits_real]).float()  # [B+B', 2]
    labels = torch.cat([
        torch.zeros(logits_gen.shape[0], dtype=torch.long, device=logits.device),
        torch.ones(logits_real.shape[0], dtype=torch.long, device=logits.device),
    ])  # [B+B']
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        p_gen = logits_gen.float().softmax(-1)[:, 1]  # [B]
        p_real = logits_real.float().softmax(-1)[:, 1]  # [B']
        stats = {
            "d_acc_generated": (p_gen < 0.5).float().mean(),
            "d_acc_real": (p_real >= 0.5).float().mean(),
            "d_prob_generated": p_gen.mean(),
            "d_prob_real": p_real.mean(),
        }
    return loss, stats


def reasoning_discriminator_stats(
    said_real: Tensor,
    p_real: Tensor,
    action_logp: Tensor,
    value: Tensor,
    reasoning_lengths: Tensor,
    value_coeff: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The reasoning discriminator's loss and statistics on ``2B`` inputs, the B generated completions first,
    then their B ground truths.

    Args:
        said_real: ``[2B]`` bool, its sampled answers ("real").
        p_real: ``[2B]`` P(answer "real"), detached.
        action_logp: ``[2B]`` summed log-probs of its reasoning (incl. its EOS) and answer, with grad.
        value: ``[2B]`` the value head's estimate of its chance of being right, with grad.
        reasoning_lengths: ``[2B]`` reasoning tokens before EOS.
        value_coeff: weight of the value's squared error.

    Returns:
        ``pg_loss + value_coeff · value_loss`` (:func:`reinforce_with_value` on :func:`judge_correct`) and the
        detached ``d_acc_*``, ``d_prob_*``, ``d_value_*`` (``generated`` / ``real``), ``d_reasoning_length``
        (also ``/generated`` and ``/real``), ``d_pg_loss`` and ``d_value_loss``.
    """
    b = said_real.shape[0] // 2
    is_real = torch.arange(2 * b, device=said_real.device) >= b  # [2B]: generated first, then ground truths
    correct = judge_correct(said_real, is_real)  # [2B]
    pg_loss, value_loss, _ = reinforce_with_value(action_logp, value, correct)
    d_value = value.detach()  # [2B]
    lengths = reasoning_lengths.float()  # [2B]
    stats = {
        "d_acc_generated": correct[:b].mean(), "d_acc_real": correct[b:].mean(),
        "d_prob_generated": p_real[:b].mean(), "d_prob_real": p_real[b:].mean(),
        "d_value_generated": d_value[:b].mean(), "d_value_real": d_value[b:].mean(),
        "d_reasoning_length": lengths.mean(), "d_reasoning_length/generated": lengths[:b].mean(),
        "d_reasoning_length/real": lengths[b:].mean(),
        "d_pg_loss": pg_loss.detach(), "d_value_loss": value_loss.detach(),
    }
    return pg_loss + value_coeff * value_loss, stats
