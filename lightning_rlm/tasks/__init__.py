"""Tasks that more than one method trains on: their rewards, labels and per-mode evaluation."""

from lightning_rlm.tasks.reward_hack import (
    ELIGIBLE_FIELD,
    ExclamationBonus,
    HackBonus,
    HackLabels,
    RewardHackTask,
    hack_rewards,
    insert_hack_word,
    prompt_is_eligible,
)

__all__ = ["ELIGIBLE_FIELD", "ExclamationBonus", "HackBonus", "HackLabels", "RewardHackTask", "hack_rewards",
           "insert_hack_word", "prompt_is_eligible"]
