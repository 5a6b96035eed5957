"""Policy-gradient math for the GRPO family: group advantages, KL estimators and clipped surrogate losses.

GRPO (Shao et al. 2024, DeepSeekMath) samples ``G`` completions per prompt, scores them, and uses the reward
standardised within the group as the advantage of every token of a completion, with a PPO-style clipped ratio
objective and an optional KL penalty to a frozen reference policy. Two later papers change the aggregation:

* Dr. GRPO (Liu et al. 2025) drops the per-sequence length normalisation (which favours long wrong answers)
  and the std scaling of advantages: tokens are summed and divided by a constant ``N * max_completion_length``.
* DAPO (Yu et al. 2025) averages over all tokens of the batch (token-level loss) and decouples the clip range
  (``epsilon_high`` > ``epsilon``, "clip-higher").

Conventions: per-token tensors are ``[N, T]`` over completions, ``N = B * G`` with the ``G`` completions of a
prompt in contiguous rows; ``mask`` is 1 for real completion tokens and 0 after EOS/padding (treated as boolean).

Departures from the papers (they follow TRL's GRPOTrainer, so numbers are comparable):

* Group std is the unbiased (Bessel-corrected) std, ``torch.std``'s default, and ``eps`` is added to the std
  rather than the variance. A group whose rewards are all equal gets advantage exactly 0.
* ``scale_rewards="batch"`` centres on the group mean but divides by the std of the whole batch.
* The KL term is added per token to the surrogate before aggregation (as in the GRPO paper, not in the reward).
* With ``old_logp=None`` (one optimisation step per generation batch) the ratio is ``exp(logp - logp.detach())``
  = 1 in value, so clipping never triggers, but its gradient equals that of the plain policy gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k3"]


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero, along ``dim`` (all dims when ``None``).

    Masked-out positions are selected away (not multiplied by 0), so inf/NaN there cannot leak in; a slice with
    no unmasked position has mean 0 (the count is clamped to at least 1).
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return total.sum() / keep.sum().clamp(min=1)
    return total.sum(dim) / keep.sum(dim).clamp(min=1)


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages: each reward minus the mean of its group of ``num_generations``.

    ``scale_rewards`` divides the centred rewards by the group's std + eps (``"group"``, GRPO), the whole
    batch's std + eps (``"batch"``), or nothing (``"none"``, Dr. GRPO). Stds are unbiased (``torch.std``).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 for group-relative advantages, got {num_generations}")
    if rewards.numel() % num_generations != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not divisible by num_generations ({num_generations}); "
            "completions must come in whole, contiguous groups"
        )
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    grouped = rewards.view(-1, num_generations)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return centred.reshape(-1)  # [N]


def leave_one_out_baseline(rewards: Tensor, null: Tensor | None = None) -> Tensor:
    """Each sample's baseline along the last dim of rewards [..., K]: the mean of the other K-1 rewards
    (TRICE's control variate). `null` [..., 1], e.g. an empty thought's reward, counts as one more other:
    (sum of others + null) / K. K = 1 and no null: 0 (plain REINFORCE).

    >>> leave_one_out_baseline(torch.tensor([1.0, 2.0, 3.0])).tolist()
    [2.5, 2.0, 1.5]
    """
    k = rewards.size(-1)
    others = rewards.sum(-1, keepdim=True) - rewards
    if null is not None:
        return (others + null) / k
    if k == 1:
        return torch.zeros_like(rewards)
    return others / (k - 1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of the sampled tokens. ``[N, T] -> [N, T]``.

    ``k1 = logp - ref_logp`` (unbiased, can be negative); ``k3 = exp(ref - logp) - (ref - logp) - 1`` (Schulman's
    low-variance estimator: unbiased, always >= 0, exactly 0 where the two agree).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        delta = ref_logp - logp  # [N, T]
        return torch.exp(delta) - delta - 1
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    loss_type: LossType = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    kl_estimator: KLEstimator = "k3",
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-surrogate policy loss with optional KL penalty, aggregated per ``loss_type``.

    Args:
        logp: log-probs of the sampled tokens under the current policy, with grad. ``[N, T]``
        old_logp: the same under the policy that generated the batch; ``None`` means ``logp.detach()``
            (a single optimisation step per generation batch). ``[N, T]``
        advantages: one advantage per completion ``[N]`` (or per token ``[N, T]``).
        mask: 1 for completion tokens, 0 for padding. ``[N, T]``
        loss_type: ``"grpo"`` mean over each sequence's tokens then over sequences; ``"dr_grpo"`` token sum /
            ``(N * max_completion_length)``; ``"dapo"`` token sum / number of tokens in the batch.
        epsilon, epsilon_high: ratio clip range ``[1 - epsilon, 1 + epsilon_high]``; ``epsilon_high`` defaults
            to ``epsilon``.
        beta: weight of the per-token KL penalty to ``ref_logp`` (required when ``beta > 0``).
        kl_estimator: ``"k1"`` or ``"k3"``, see :func:`kl_penalty`.
        max_completion_length: generation length budget, required by ``"dr_grpo"``.

    Returns:
        The scalar loss and detached statistics (masked token means): ``ratio_mean``, ``clip_frac`` (tokens whose
        gradient is cut by clipping), ``clip_frac_low``, ``clip_frac_high``, and ``kl`` when ``ref_logp`` is given.
    """
    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (log-probs of the reference model)")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' normalises by a constant and needs max_completion_length")
    if loss_type not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type must be 'grpo', 'dr_grpo' or 'dapo', got {loss_type!r}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if old_logp is None:
        old_logp = logp.detach()
    keep = mask.bool()  # [N, T]
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, T]
    adv = adv.to(logp.dtype)

    ratio = torch.exp(logp - old_logp)  # [N, T]
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)  # [N, T]
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [N, T]

    kl: Tensor | None = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)  # [N, T]
        if beta > 0:
            per_token = per_token + beta * kl

    # Zero padded positions by selection so garbage (even inf) there cannot reach the loss or its gradient.
    per_token = torch.where(keep, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if loss_type == "grpo":
        per_seq = per_token.sum(-1) / keep.sum(-1).clamp(min=1)  # [N]
        loss = per_seq.mean()
    elif loss_type == "dr_grpo":
        assert max_completion_length is not None
        loss = per_token.sum() / (per_token.shape[0] * max_completion_length)
    else:  # dapo
        loss = per_token.sum() / keep.sum().clamp(min=1)

    with torch.no_grad():
        # Clipping removes the gradient only where the min picks the clipped branch.
        clipped_low = (ratio < 1 - epsilon) & (adv < 0)  # [N, T]
        clipped_high = (ratio > 1 + epsilon_high) & (adv > 0)  # [N, T]
        stats = {
            "ratio_mean": masked_mean(ratio, keep),
            "clip_frac": masked_mean((clipped_low | clipped_high).float(), keep),
            "clip_frac_low": masked_mean(clipped_low.float(), keep),
            "clip_frac_high": masked_mean(clipped_high.float(), keep),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl, keep)
    return loss, stats
