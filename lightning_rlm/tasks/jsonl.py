"""A user's own jsonl task, built from init args alone (so a YAML `class_path` + `init_args` runs it).

`JsonlGenerationTask` asks each row's question, generates greedily and grades by `match`:

* "number": the final number of the completion equals the answer's (GSM8K's extraction, `tasks.gsm8k`);
* "exact": the completion's first non-empty line equals the answer, case- and space-insensitive, ignoring
  surrounding quotes and trailing punctuation;
* "contains": the normalised answer occurs in the normalised completion.

`JsonlChoiceTask` is :class:`~lightning_rlm.tasks.multiple_choice.MultipleChoiceTask` (choices as a list or
as `{label, text}` lists; the answer as a label, an index or a choice's text).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from lightning_rlm.tasks.base import Example, GenerationTask
from lightning_rlm.tasks.gsm8k import extract_answer
from lightning_rlm.tasks.multiple_choice import MultipleChoiceTask

Match = Literal["number", "exact", "contains"]


def normalize_text(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding quotes and trailing punctuation dropped.

    >>> normalize_text('  "Paris."  ')
    'paris'
    """
    return re.sub(r"\s+", " ", text).strip().strip("\"'`").rstrip(".!?,;:").strip().lower()


class JsonlGenerationTask(GenerationTask):
    """Questions from a jsonl file answered by generation (see the module docstring).

    Args:
        path: the jsonl file.
        question_field: the question's field.
        answer_field: the reference answer's field (for `match="number"` its final number is the gold).
        match: how an answer is graded: "number", "exact" or "contains".
        name: metric name (default: the file's stem).
        template: the question's text, with `{question}`.
        answer_template: how a few-shot answer reads, with `{answer}` (the answer field as written).
        chat, num_fewshot, fewshot_path, fewshot_seed: as in :class:`~lightning_rlm.tasks.base.Task`.
        max_new_tokens, stop: as in :class:`~lightning_rlm.tasks.base.GenerationTask`.
    """

    def __init__(
        self,
        path: str,
        question_field: str = "question",
        answer_field: str = "answer",
        match: Match = "number",
        answer_template: str = " {answer}",
        max_new_tokens: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, max_new_tokens=max_new_tokens, **kwargs)
        if match not in ("number", "exact", "contains"):
            raise ValueError(f"match must be 'number', 'exact' or 'contains', got {match!r}")
        if "{answer}" not in answer_template:
            raise ValueError(f"answer_template must contain '{{answer}}', got {answer_template!r}")
        self.question_field = question_field
        self.answer_field = answer_field
        self.match: Match = match
        self.answer_template = answer_template

    def make_example(self, index: int, row: dict[str, Any], where: str) -> Example:
        for f in (self.question_field, self.answer_field):
            if f not in row:
                raise ValueError(f"{where}: no field {f!r} (fields: {sorted(row)})")
        answer = str(row[self.answer_field])
        gold = extract_answer(answer) if self.match == "number" else normalize_text(answer)
        if not gold:
            raise ValueError(f"{where}: the answer {answer[-60:]!r} gives no gold for match={self.match!r}")
        return Example(index=index, question=str(row[self.question_field]), gold=gold, row=row)

    def format_shot(self, example: Example) -> str:
        return self.format_question(example) + self.answer_template.replace(
            "{answer}", str(example.row[self.answer_field])
        )

    def extract(self, completion: str) -> Optional[str]:
        if self.match == "number":
            return extract_answer(completion)
        if self.match == "exact":
            line = next((s for s in completion.splitlines() if s.strip()), "")
            return normalize_text(line) or None
        return normalize_text(completion) or None

    def is_correct(self, prediction: Optional[str], example: Example) -> bool:
        if prediction is None:
            return False
        if self.match == "contains":
            return example.gold in prediction
        return prediction == example.gold


class JsonlChoiceTask(MultipleChoiceTask):
    """A user's multiple-choice jsonl task; the same args as :class:`MultipleChoiceTask`."""
