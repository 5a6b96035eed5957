"""Cheap text-statistics metrics for monitoring RL on language models: diversity and degeneracy.

RL fine-tuning of a language model tends to fail in a few recognisable ways: completions for the same
prompt collapse onto one answer, the whole policy collapses onto a few stock openings, generations fall
into token loops ("the cat sat. the cat sat. the cat sat."), or get very short. The metrics here measure
each of those from the decoded completions alone, so they can be logged every step at negligible cost.

All of them are `torchmetrics.Metric` subclasses whose states are tensors (or lists of tensors) with a
distributed reduction, so under DDP `compute()` returns the value over the texts seen by *all* processes,
identical to what one process would get from all the texts:

* counts and sums use `dist_reduce_fx="sum"`;
* set-valued quantities (distinct n-grams, unique first sentences) cannot be summed across processes
  (the same n-gram may occur on two ranks), so they keep 64-bit hashes of the locally-distinct items in a
  list state with `dist_reduce_fx="cat"` and de-duplicate after gathering. Hashes are blake2b digests,
  stable across processes (Python's own `hash` of a string is salted per process and must not be used).

Inputs are either strings, split into lower-cased whitespace-separated words by default (pass
`tokenizer=` to split differently), or already-tokenized sequences of token ids (lists or 1-D tensors),
which are used as given.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Union

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_rlm.checks import check_at_least

# A text is a string or a sequence of token ids (list of ints or a 1-D tensor).
TextLike = Union[str, Sequence[int], Tensor]
Tokenizer = Callable[[str], Sequence[Hashable]]

_SENTENCE_END = re.compile(r"[.!?]")
_SENTENCE_SPLIT = re.compile(r"[.!?]+")
_WORD_CHAR = re.compile(r"\w")

__all__ = [
    "DegenerateFlag",
    "DistinctN",
    "GroupJaccard",
    "MeanLength",
    "RepeatedNgramLoop",
    "UniqueFirstSentences",
    "count_sentences",
    "first_sentence",
    "stable_hash",
    "word_tokenize",
]


# --------------------------------------------------------------------------------------------- helpers
def word_tokenize(text: str) -> list[str]:
    """Default tokenizer: lower-case, split on whitespace (punctuation stays attached to words)."""
    return text.lower().split()


def to_tokens(text: TextLike, tokenizer: Tokenizer | None = None) -> list[Hashable]:
    """Tokens of one text: `tokenizer(text)` (default `word_tokenize`) for strings, ids as given otherwise."""
    if isinstance(text, str):
        return list((tokenizer or word_tokenize)(text))
    if isinstance(text, Tensor):
        return text.reshape(-1).tolist()
    return list(text)


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """Contiguous n-grams of one token sequence (none if it is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def stable_hash(item: str | tuple[Hashable, ...]) -> int:
    """Signed 64-bit blake2b hash of a string or token tuple, identical in every process."""
    key = item if isinstance(item, str) else "\x1f".join(map(str, item))
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def first_sentence(text: str) -> str:
    """Text up to (excluding) the first `.`, `!` or `?`, lower-cased with whitespace collapsed."""
    head = _SENTENCE_END.split(text, maxsplit=1)[0]
    return " ".join(head.lower().split())


def count_sentences(text: str) -> int:
    """Number of sentences: pieces between runs of `.`/`!`/`?` that contain a word character.

    A trailing unterminated piece counts (completions are often cut at `max_new_tokens`).
    """
    return sum(1 for piece in _SENTENCE_SPLIT.split(text) if _WORD_CHAR.search(piece))


class _HashSetMetric(Metric):
    """Base for metrics that keep a set of hashes in a `cat`-reduced list state named `hashes`."""

    hashes: list[Tensor]

    def _init_hash_state(self) -> None:
        self.add_state("hashes", default=[], dist_reduce_fx="cat")

    def _add_hashes(self, items: Iterable[str | tuple[Hashable, ...]]) -> None:
        unique = {stable_hash(it) for it in items}  # de-duplicate locally before storing
        self.hashes.append(torch.tensor(sorted(unique), dtype=torch.long, device=self.device))  # [U]

    def _num_unique(self) -> int:
        if isinstance(self.hashes, Tensor):  # after a distributed sync the list is concatenated
            all_hashes = self.hashes
        elif len(self.hashes) == 0:
            return 0
        else:
            all_hashes = dim_zero_cat(self.hashes)  # [sum U]
        return int(torch.unique(all_hashes).numel())

    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        # torchmetrics pads an empty list state with a tensor of the metric's float dtype, which would not
        # match the int64 hashes gathered from other ranks; give it an empty int64 tensor instead.
        if isinstance(self.hashes, list) and len(self.hashes) == 0:
            self.hashes.append(torch.empty(0, dtype=torch.long, device=self.device))
        super()._sync_dist(dist_sync_fn, process_group)


# --------------------------------------------------------------------------------------------- metrics
class GroupJaccard(Metric):
    """Mean pairwise Jaccard similarity of token sets within groups of consecutive completions.

    Completions come grouped contiguously, `group_size` per prompt (GRPO-style rollouts). For each group
    the mean of `|A ∩ B| / |A ∪ B|` over its `group_size * (group_size - 1) / 2` pairs of token sets is
    taken (two empty sets count as identical, similarity 1); `compute()` is the mean over all groups.
    Higher means less diverse: 1.0 = every completion of a prompt uses the same words.

    Args:
        group_size: completions per prompt (at least 2).
        tokenizer: maps a string to tokens; default lower-cased whitespace words.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    sim_sum: Tensor
    n_groups: Tensor

    def __init__(self, group_size: int, tokenizer: Tokenizer | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if group_size < 2:
            raise ValueError(f"GroupJaccard needs group_size >= 2, got {group_size}")
        self.group_size = group_size
        self.tokenizer = tokenizer
        self.add_state("sim_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_groups", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, texts: Sequence[TextLike]) -> None:
        """Add completions; `len(texts)` must be a multiple of `group_size`."""
        if len(texts) % self.group_size:
            raise ValueError(f"{len(texts)} texts do not split into groups of {self.group_size}")
        sets = [set(to_tokens(t, self.tokenizer)) for t in texts]
        g = self.group_size
        total = 0.0
        for start in range(0, len(sets), g):
            group = sets[start : start + g]
            sims = [
                _jaccard(group[i], group[j]) for i in range(g) for j in range(i + 1, g)
            ]  # g*(g-1)/2 pairs
            total += sum(sims) / len(sims)
        self.sim_sum += total
        self.n_groups += len(sets) // g

    def compute(self) -> Tensor:
        """Mean over groups of the within-group mean pairwise Jaccard similarity (NaN before any update)."""
        if self.n_groups == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.sim_sum / self.n_groups


def _jaccard(a: set[Hashable], b: set[Hashable]) -> float:
    """Jaccard similarity of two sets; 1.0 when both are empty."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


class DistinctN(_HashSetMetric):
    """Distinct-n: number of distinct n-grams divided by the total number of n-grams, over all texts seen.

    n-grams are taken within each text (never across two texts) and pooled over every text passed to
    `update` since the last reset, on all processes. 1.0 = no n-gram ever repeats. Note that the value
    falls with the amount of text pooled, even for natural text (TinyStories paragraphs, distinct-2:
    ~0.93 over 8 paragraphs, ~0.79 over 64, ~0.64 over 256, ~0.50 over 1,000), so compare values over
    equally sized pools. Texts shorter than `n` contribute nothing; with no n-grams at all it returns NaN.

    Args:
        n: n-gram order.
        tokenizer: maps a string to tokens; default lower-cased whitespace words.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    total: Tensor

    def __init__(self, n: int = 2, tokenizer: Tokenizer | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_at_least(1, n=n)
        self.n = n
        self.tokenizer = tokenizer
        self._init_hash_state()
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, texts: Sequence[TextLike]) -> None:
        """Add texts (strings or token-id sequences)."""
        grams = [g for t in texts for g in ngrams(to_tokens(t, self.tokenizer), self.n)]
        self._add_hashes(grams)
        self.total += len(grams)

    def compute(self) -> Tensor:
        """Distinct n-grams / total n-grams."""
        if self.total == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return torch.tensor(self._num_unique() / int(self.total), dtype=torch.float64)


class UniqueFirstSentences(_HashSetMetric):
    """Number of distinct first sentences among all texts seen (on all processes).

    The first sentence is the text up to the first `.`, `!` or `?` (the whole text if there is none),
    lower-cased with whitespace runs collapsed; an empty first sentence counts as one value. A policy that
    opens every story the same way scores 1 however many completions it writes. Only strings are accepted.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_hash_state()

    def update(self, texts: Sequence[str]) -> None:
        """Add texts."""
        self._add_hashes(first_sentence(t) for t in texts)

    def compute(self) -> Tensor:
        """Count of unique first sentences."""
        return torch.tensor(self._num_unique(), dtype=torch.long)


class _MeanPerText(Metric):
    """A sum of one number per text, over the texts seen (on all processes); `compute` is the mean (NaN
    before any text). Subclasses give `per_text(text)`."""

    is_differentiable = False
    full_state_update = False

    total: Tensor
    n_texts: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_texts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def per_text(self, text: TextLike) -> int:
        raise NotImplementedError

    def update(self, texts: Sequence[TextLike]) -> None:
        """Add texts."""
        self.total += sum(self.per_text(t) for t in texts)
        self.n_texts += len(texts)

    def compute(self) -> Tensor:
        """The mean over texts (NaN before any text)."""
        if self.n_texts == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total.double() / self.n_texts


class RepeatedNgramLoop(_MeanPerText):
    """Coherence: the fraction of texts free of token loops.

    A text *has a loop* when some contiguous n-gram of its tokens occurs at least `min_repeats` times in
    it, overlapping occurrences included (with n=4, min_repeats=3: some 4-gram appears 3+ times, e.g. one
    word repeated 6 times, or a 4-word phrase said three times). Texts with fewer than `n` tokens have no
    n-gram and are loop-free. `compute()` returns (texts without a loop) / (texts), in [0, 1]; 1 = no loops.

    Args:
        n: n-gram order.
        min_repeats: occurrences of one n-gram that make a loop.
        tokenizer: maps a string to tokens; default lower-cased whitespace words.
    """

    higher_is_better = True

    def __init__(
        self, n: int = 4, min_repeats: int = 3, tokenizer: Tokenizer | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if n < 1 or min_repeats < 2:
            raise ValueError(f"need n >= 1 and min_repeats >= 2, got n={n}, min_repeats={min_repeats}")
        self.n = n
        self.min_repeats = min_repeats
        self.tokenizer = tokenizer

    def has_loop(self, text: TextLike) -> bool:
        """Whether one text contains an n-gram repeated `min_repeats` or more times."""
        counts = Counter(ngrams(to_tokens(text, self.tokenizer), self.n))
        return any(c >= self.min_repeats for c in counts.values())

    def per_text(self, text: TextLike) -> int:
        return not self.has_loop(text)  # the mean is the fraction of loop-free texts


class MeanLength(_MeanPerText):
    """Mean length of the texts seen: words for strings (or `tokenizer` tokens), ids for id sequences."""

    higher_is_better = None

    def __init__(self, tokenizer: Tokenizer | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer = tokenizer

    def per_text(self, text: TextLike) -> int:
        return len(to_tokens(text, self.tokenizer))


class DegenerateFlag(_HashSetMetric):
    """1.0 when a batch of completions looks degenerate, else 0.0.

    The batch (everything passed to `update` since the last `reset`, on all processes) is flagged when
    ANY of these collapse guards fails:

    1. mean length below `min_mean_words` words;
    2. fewer than `min_sentences` sentences per completion on average (sentences as in
       `count_sentences`: pieces between `.`/`!`/`?` runs containing a word character, a trailing
       unterminated piece included);
    3. distinct word pairs (distinct-2 pooled over the batch, as `DistinctN(2)`) below `min_distinct2`.
       Pooling across completions makes this catch both loops inside a completion and many completions
       that are the same text. Natural TinyStories paragraphs give ~0.93 over 8, ~0.79 over 64 and
       ~0.64 over 256 paragraphs, so the 0.45 default is safe for batches up to several hundred
       completions; do not accumulate thousands (reset every step, or use `forward`, which does).

    The defaults are the guards measured for this project: distinct word pairs >= 0.45 and >= 3 sentences
    per completion. TinyStories paragraphs average 3.1-3.7 sentences, so lower `min_sentences` when
    completions are a single short paragraph. Only strings are accepted. Empty batches return NaN.

    Args:
        min_mean_words: floor on the mean number of whitespace words per completion.
        min_sentences: floor on the mean number of sentences per completion.
        min_distinct2: floor on pooled distinct-2 of lower-cased words.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    n_texts: Tensor
    n_words: Tensor
    n_sentences: Tensor
    n_pairs: Tensor

    def __init__(
        self,
        min_mean_words: float = 8.0,
        min_sentences: float = 3.0,
        min_distinct2: float = 0.45,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.min_mean_words = min_mean_words
        self.min_sentences = min_sentences
        self.min_distinct2 = min_distinct2
        self._init_hash_state()
        for name in ("n_texts", "n_words", "n_sentences", "n_pairs"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, texts: Sequence[str]) -> None:
        """Add completions."""
        words = [word_tokenize(t) for t in texts]
        pairs = [g for w in words for g in ngrams(w, 2)]
        self._add_hashes(pairs)
        self.n_pairs += len(pairs)
        self.n_words += sum(len(w) for w in words)
        self.n_sentences += sum(count_sentences(t) for t in texts)
        self.n_texts += len(texts)

    def stats(self) -> dict[str, float]:
        """The three guarded quantities: mean_words, sentences_per_completion, distinct2."""
        n = max(int(self.n_texts), 1)
        distinct2 = self._num_unique() / int(self.n_pairs) if self.n_pairs > 0 else 0.0
        return {
            "mean_words": int(self.n_words) / n,
            "sentences_per_completion": int(self.n_sentences) / n,
            "distinct2": distinct2,
        }

    def compute(self) -> Tensor:
        """1.0 if any guard fails, 0.0 otherwise."""
        if self.n_texts == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        s = self.stats()
        degenerate = (
            s["mean_words"] < self.min_mean_words
            or s["sentences_per_completion"] < self.min_sentences
            or s["distinct2"] < self.min_distinct2
        )
        return torch.tensor(float(degenerate), dtype=torch.float64)
