"""Downstream evaluation tasks: a dataset reader, a prompt and a scorer (GSM8K, CommonsenseQA, your jsonl)."""

from lightning_rlm.tasks.base import Example, GenerationTask, Task
from lightning_rlm.tasks.evaluate import (
    choice_logliks,
    encode_pair,
    evaluate,
    generate_greedy,
    select_indices,
    stop_token_ids,
)
from lightning_rlm.tasks.gsm8k import GSM8K, extract_answer, normalize_number
from lightning_rlm.tasks.jsonl import JsonlChoiceTask, JsonlGenerationTask, normalize_text
from lightning_rlm.tasks.multiple_choice import CommonsenseQA, MultipleChoiceTask, extract_letter

__all__ = [
    "GSM8K",
    "CommonsenseQA",
    "Example",
    "GenerationTask",
    "JsonlChoiceTask",
    "JsonlGenerationTask",
    "MultipleChoiceTask",
    "Task",
    "choice_logliks",
    "encode_pair",
    "evaluate",
    "extract_answer",
    "extract_letter",
    "generate_greedy",
    "normalize_number",
    "normalize_text",
    "select_indices",
    "stop_token_ids",
]
