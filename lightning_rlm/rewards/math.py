"""Math-answer rewards for RL on GSM8K-style data.

The reference answer reaches a reward as a keyword list (one entry per completion) from the prompt's jsonl
row, e.g. GSM8K's `answer` field ("... #### 18"); a bare number ("18", 18) works as well. Both sides are read
with :func:`lightning_rlm.tasks.gsm8k.extract_answer` (the `#### n` / boxed / "answer is" / last-number
cascade, normalised so `1,000` == `1000` and `3.50` == `3.5`), the same grading as the GSM8K evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_rlm.tasks.gsm8k import extract_answer

# one number on the marker's line: sign, `$`, thousands commas, decimals
_LINE_NUMBER = r"[-−]?[ \t]*\$?[ \t]*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


class GSM8KCorrect:
    """1.0 when a completion's final number equals the reference's, else 0.0 (also when either has none).

    >>> GSM8KCorrect()(["p", "p", "p"], ["So 9 * 2 = 18.\\n#### 18", "#### 17", "no idea"],
    ...                answer=["... #### 18", "18", "18"])
    [1.0, 0.0, 0.0]
    """

    def __init__(self, answer_field: str = "answer") -> None:
        self.answer_field = answer_field
        self.name = "gsm8k_correct"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        if self.answer_field not in fields:
            raise ValueError(
                f"{self.name}: no {self.answer_field!r} field reached the reward (fields: "
                f"{sorted(k for k in fields if k != 'tokenizer')}); give the prompts' jsonl rows a "
                f"{self.answer_field!r} field or set answer_field"
            )
        refs = fields[self.answer_field]
        if len(refs) != len(completions):
            raise ValueError(f"{self.name}: {len(refs)} references for {len(completions)} completions")
        out = []
        for completion, ref in zip(completions, refs):
            gold, pred = extract_answer(str(ref)), extract_answer(completion)
            out.append(float(gold is not None and pred == gold))
        return out

    def __repr__(self) -> str:
        return f"GSM8KCorrect(answer_field={self.answer_field!r})"


class GSM8KFormat:
    """1.0 when a completion has a final-answer line, `marker` followed by a number and nothing else
    ("#### 42"), else 0.0. A format reward to add to :class:`GSM8KCorrect` with a small weight.

    >>> GSM8KFormat()(["p", "p", "p"], ["Work.\\n#### 1,000", "the answer is 5", "#### five"])
    [1.0, 0.0, 0.0]
    """

    def __init__(self, marker: str = "####") -> None:
        if not marker:
            raise ValueError("marker must be a non-empty string")
        self.marker = marker
        self.name = "gsm8k_format"
        self._line = re.compile(rf"^[ \t]*{re.escape(marker)}[ \t]*{_LINE_NUMBER}[ \t.]*$", re.MULTILINE)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        return [float(bool(self._line.search(c))) for c in completions]

    def __repr__(self) -> str:
        return f"GSM8KFormat(marker={self.marker!r})"
