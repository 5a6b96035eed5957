"""Reward functions: callables ``(prompts, completions, **fields) -> list[float]``, one float per completion."""

from lightning_rlm.rewards.math import GSM8KCorrect, GSM8KFormat
from lightning_rlm.rewards.text import (
    KeywordCount,
    Reward,
    RewardFn,
    SentenceLength,
    WeightedSum,
    load_reward,
    reward_name,
    split_sentences,
)

__all__ = [
    "GSM8KCorrect",
    "GSM8KFormat",
    "KeywordCount",
    "Reward",
    "RewardFn",
    "SentenceLength",
    "WeightedSum",
    "load_reward",
    "reward_name",
    "split_sentences",
]
