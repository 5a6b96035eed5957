"""What a task is: rows read from a jsonl file, a prompt for each, and a scorer.

A task reads its jsonl file once (`rows`), turns each row into an :class:`Example` (question, gold answer,
choices for multiple choice), and renders the prompt of an example as

    [k-shot block] + template.format(question=...)      (plain)
    chat.render(tokenizer, [k-shot block] + template)   (with a `ChatFormat`: one user turn)

The k-shot examples are drawn once, seeded (`fewshot_seed`), from `fewshot_path` (another file, e.g. the
train split) or, without one, from the task file itself excluding the evaluated example's row, and the same
shots precede every question. (lm-eval-harness draws shots per document; one fixed set is cheaper to cache
and makes every prompt share its prefix.) With a chat template the shots go inside the single user turn, as
worked examples, not as earlier dialogue turns.

Subclasses say how a row becomes an example (`make_example`) and how a worked shot reads (`format_shot`);
:mod:`lightning_rlm.tasks.evaluate` does the model work. Every task is a class with typed `__init__` args, so
LightningCLI / jsonargparse can build one from YAML by `class_path`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.data.paths import resolve_data_path
from lightning_rlm.data.sources import jsonl_rows

TaskKind = Literal["generate", "choice"]


@dataclass
class Example:
    """One evaluated item.

    Args:
        index: the row's position in the task file (a stable id: subsets and DDP shards are chosen by it).
        question: the question text as in the file.
        gold: the normalised reference (a number string for GSM8K, the correct choice's label for choices).
        choices: answer texts of a multiple-choice item (empty for generation tasks).
        labels: the choices' labels ("A".."E"), parallel to `choices`.
        gold_index: the correct choice's position in `choices` (-1 for generation tasks).
        row: the raw jsonl row (for reward fields and tables).
    """

    index: int
    question: str
    gold: str
    choices: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    gold_index: int = -1
    row: dict[str, Any] = field(default_factory=dict, repr=False)


class Task:
    """A dataset reader + a prompt + a scorer (see the module docstring).

    Args:
        path: the jsonl file (resolved under the data roots, see `lightning_rlm.data.paths`).
        name: the task's name in metric keys (`eval/<name>/accuracy`); default: the file's stem.
        template: the question's text, with `{question}` (and, for multiple choice, `{choices}`).
        chat: render the prompt through the tokenizer's chat template as one user turn.
        num_fewshot: worked examples before the question (0: zero-shot).
        fewshot_path: the jsonl file the shots come from (None: the task file, never the evaluated row).
        fewshot_seed: seed of the shot draw.
    """

    kind: TaskKind = "generate"

    def __init__(
        self,
        path: str,
        name: Optional[str] = None,
        template: str = "Question: {question}\nAnswer:",
        chat: Optional[ChatFormat] = None,
        num_fewshot: int = 0,
        fewshot_path: Optional[str] = None,
        fewshot_seed: int = 1234,
    ) -> None:
        if "{question}" not in template:
            raise ValueError(f"template must contain '{{question}}', got {template!r}")
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
        self.path = path
        self.name = name or Path(path).stem
        self.template = template
        self.chat = chat
        self.num_fewshot = num_fewshot
        self.fewshot_path = fewshot_path
        self.fewshot_seed = fewshot_seed
        self._examples: Optional[list[Example]] = None
        self._shots: Optional[list[Example]] = None

    # -- reading -------------------------------------------------------------------------------------------
    def make_example(self, index: int, row: dict[str, Any], where: str) -> Example:
        """The example of one jsonl row; `where` ("file:line") names it in errors."""
        raise NotImplementedError

    def _read(self, path: str) -> list[Example]:
        file = resolve_data_path(path)
        return [
            self.make_example(i, row, f"{file}:{lineno}") for i, (lineno, row) in enumerate(jsonl_rows(file))
        ]

    def examples(self) -> list[Example]:
        """Every example of the task file, in file order (read once)."""
        if self._examples is None:
            self._examples = self._read(self.path)
            if not self._examples:
                raise ValueError(f"task {self.name!r}: {self.path} holds no rows")
        return self._examples

    def __len__(self) -> int:
        return len(self.examples())

    # -- prompting -----------------------------------------------------------------------------------------
    def format_question(self, example: Example) -> str:
        """The templated question (no shots, no chat)."""
        return self.template.replace("{question}", example.question.strip())

    def format_shot(self, example: Example) -> str:
        """A worked example: the templated question followed by its answer."""
        raise NotImplementedError

    def shots(self) -> list[Example]:
        """The k-shot examples (drawn once, seeded); from the task file they are drawn from k+1 candidates
        so that one can be dropped when it is the evaluated row."""
        if self._shots is None:
            if self.num_fewshot == 0:
                self._shots = []
            else:
                pool = self._read(self.fewshot_path) if self.fewshot_path else self.examples()
                k = self.num_fewshot + (self.fewshot_path is None)
                if len(pool) < k:
                    raise ValueError(
                        f"task {self.name!r}: {self.num_fewshot} shots asked but the shot file "
                        f"has {len(pool)} rows"
                    )
                self._shots = random.Random(self.fewshot_seed).sample(pool, k)
        return self._shots

    def fewshot_block(self, example: Example) -> str:
        shots = self.shots()
        if self.fewshot_path is None:
            shots = [s for s in shots if s.index != example.index][: self.num_fewshot]
        return "".join(self.format_shot(s) + "\n\n" for s in shots)

    def render(self, tokenizer: Any, text: str) -> str:
        """`text` as the model sees it: through the chat template when the task has one."""
        return self.chat.render(tokenizer, text) if self.chat is not None else text

    def prompt(self, example: Example, tokenizer: Any) -> str:
        """The full prompt of `example` (shots, template, chat)."""
        return self.render(tokenizer, self.fewshot_block(example) + self.format_question(example))


class GenerationTask(Task):
    """A task answered by generating text, graded by a normalised exact match.

    Args (besides :class:`Task`'s):
        max_new_tokens: the generation budget.
        stop: strings that end an answer; the completion is cut at the first (after generation, which itself
            stops at EOS and the chat template's end-of-turn token).
    """

    kind: TaskKind = "generate"

    def __init__(
        self, path: str, max_new_tokens: int = 256, stop: Optional[list[str]] = None, **kwargs: Any
    ) -> None:
        super().__init__(path, **kwargs)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop or [])

    def cut(self, completion: str) -> str:
        """The completion up to the first stop string."""
        for s in self.stop:
            if s and s in completion:
                completion = completion[: completion.index(s)]
        return completion

    def extract(self, completion: str) -> Optional[str]:
        """The normalised answer in a completion (None: no answer found)."""
        raise NotImplementedError

    def is_correct(self, prediction: Optional[str], example: Example) -> bool:
        return prediction is not None and prediction == example.gold
