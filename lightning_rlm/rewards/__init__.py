"""Reward functions: callables ``(prompts, completions, **fields) -> list[float]``, one float per completion."""

from lightning_rlm.rewards.code import CodeGrade, CodeTests, extract_code
from lightning_rlm.rewards.math import GSM8KCorrect, GSM8KFormat
from lightning_rlm.rewards.sandbox import ExecResult, Sandbox
from lightning_rlm.rewards.text import (
    KeywordCount,
    Reward,
    RewardFn,
    SentenceLength,
    WeightedSum,
    default_rewards,
    load_reward,
    reward_name,
    split_sentences,
    with_task_rewards,
)

__all__ = [
    "CodeGrade",
    "CodeTests",
    "ExecResult",
    "GSM8KCorrect",
    "GSM8KFormat",
    "KeywordCount",
    "Reward",
    "RewardFn",
    "Sandbox",
    "SentenceLength",
    "WeightedSum",
    "default_rewards",
    "extract_code",
    "load_reward",
    "reward_name",
    "split_sentences",
    "with_task_rewards",
]
