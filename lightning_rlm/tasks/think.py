"""Seed 001's "think or not" probe: does the model answer better after thinking than after declining to?

For every example the answer is preceded by a `<think>` block, two ways:

    thought:  prompt + "<think>\\n" + <the model's own greedy thought, up to `think_tokens` or "</think>">
              + "\\n</think>\\n"
    null:     prompt + "<think>\\n" + null_thought + "\\n</think>\\n"      ("I will stick with my default
                                                                           distribution", the seed's text)

and then the task is scored as usual on the extended prompt (GSM8K: greedy generation; multiple choice:
the likelihood of each answer, or the generated letter). The probe reports the accuracy both ways, the
fraction of examples whose prediction the thought changed, and how often a change fixed or broke an answer.
The block is plain text appended to the rendered prompt (after the chat template's assistant header when the
task has `chat`), so it works for any causal LM; SmolLM2 has no trained `<think>` token, so the tags are
ordinary text to it. Departure from the seed: the seed's "think or not" is a learned per-position choice
(Quiet-STaR's mixing head); this prompt-level probe asks the same question of any model without training.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from lightning_rlm.tasks.base import Example, Task
from lightning_rlm.tasks.evaluate import evaluate, generate_greedy, select_indices

NULL_THOUGHT = "I will stick with my default distribution"
OPEN, CLOSE = "<think>\n", "\n</think>\n"

__all__ = ["NULL_THOUGHT", "think_or_not", "with_think_block"]


def with_think_block(task: Task, blocks: dict[int, str]) -> Task:
    """A copy of `task` whose prompts end with `blocks[example.index]` (every other setting unchanged)."""
    probe = copy.copy(task)
    original = task.prompt

    def prompt(example: Example, tokenizer: Any, *args: Any, **kwargs: Any) -> str:
        return original(example, tokenizer, *args, **kwargs) + blocks[example.index]

    probe.prompt = prompt  # type: ignore[method-assign]
    return probe


def think_or_not(
    task: Task, model: nn.Module, tokenizer: Any, think_tokens: int = 128, null_thought: str = NULL_THOUGHT,
    **eval_args: Any,
) -> dict[str, Any]:
    """Accuracy after the model's own thought and after the null thought, on the same examples.

    Returns `{"task", "n", "accuracy_thought", "accuracy_null", "changed", "fixed", "broken", "records"}`:
    `changed` is the fraction of examples whose prediction differs between the two, `fixed` / `broken` the
    fractions where thinking turned a wrong answer right / a right one wrong; `records` pair each example's
    thought with both predictions. `eval_args` are :func:`evaluate`'s (`limit`, `seed`, `batch_size`,
    `scoring`, ...), the same for both scorings. Under DDP every rank generates the thoughts of all the examples
    (simple, redundant) and `evaluate` shards the scoring.
    """
    if think_tokens < 1:
        raise ValueError(f"think_tokens must be >= 1, got {think_tokens}")
    if "</think>" in null_thought:
        raise ValueError(f"null_thought must not close the block itself, got {null_thought!r}")
    limit, seed, scoring = eval_args.get("limit"), eval_args.get("seed", 0), eval_args.get("scoring")
    subset = select_indices(len(task), limit, seed)
    examples = [task.examples()[i] for i in subset]
    letter = scoring == "letter" or (scoring is None and getattr(task, "scoring", None) == "letter")
    kwargs = {"letter": True} if letter else {}
    prompts = [task.prompt(ex, tokenizer, **kwargs) + OPEN for ex in examples]
    raw = generate_greedy(model, tokenizer, prompts, think_tokens, eval_args.get("batch_size", 8),
                          add_special_tokens=task.chat is None)
    thoughts = {ex.index: text.split("</think>")[0].strip() for ex, text in zip(examples, raw)}
    runs = {}
    for name, blocks in (("thought", {i: OPEN + t + CLOSE for i, t in thoughts.items()}),
                         ("null", {i: OPEN + null_thought + CLOSE for i in thoughts})):
        runs[name] = evaluate(with_think_block(task, blocks), model, tokenizer, **eval_args)
    by_index = {name: {r["index"]: r for r in run["records"]} for name, run in runs.items()}
    records = []
    for i in sorted(by_index["thought"]):
        t, z = by_index["thought"][i], by_index["null"][i]
        records.append(dict(index=i, question=t["question"], thought=thoughts.get(i, ""), gold=t["gold"],
                            prediction_thought=t["prediction"], prediction_null=z["prediction"],
                            correct_thought=t["correct"], correct_null=z["correct"]))
    n = len(records)

    def share(pred: Any) -> float:
        return sum(1 for r in records if pred(r)) / n if n else 0.0

    return {
        "task": task.name,
        "n": n,
        "accuracy_thought": runs["thought"]["accuracy"],
        "accuracy_null": runs["null"]["accuracy"],
        "changed": share(lambda r: r["prediction_thought"] != r["prediction_null"]),
        "fixed": share(lambda r: r["correct_thought"] and not r["correct_null"]),
        "broken": share(lambda r: r["correct_null"] and not r["correct_thought"]),
        "records": records,
    }
