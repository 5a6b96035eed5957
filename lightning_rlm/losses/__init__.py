"""Loss functions (pure torch): GRPO-family policy losses, KL estimators and log-prob helpers."""

from lightning_rlm.losses.policy import (
    KLEstimator,
    LossType,
    ScaleRewards,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    selective_log_softmax,
)

__all__ = [
    "KLEstimator",
    "LossType",
    "ScaleRewards",
    "entropy_from_logits",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
    "selective_log_softmax",
]
