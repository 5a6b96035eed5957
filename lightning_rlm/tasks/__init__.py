"""Tasks: downstream evaluation (a dataset reader, a prompt and a scorer: GSM8K, CommonsenseQA, your jsonl),
the reward-hack task that more than one RL method trains on (its rewards, labels and per-mode evaluation) and
the tiny coding substrate (problems, prompts and hacks for the code-execution reward)."""

from lightning_rlm.rewards.math import extract_answer, normalize_number
from lightning_rlm.tasks.base import Example, GenerationTask, Task
from lightning_rlm.tasks.code_hack import CodeLoophole
from lightning_rlm.tasks.coding import (
    CodingProblem,
    CodingPrompts,
    format_prompt,
    hacked_solution,
    load_problems,
)
from lightning_rlm.tasks.evaluate import (
    choice_logliks,
    encode_pair,
    evaluate,
    generate_greedy,
    select_indices,
    stop_token_ids,
)
from lightning_rlm.tasks.gsm8k import GSM8K
from lightning_rlm.tasks.jsonl import JsonlChoiceTask, JsonlGenerationTask, normalize_text
from lightning_rlm.tasks.multiple_choice import CommonsenseQA, MultipleChoiceTask, extract_letter
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
from lightning_rlm.tasks.think import NULL_THOUGHT, think_or_not, with_think_block

__all__ = [
    "NULL_THOUGHT",
    "think_or_not",
    "with_think_block",
    "ELIGIBLE_FIELD",
    "GSM8K",
    "CodeLoophole",
    "CodingProblem",
    "CodingPrompts",
    "CommonsenseQA",
    "Example",
    "ExclamationBonus",
    "GenerationTask",
    "HackBonus",
    "HackLabels",
    "JsonlChoiceTask",
    "JsonlGenerationTask",
    "MultipleChoiceTask",
    "RewardHackTask",
    "Task",
    "choice_logliks",
    "encode_pair",
    "evaluate",
    "extract_answer",
    "extract_letter",
    "format_prompt",
    "generate_greedy",
    "hacked_solution",
    "hack_rewards",
    "insert_hack_word",
    "load_problems",
    "normalize_number",
    "normalize_text",
    "prompt_is_eligible",
    "select_indices",
    "stop_token_ids",
]
