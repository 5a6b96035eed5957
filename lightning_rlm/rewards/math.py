"""Math-answer rewards for RL on GSM8K-style data.

The reference answer reaches a reward as a keyword list (one entry per completion) from the prompt's jsonl
row, e.g. GSM8K's `answer` field ("... #### 18"); a bare number ("18", 18) works as well. Both sides are read
with :func:`extract_answer` (the `#### n` / boxed / "answer is" / last-number
cascade, normalised so `1,000` == `1000` and `3.50` == `3.5`), the same grading as the GSM8K evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

from lightning_rlm.rewards.text import Reward

# A number: optional sign (not right after a word character, so "16-3" is 16 and 3), optional `$`,
# digits with thousands commas ("1,000") or plain digits, optional decimals; ".5" too.
NUMBER_RE = re.compile(
    r"(?:(?<![\w)])(?P<sign>[-−]))?\s*\$?\s*(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_HASHES_RE = re.compile(r"####")
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)


def normalize_number(text: str) -> Optional[str]:
    """A number's canonical string: no `$`, commas, `+` or trailing zeros; None if `text` is not a number.

    >>> [normalize_number(s) for s in ["1,000", "$3.50", "-7.0", "0.50", "18.", ".5", "-0", "x"]]
    ['1000', '3.5', '-7', '0.5', '18', '0.5', '0', None]
    """
    s = text.strip().replace(",", "").replace("$", "").replace("−", "-").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d, "f").rstrip("0").rstrip(".")


def _numbers(text: str) -> list[str]:
    out = []
    for m in NUMBER_RE.finditer(text):
        n = normalize_number((m.group("sign") or "") + m.group("num"))
        if n is not None:
            out.append(n)
    return out


def extract_answer(text: str) -> Optional[str]:
    """The final numeric answer in `text`, normalised (see the module docstring), or None if it has none.

    >>> extract_answer("She makes 9 * 2 = $18 every day.\\n#### 18")
    '18'
    >>> extract_answer("So the answer is $1,250.00.")
    '1250'
    >>> extract_answer("The total is 3 + 4 = 7.") , extract_answer("no number here")
    ('7', None)
    """
    hashes = list(_HASHES_RE.finditer(text))
    if hashes:
        found = _numbers(text[hashes[-1].end() :])
        if found:
            return found[0]
    boxed = _BOXED_RE.findall(text)
    if boxed:
        found = _numbers(boxed[-1])
        if found:
            return found[0]
    answer_is = list(_ANSWER_IS_RE.finditer(text))
    if answer_is:
        found = _numbers(text[answer_is[-1].end() :])
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


# one number on the marker's line: sign, `$`, thousands commas, decimals
_LINE_NUMBER = r"[-−]?[ \t]*\$?[ \t]*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


class GSM8KCorrect(Reward):
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


class GSM8KFormat(Reward):
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
