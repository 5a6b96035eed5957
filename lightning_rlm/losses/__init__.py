"""Loss functions (pure torch): GRPO-family policy losses, KL estimators, log-prob helpers and GAN-RL's
reasoning-discriminator loss."""

from lightning_rlm.losses.discriminator import judge_correct, reinforce_with_value, value_threshold_reward
from lightning_rlm.losses.kl import (
    RMSE_EPS,
    KLAggregate,
    KLDirection,
    aggregate_kl,
    fp32_log_softmax,
    kl_barrier,
    per_position_kl,
)
from lightning_rlm.losses.policy import (
    KLEstimator,
    LossType,
    ScaleRewards,
    group_advantages,
    kl_penalty,
    leave_one_out_baseline,
    masked_mean,
    policy_loss,
)

__all__ = [
    "KLEstimator",
    "LossType",
    "ScaleRewards",
    "group_advantages",
    "kl_penalty",
    "leave_one_out_baseline",
    "masked_mean",
    "policy_loss",
    "KLAggregate",
    "KLDirection",
    "RMSE_EPS",
    "aggregate_kl",
    "fp32_log_softmax",
    "kl_barrier",
    "per_position_kl",
    "judge_correct",
    "reinforce_with_value",
    "value_threshold_reward",
]
