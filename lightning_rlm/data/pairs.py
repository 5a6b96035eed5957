"""Explicit (prompt, completion) pairs for SFT, and prefix/completion windows whose completion has a keyword.

Both DataModules yield the batches of `PrefixCompletionDataModule`: `prompt_ids`/`prompt_mask` left-padded
[B, P], `completion_ids`/`completion_mask` right-padded [B, C], and the strings as lists `prompt`,
`completion`.

* `PairsDataModule`: rows with a prompt field and a completion field (jsonl, parquet or a hub dataset
  through `TextSource`), split into train/val by row with a seed. Prompts longer than
  `max_prompt_tokens` keep their last tokens, completions longer than `max_completion_tokens` their first.
* `KeywordPrefixCompletionDataModule`: the windows of `PrefixCompletionDataModule`, except that every
  training completion contains `keyword` as a whole word (case-insensitive). Each document with the
  keyword gets one window, drawn at random (seeded by the seed and the document index) among those whose
  decoded `completion_tokens`-token completion contains the keyword, with at least `min_prefix_tokens`
  tokens before it. So documents need only `min_prefix_tokens + completion_tokens` tokens here (not
  2 × `completion_tokens` as in the parent), and a keyword early in a story can still land in the
  completion. Validation windows stay unfiltered by default: held-out prompts then measure whether the
  trait shows up on ordinary prompts, and the base model's rate on them is the baseline.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any, Optional

from lightning_rlm.checks import check_at_least
from lightning_rlm.data.base import TextDataModule, split_rows_by_seed
from lightning_rlm.data.prefix_completion import PairDataset, PrefixCompletionDataModule
from lightning_rlm.data.sources import TextSource
from lightning_rlm.data.tokenizers import build_tokenizer

log = logging.getLogger(__name__)

__all__ = ["KeywordPrefixCompletionDataModule", "PairsDataModule", "keyword_pattern"]


def keyword_pattern(keyword: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive match: `happy` matches "Happy," but not "happily" or "unhappy"."""
    if not keyword.strip():
        raise ValueError("keyword must be a non-empty word")
    return re.compile(rf"(?<!\w){re.escape(keyword.strip())}(?!\w)", re.IGNORECASE)


class PairsDataModule(TextDataModule):
    """(prompt, completion) rows for SFT.

    Args:
        source: rows with `prompt_field` and `completion_field` (a jsonl/parquet file or an hf dataset).
        prompt_field, completion_field: the fields holding the two texts.
        tokenizer: the policy's tokenizer (its model folder, `lrlm:...`, `gpt2`, `bpe`, `char`).
        max_prompt_tokens: keep the last N prompt tokens (None: all).
        max_completion_tokens: keep the first N completion tokens (None: all).
        prompt_template: optional string with `{text}` wrapping each prompt.
        add_eos: end every completion with the tokenizer's EOS (teaches the model to stop).
        See `TextDataModule` for the rest.
    """

    def __init__(
        self,
        source: TextSource,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        max_prompt_tokens: Optional[int] = 256,
        max_completion_tokens: Optional[int] = 256,
        prompt_template: Optional[str] = None,
        add_eos: bool = False,
        tokenizer: str = "gpt2",
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        if source.resolved_format() == "text":
            raise ValueError("PairsDataModule needs rows with fields (jsonl, parquet or hf), not plain text")
        super().__init__(source, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        check_at_least(1, max_prompt_tokens=max_prompt_tokens, max_completion_tokens=max_completion_tokens)
        self.set_prompt_format(prompt_template)
        self.prompt_field = prompt_field
        self.completion_field = completion_field
        self.max_prompt_tokens = max_prompt_tokens
        self.max_completion_tokens = max_completion_tokens
        self.add_eos = add_eos
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None

    def prepare_data(self) -> None:
        pass  # a bpe/char tokenizer is built from the rows in setup (cached by content)

    def load_documents(self) -> None:
        """Read the rows, check their fields, split train/val by row, build the tokenizer (idempotent)."""
        if self.tokenizer is not None:
            return
        rows = self.source.with_(text_field=self.prompt_field).read_rows()
        for i, row in enumerate(rows):
            missing = [f for f in (self.prompt_field, self.completion_field) if f not in row]
            if missing:
                raise KeyError(f"row {i} of {self.source.describe()!r} has no field(s) {missing} "
                               f"(fields: {sorted(row)}); set prompt_field / completion_field")
        if len(rows) < 2:
            raise ValueError(f"{self.source.describe()!r} has {len(rows)} row(s): need >= 2 to hold out val")
        self.train_rows, self.val_rows = split_rows_by_seed(rows, self.val_fraction, self.seed)
        texts = [str(r[f]) for r in self.train_rows for f in (self.prompt_field, self.completion_field)]
        self.tokenizer = build_tokenizer(self.tokenizer_spec, texts, self.tokenizer_vocab_size)
        if self.add_eos and self.tokenizer.eos_token_id is None:
            raise ValueError(f"add_eos is set but tokenizer {self.tokenizer_spec!r} has no EOS token")

    def _examples(self, rows: list[dict], split: str) -> list[dict]:
        tok = self.tokenizer
        examples, dropped = [], 0
        for row in rows:
            prompt_ids = tok.encode(self.render_prompt(str(row[self.prompt_field])))
            completion_ids = tok.encode(str(row[self.completion_field]))
            if self.max_prompt_tokens is not None:
                # keep the end of the prompt: it is what leads into the completion
                prompt_ids = prompt_ids[-self.max_prompt_tokens:]
            if self.max_completion_tokens is not None:
                completion_ids = completion_ids[: self.max_completion_tokens]
            if self.add_eos:
                completion_ids = [*completion_ids, tok.eos_token_id]
            if not prompt_ids or not completion_ids:
                dropped += 1  # generation needs a prompt token; SFT needs a target token
                continue
            examples.append({"prompt": tok.decode(prompt_ids), "completion": tok.decode(completion_ids),
                             "prompt_ids": prompt_ids, "completion_ids": completion_ids})
        log.info("%s: %d pairs, dropped %d with an empty prompt or completion", split, len(examples), dropped)
        if not examples:
            raise ValueError(f"no {split} pair of {self.source.describe()!r} has both a prompt and a "
                             "completion")
        return examples

    def setup(self, stage: str | None = None) -> None:
        self.load_documents()
        if self.train_set is None:
            self.train_set = PairDataset(self._examples(self.train_rows, "train"))
            self.val_set = PairDataset(self._examples(self.val_rows, "val"))
        self.save_tokenizer()


class KeywordPrefixCompletionDataModule(PrefixCompletionDataModule):
    """`PrefixCompletionDataModule` whose training completions all contain `keyword` (whole word).

    Args:
        keyword: the word every training completion must contain (case-insensitive, whole word).
        min_prefix_tokens: at least this many prompt tokens before the completion.
        filter_val: also filter the validation windows (default: no, held-out prompts stay ordinary).
        See `PrefixCompletionDataModule` for the rest.
    """

    def __init__(
        self,
        source: TextSource,
        keyword: str = "happy",
        min_prefix_tokens: int = 8,
        filter_val: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        if not 1 <= min_prefix_tokens <= self.prefix_tokens:
            raise ValueError(f"min_prefix_tokens must be in [1, prefix_tokens={self.prefix_tokens}], "
                             f"got {min_prefix_tokens}")
        self.keyword = keyword
        self.pattern = keyword_pattern(keyword)
        self.min_prefix_tokens = min_prefix_tokens
        self.filter_val = filter_val

    def _examples(self, docs: list[str], split: str, salt: int) -> list[dict]:
        if split != "train" and not self.filter_val:
            return super()._examples(docs, split, salt)
        tok, C = self.tokenizer, self.completion_tokens
        examples = []
        n_keyword = 0
        for i, doc in enumerate(docs):
            if not self.pattern.search(doc):
                continue  # cheap text test before tokenizing
            n_keyword += 1
            ids = tok.encode(doc)
            # completion starts c such that ids[c:c+C] is whole and at least min_prefix_tokens precede it
            starts = [c for c in range(self.min_prefix_tokens, len(ids) - C + 1)
                      if self.pattern.search(tok.decode(ids[c : c + C]))]
            if not starts:
                continue  # too short, or the keyword only occurs in the first min_prefix_tokens tokens
            c = random.Random(f"{self.seed}-{salt}-{i}").choice(starts)
            examples.append(self.example(ids[max(0, c - self.prefix_tokens) : c], ids[c : c + C]))
        self.dropped[split] = len(docs) - len(examples)
        log.info("%s: %d of %d documents contain %r; %d windows with it in the completion",
                 split, n_keyword, len(docs), self.keyword, len(examples))
        if not examples:
            raise ValueError(
                f"no {split} document of {self.source.describe()!r} has {self.keyword!r} in a window of "
                f"{C} completion tokens after {self.min_prefix_tokens} prefix tokens"
            )
        return examples
