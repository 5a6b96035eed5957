"""GSM8K: grade-school math word problems, answered by generation and graded by the final number.

Algorithm: greedy generation up to `max_new_tokens` (stopping at EOS, the chat end-of-turn token and, after
the fact, at the stop strings), then :func:`extract_answer` takes the final number of the completion and it
must equal the reference's number exactly after normalisation (:func:`normalize_number`: no commas or `$`,
`3.50` == `3.5`, `7.0` == `7`).

Extraction (:func:`lightning_rlm.rewards.math.extract_answer`, shared with the `GSM8KCorrect` reward), in
order (the first rule that finds a number wins):

1. the number right after the last `####` (GSM8K's own answer format, as the few-shot answers show);
2. the number in the last `\\boxed{...}`;
3. the first number after the last "answer is" / "answer:" (case-insensitive);
4. the last number in the text.

Departures from lm-eval-harness's `gsm8k` task: it grades with a strict `#### n` regex and a separate
"flexible" last-number regex; here one cascade (above) is the grade, which is the flexible reading for
chat models that do not write `####`. Few-shot answers drop GSM8K's `<<48/2=24>>` calculator annotations,
and the shots are one seeded draw from the train file shared by every question (see `tasks.base`).
Fractions (`3/4`) are not parsed as one number; GSM8K's answers are integers.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from lightning_rlm.rewards.math import extract_answer
from lightning_rlm.tasks.base import Example, GenerationTask

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


class GSM8K(GenerationTask):
    """GSM8K by greedy generation and exact match of the final number.

    Args:
        path: the problems (default: the test split under the data roots).
        name: metric name.
        template: the question's text, with `{question}`.
        chat: render prompts through the tokenizer's chat template (one user turn).
        num_fewshot: worked train problems before the question (their answers end with `#### n`).
        fewshot_path: where shots come from (default the train split).
        fewshot_seed: seed of the shot draw.
        max_new_tokens: the generation budget.
        stop: strings that end an answer (default: "Question:", where a base model starts the next problem).
        question_field, answer_field: the jsonl fields (GSM8K's `question`, and `answer` ending with
            `#### n`).
    """

    def __init__(
        self,
        path: str = "gsm8k/test.jsonl",
        name: Optional[str] = "gsm8k",
        fewshot_path: Optional[str] = "gsm8k/train.jsonl",
        stop: Optional[list[str]] = None,
        question_field: str = "question",
        answer_field: str = "answer",
        **kwargs: Any,
    ) -> None:
        stop = ["Question:"] if stop is None else stop
        super().__init__(path, name=name, fewshot_path=fewshot_path, stop=stop, **kwargs)
        self.question_field = question_field
        self.answer_field = answer_field

    def make_example(self, index: int, row: dict[str, Any], where: str) -> Example:
        for f in (self.question_field, self.answer_field):
            if f not in row:
                raise ValueError(f"{where}: no field {f!r} (fields: {sorted(row)})")
        gold = extract_answer(str(row[self.answer_field]))
        if gold is None:
            raise ValueError(f"{where}: no number in the answer {str(row[self.answer_field])[-60:]!r}")
        return Example(index=index, question=str(row[self.question_field]), gold=gold, row=row)

    def format_shot(self, example: Example) -> str:
        worked = _CALCULATOR_RE.sub("", str(example.row[self.answer_field])).strip()
        return f"{self.format_question(example)} {worked}"

    def extract(self, completion: str) -> Optional[str]:
        return extract_answer(completion)
