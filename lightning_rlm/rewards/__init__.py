"""Reward functions: callables ``(prompts, completions, **fields) -> list[float]``, one float per completion."""

from lightning_rlm.rewards.text import (
    KeywordCount,
    RewardFn,
    SentenceLength,
    WeightedSum,
    load_reward,
    reward_name,
    split_sentences,
)

__all__ = [
    "KeywordCount",
    "RewardFn",
    "SentenceLength",
    "WeightedSum",
    "load_reward",
    "reward_name",
    "split_sentences",
]
