"""Multiple choice by answer log-likelihood (cloze) or by generating the letter; CommonsenseQA.

Log-likelihood scoring (`scoring="mean"` or `"sum"`): the context is the prompt (shots, then
`template` = "Question: {question}\\nAnswer:", then the chat template when given) and each choice's
continuation is `choice_template` = " {choice}" (no leading space after a chat template's assistant header).
The pair is tokenized as lm-eval-harness does: the whole string `context + continuation` is encoded and the
continuation's tokens are those after the context's own encoding, so the continuation tokens are the natural
tokenization of the full text. For every choice

    sum  = sum_t log p(cont_t | context, cont_<t)        mean = sum / (number of continuation tokens)

and the prediction is the argmax (first on ties). Both accuracies are always reported; `scoring` says which
one is the headline `accuracy`. This is lm-eval-harness's cloze convention ("Question: ...\\nAnswer:" and the
" answer text"), chosen because the issue asks for the likelihood of each answer text; the departure is the
length normalisation, per token here (lm-eval's `acc_norm` divides by the continuation's byte length).

Letter scoring (`scoring="letter"`): the prompt lists the choices ("A. bank" ...) under `letter_template`,
the model generates a few tokens greedily, and the first standalone label in the completion (else the one
choice text it contains) is its answer; no answer counts as wrong.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from lightning_rlm.tasks.base import Example, Task

Scoring = Literal["mean", "sum", "letter"]
LETTER_TEMPLATE = "Question: {question}\n{choices}\nAnswer with the letter of the correct choice.\nAnswer:"


def extract_letter(text: str, labels: list[str], choices: Optional[list[str]] = None) -> Optional[str]:
    """The label a generated answer names: the first standalone label ("B", "(B)", "B."), else the label of
    the only choice text the answer contains (case-insensitive), else None.

    >>> extract_letter(" B. library", ["A", "B", "C"])
    'B'
    >>> extract_letter("It is the library.", ["A", "B"], ["bank", "library"])
    'B'
    >>> extract_letter("I am not sure", ["A", "B"], ["bank", "library"]) is None
    True
    """
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    m = re.search(rf"(?<![A-Za-z0-9])({alternatives})(?![A-Za-z0-9])", text)
    if m:
        return m.group(1)
    if choices:
        low = text.lower()
        hits = [label for label, c in zip(labels, choices) if c.strip() and c.strip().lower() in low]
        if len(hits) == 1:
            return hits[0]
    return None


class MultipleChoiceTask(Task):
    """A multiple-choice jsonl task scored by answer likelihood or by the generated letter.

    Args:
        path: the jsonl file.
        question_field: the question's field.
        choices_field: a list of answer texts, or a dict with `text` (and `label`) lists as in CommonsenseQA.
        answer_field: the correct choice: its label ("A"), its 0-based index (an int), or its text.
        name: metric name (default: the file's stem).
        template: the likelihood prompt, with `{question}` (`{choices}` may list the choices too).
        choice_template: each choice's continuation, with `{choice}` (default " {choice}"; "{choice}" with
            chat).
        letter_template: the prompt of letter scoring, with `{question}` and `{choices}`.
        scoring: the headline accuracy: "mean" (per-token mean log-likelihood), "sum", or "letter".
        letter_max_new_tokens: generation budget of letter scoring.
        chat, num_fewshot, fewshot_path, fewshot_seed: as in :class:`~lightning_rlm.tasks.base.Task`.
    """

    kind = "choice"

    def __init__(
        self,
        path: str,
        question_field: str = "question",
        choices_field: str = "choices",
        answer_field: str = "answer",
        choice_template: Optional[str] = None,
        letter_template: str = LETTER_TEMPLATE,
        scoring: Scoring = "mean",
        letter_max_new_tokens: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, **kwargs)
        if scoring not in ("mean", "sum", "letter"):
            raise ValueError(f"scoring must be 'mean', 'sum' or 'letter', got {scoring!r}")
        if choice_template is None:
            choice_template = "{choice}" if self.chat is not None else " {choice}"
        if "{choice}" not in choice_template:
            raise ValueError(f"choice_template must contain '{{choice}}', got {choice_template!r}")
        for slot in ("{question}", "{choices}"):
            if slot not in letter_template:
                raise ValueError(f"letter_template must contain {slot!r}, got {letter_template!r}")
        self.question_field = question_field
        self.choices_field = choices_field
        self.answer_field = answer_field
        self.choice_template = choice_template
        self.letter_template = letter_template
        self.scoring: Scoring = scoring
        self.letter_max_new_tokens = letter_max_new_tokens

    def make_example(self, index: int, row: dict[str, Any], where: str) -> Example:
        for f in (self.question_field, self.choices_field, self.answer_field):
            if f not in row:
                raise ValueError(f"{where}: no field {f!r} (fields: {sorted(row)})")
        raw = row[self.choices_field]
        if isinstance(raw, dict):
            if "text" not in raw:
                raise ValueError(f"{where}: {self.choices_field!r} is a dict without a 'text' list")
            choices = [str(c) for c in raw["text"]]
            labels = [str(x) for x in raw.get("label", [])] or None
        elif isinstance(raw, list):
            choices, labels = [str(c) for c in raw], None
        else:
            raise ValueError(f"{where}: {self.choices_field!r} must be a list or a dict with 'text'")
        if len(choices) < 2:
            raise ValueError(f"{where}: {len(choices)} choice(s); multiple choice needs at least 2")
        labels = labels or [chr(ord("A") + i) for i in range(len(choices))]
        if len(labels) != len(choices):
            raise ValueError(f"{where}: {len(labels)} labels for {len(choices)} choices")
        answer = row[self.answer_field]
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            gold_index = answer
        elif str(answer).strip() in labels:
            gold_index = labels.index(str(answer).strip())
        elif str(answer).strip() in choices:
            gold_index = choices.index(str(answer).strip())
        else:
            raise ValueError(f"{where}: answer {answer!r} is neither a label {labels}, an index nor a choice")
        return Example(
            index=index,
            question=str(row[self.question_field]),
            gold=labels[gold_index],
            choices=choices,
            labels=labels,
            gold_index=gold_index,
            row=row,
        )

    def listed_choices(self, example: Example) -> str:
        return "\n".join(f"{label}. {c}" for label, c in zip(example.labels, example.choices))

    def format_question(self, example: Example, letter: bool = False) -> str:
        template = self.letter_template if letter else self.template
        return template.replace("{choices}", self.listed_choices(example)).replace(
            "{question}", example.question.strip()
        )

    def continuation(self, choice: str) -> str:
        return self.choice_template.replace("{choice}", choice)

    def format_shot(self, example: Example, letter: bool = False) -> str:
        if letter:
            return f"{self.format_question(example, letter=True)} {example.gold}"
        return self.format_question(example) + self.continuation(example.choices[example.gold_index])

    def fewshot_block(self, example: Example, letter: bool = False) -> str:
        shots = self.shots()
        if self.fewshot_path is None:
            shots = [s for s in shots if s.index != example.index][: self.num_fewshot]
        return "".join(self.format_shot(s, letter) + "\n\n" for s in shots)

    def prompt(self, example: Example, tokenizer: Any, letter: bool = False) -> str:
        """The context of the likelihood scoring, or (letter=True) the prompt of letter generation."""
        return self.render(
            tokenizer, self.fewshot_block(example, letter) + self.format_question(example, letter)
        )

    def extract(self, completion: str, example: Example) -> Optional[str]:
        """The label a letter completion names (None: none)."""
        return extract_letter(completion, example.labels, example.choices)


class CommonsenseQA(MultipleChoiceTask):
    """CommonsenseQA (five-way multiple choice) with defaults for its jsonl (`choices: {label, text}`,
    `answerKey`).

    Args: as :class:`MultipleChoiceTask`, with the dev split under the data roots as `path`.
    """

    def __init__(
        self,
        path: str = "commonsenseqa/dev_rand_split.jsonl",
        answer_field: str = "answerKey",
        name: Optional[str] = "commonsenseqa",
        **kwargs: Any,
    ) -> None:
        super().__init__(path, answer_field=answer_field, name=name, **kwargs)
