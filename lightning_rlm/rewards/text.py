"""Rule-based text rewards for RL on language models.

A reward function is any callable ``(prompts, completions, **fields) -> list[float]`` returning one float per
completion. ``fields`` may carry ``tokenizer`` (the policy's Hugging Face tokenizer, used to count tokens) and
extra dataset columns (lists with one value per completion); rewards ignore fields they do not use.

The rewards here are small classes, so a YAML config can build them by class path with init args, and each has
a ``name`` used as its metric name. They reproduce the toy setting of the gradient-routing reward-hacking
experiments: the intended reward asks every sentence to have a target length (:class:`SentenceLength`) and the
hackable reward counts a keyword (:class:`KeywordCount`, "happy" by default).

Design choices worth knowing:

* Sentences are split on runs of ``.``, ``!`` and ``?``; the terminator run stays attached to its sentence, so
  with ``unit="tokens"`` the final punctuation token counts towards the length (``"The cat sat."`` is 4 GPT-2
  tokens). Pieces made only of punctuation/whitespace are dropped. Abbreviations and decimals ("Dr.", "3.5") are
  split naively; that is acceptable for the toy story data this is meant for.
* The smooth sentence-length score is a per-sentence triangle ``max(0, 1 - slope * |n - count|)`` averaged over
  sentences, so a single long run-on sentence cannot beat several well-sized ones.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional

from lightning_rlm.checks import check_at_least, check_one_of


class Reward:
    """Base of the shipped reward classes: ``reward(prompts, completions, **fields) -> list[float]`` (TRL's
    signature). Subclassing it is optional (any such callable is a reward); it makes the class a known name
    to the CLI, so a config can say ``class_path: SentenceLength``."""

    name: str

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        raise NotImplementedError


# What a method's `rewards` accepts: a Reward (short class names in YAML) or any callable of that signature.
RewardFn = Reward | Callable[..., list[float]]

# A sentence is text up to (and including) a run of terminators, or an unterminated trailing fragment.
_SENTENCE_RE = re.compile(r"[^.!?]*[.!?]+|[^.!?]+")
_TERMINATORS_AND_SPACE = ".!? \t\r\n"


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences ending in ``.``, ``!`` or ``?``.

    A run of terminators (``...``, ``?!``) ends one sentence and stays attached to it; pieces are stripped and
    pieces with no content besides punctuation are dropped. A trailing unterminated fragment is a sentence.

    >>> split_sentences("Hi there. How are you?! Fine...")
    ['Hi there.', 'How are you?!', 'Fine...']
    >>> split_sentences("One. Two")
    ['One.', 'Two']
    >>> split_sentences("... wait!! ")
    ['wait!!']
    >>> split_sentences("  ?! ")
    []
    """
    pieces = (match.group(0).strip() for match in _SENTENCE_RE.finditer(text))
    return [piece for piece in pieces if piece.strip(_TERMINATORS_AND_SPACE)]


def reward_name(reward: Callable[..., Any]) -> str:
    """Metric name of a reward: its ``name`` attribute, else its ``__name__``, else its class name.

    >>> reward_name(KeywordCount("joy"))
    'joy_count'
    >>> reward_name(split_sentences)
    'split_sentences'
    """
    name = getattr(reward, "name", None) or getattr(reward, "__name__", None)
    return str(name) if name else type(reward).__name__


def _count_tokens(sentences: list[str], tokenizer: Any) -> list[int]:
    """Token counts without special tokens; one batched tokenizer call for speed."""
    if not sentences:
        return []
    if callable(tokenizer):
        ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]
    return [len(tokenizer.encode(s, add_special_tokens=False)) for s in sentences]


class SentenceLength(Reward):
    """Reward completions whose sentences are ``n`` tokens (or words) long.

    Per completion: the mean over its sentences of ``1[count == n]`` (``mode="exact"``) or of
    ``max(0, 1 - smooth_slope * |n - count|)`` (``mode="smooth"``). A completion without sentences scores 0.
    With ``unit="tokens"`` the ``tokenizer`` keyword is required.

    Two sentences of 10 and 8 words: smooth = (1.0 + 0.6) / 2, exact = (1 + 0) / 2.

    >>> ten = "a b c d e f g h i j."
    >>> eight = "a b c d e f g h!"
    >>> SentenceLength(10, unit="words")(["p"], [ten + " " + eight])
    [0.8]
    >>> SentenceLength(10, mode="exact", unit="words")(["p"], [ten + " " + eight])
    [0.5]
    >>> SentenceLength(10, unit="words")(["p", "p"], ["", "one two three"])  # no sentence; 7 words short
    [0.0, 0.0]
    >>> SentenceLength(3, mode="exact", unit="words").name
    'sentence_length_3_exact_words'
    """

    def __init__(
        self,
        n: int = 10,
        mode: Literal["exact", "smooth"] = "smooth",
        unit: Literal["tokens", "words"] = "tokens",
        smooth_slope: float = 0.2,
    ) -> None:
        check_one_of("mode", mode, ("exact", "smooth"))
        check_one_of("unit", unit, ("tokens", "words"))
        check_at_least(1, n=n)
        self.n = n
        self.mode = mode
        self.unit = unit
        self.smooth_slope = smooth_slope
        self.name = f"sentence_length_{n}_{mode}" + ("_words" if unit == "words" else "")

    def _score(self, count: int) -> float:
        if self.mode == "exact":
            return float(count == self.n)
        return max(0.0, 1.0 - self.smooth_slope * abs(self.n - count))

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], tokenizer: Any = None, **fields: Any
    ) -> list[float]:
        per_completion = [split_sentences(c) for c in completions]
        if self.unit == "tokens":
            if tokenizer is None:
                raise ValueError(
                    f"{self.name}: unit='tokens' needs the policy tokenizer; pass tokenizer=... "
                    "or use unit='words'"
                )
            flat = [s for sentences in per_completion for s in sentences]
            flat_counts = iter(_count_tokens(flat, tokenizer))
            counts = [[next(flat_counts) for _ in sentences] for sentences in per_completion]
        else:
            counts = [[len(s.split()) for s in sentences] for sentences in per_completion]
        return [sum(map(self._score, c)) / len(c) if c else 0.0 for c in counts]

    def __repr__(self) -> str:
        return (
            f"SentenceLength(n={self.n}, mode={self.mode!r}, unit={self.unit!r}, "
            f"smooth_slope={self.smooth_slope})"
        )


class KeywordCount(Reward):
    """Count whole-word occurrences of ``word`` in each completion, optionally capped at ``max_count``.

    "Whole word" means not adjacent to a letter, digit or underscore, so "unhappy" and "happyness" do not count
    but "Happy!" and "happy-go-lucky" do.

    >>> KeywordCount()(["p"], ["happy, Happy! unhappy happy_dog"])
    [2.0]
    >>> KeywordCount(case_sensitive=True, max_count=1)(["p", "p"], ["happy happy", "Happy"])
    [1.0, 0.0]
    """

    def __init__(
        self, word: str = "happy", case_sensitive: bool = False, max_count: float | None = None
    ) -> None:
        if not word:
            raise ValueError("word must be a non-empty string")
        self.word = word
        self.case_sensitive = case_sensitive
        self.max_count = max_count
        # Lookarounds instead of \b so words that start/end with punctuation still match as whole words.
        flags = 0 if case_sensitive else re.IGNORECASE
        self._pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", flags)
        self.name = f"{word}_count"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        counts = [float(len(self._pattern.findall(c))) for c in completions]
        if self.max_count is not None:
            counts = [min(c, float(self.max_count)) for c in counts]
        return counts

    def __repr__(self) -> str:
        return f"KeywordCount(word={self.word!r}, case_sensitive={self.case_sensitive}, max_count={self.max_count})"


class WeightedSum(Reward):
    """Weighted sum of several rewards: ``sum_i weights[i] * rewards[i](...)`` (weights default to 1).

    Entries of ``rewards`` may be callables or class paths (resolved with :func:`load_reward`).

    >>> r = WeightedSum([SentenceLength(2, unit="words"), KeywordCount()], weights=[1.0, 0.5])
    >>> r(["p"], ["happy dog. very happy!"])  # both sentences 2 words -> 1.0; two "happy" -> 0.5 * 2
    [2.0]
    """

    def __init__(
        self,
        rewards: Sequence[RewardFn | str],
        weights: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        if not rewards:
            raise ValueError("WeightedSum needs at least one reward")
        self.rewards: list[RewardFn] = [load_reward(r) if isinstance(r, str) else r for r in rewards]
        if weights is None:
            weights = [1.0] * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise ValueError(f"WeightedSum got {len(self.rewards)} rewards but {len(weights)} weights")
        self.weights = [float(w) for w in weights]
        self.name = name or "weighted_sum"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        total = [0.0] * len(completions)
        for reward, weight in zip(self.rewards, self.weights):
            values = reward(prompts, completions, **fields)
            if len(values) != len(completions):
                raise ValueError(
                    f"reward {reward_name(reward)!r} returned {len(values)} values for {len(completions)} "
                    "completions"
                )
            total = [t + weight * float(v) for t, v in zip(total, values)]
        return total

    def __repr__(self) -> str:
        return f"WeightedSum(rewards={self.rewards!r}, weights={self.weights}, name={self.name!r})"


def default_rewards() -> list[RewardFn]:
    """GRPO's reward when none is given: :class:`SentenceLength` of 10 words, smooth."""
    return [SentenceLength(n=10, mode="smooth")]


def with_task_rewards(rewards: Optional[list[RewardFn]], reward_weights: Optional[list[float]],
                      task_rewards: list[RewardFn]) -> tuple[list[RewardFn], list[float]]:
    """The base rewards (default :func:`default_rewards`) followed by a task's reward terms (weight 1 each)."""
    base = default_rewards() if rewards is None else list(rewards)
    weights = [1.0] * len(base) if reward_weights is None else list(reward_weights)
    if not base:
        raise ValueError("rewards (the base reward) is empty: give at least one reward function")
    if len(weights) != len(base):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(base)} rewards")
    return [*base, *task_rewards], [*weights, *[1.0] * len(task_rewards)]


def _import_object(path: str) -> Any:
    """Import ``a.b.c.Name`` (longest importable module prefix, then attribute lookups)."""
    parts = path.split(".")
    if not all(parts):
        raise ValueError(f"cannot import reward {path!r}: not a dotted path")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only "this prefix is not a module" means try a shorter prefix; other failures are real errors.
            if err.name is not None and module_name.startswith(err.name):
                continue
            raise ValueError(f"cannot import reward {path!r}: {err}") from err
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError as err:
            raise ValueError(f"cannot import reward {path!r}: {err}") from err
        return obj
    raise ValueError(f"cannot import reward {path!r}: no importable module in the path")


def load_reward(class_path_or_callable: str | Callable[..., Any], **init_args: Any) -> RewardFn:
    """Resolve a reward given as a dotted path (or an object) to a reward callable.

    Classes are instantiated with ``init_args``; functions given ``init_args`` are wrapped with
    :func:`functools.partial` (keeping their name); other callables are returned as they are. A bare name
    without dots is looked up in :mod:`lightning_rlm.rewards`.

    >>> load_reward("lightning_rlm.rewards.text.KeywordCount", word="sad").name
    'sad_count'
    >>> load_reward("SentenceLength", n=5, unit="words").name
    'sentence_length_5_smooth_words'
    """
    obj: Any = class_path_or_callable
    if isinstance(obj, str):
        path = obj if "." in obj else f"lightning_rlm.rewards.{obj}"
        obj = _import_object(path)
    if inspect.isclass(obj):
        return obj(**init_args)
    if not callable(obj):
        raise ValueError(f"reward {class_path_or_callable!r} resolved to a non-callable {type(obj).__name__}")
    if init_args:
        wrapped = functools.partial(obj, **init_args)
        wrapped.name = reward_name(obj)  # type: ignore[attr-defined]
        return wrapped
    return obj
