"""Prefix → ground-truth completion pairs cut from real documents (the data of GAN-RL and SFT).

Only documents longer than 2 × `completion_tokens` are kept (the count dropped is logged). For each
document one random window of up to `prefix_tokens + completion_tokens` tokens is drawn (fixed by the seed
and the document index, so runs and resumes see the same pairs); its last `completion_tokens` tokens are
the completion and the rest the prefix. An optional `prompt_template` (a string with `{text}`) renders the
prefix into the prompt the policy sees; without one the prompt is the prefix itself. `chat` then renders
that prompt as a user turn of the tokenizer's chat template (`lightning_rlm.data.chat.ChatFormat`).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Optional

from torch.utils.data import DataLoader, Dataset

from lightning_rlm.checks import check_at_least
from lightning_rlm.data.base import TextDataModule
from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.data.sources import TextSource

log = logging.getLogger(__name__)


def cut_window(ids: list[int], prefix_tokens: int, completion_tokens: int, rng: random.Random):
    """A random window of at most prefix_tokens + completion_tokens ids; returns (prefix, completion).

    >>> cut_window(list(range(10)), 4, 3, random.Random(0))[1] == cut_window(list(range(10)), 4, 3,
    ...     random.Random(0))[1]
    True
    >>> p, c = cut_window(list(range(5)), 10, 2, random.Random(0)); p, c
    ([0, 1, 2], [3, 4])
    """
    width = min(len(ids), prefix_tokens + completion_tokens)
    start = rng.randint(0, len(ids) - width)
    window = ids[start : start + width]
    return window[:-completion_tokens], window[-completion_tokens:]


class PairDataset(Dataset):
    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class PrefixCompletionDataModule(TextDataModule):
    """(prompt, prefix, ground-truth completion) examples from random windows of documents.

    Args:
        completion_tokens: length of the ground-truth completion (the window's last tokens).
        prefix_tokens: at most this many tokens before the completion.
        prompt_template: e.g. "<prefix>\\n{text}\\n</prefix>"; None: the prompt is the prefix.
        chat: render the prompt through the tokenizer's chat template (after `prompt_template`).
        See `TextDataModule` for the rest.
    """

    def __init__(
        self,
        source: TextSource,
        completion_tokens: int = 32,
        prefix_tokens: int = 64,
        prompt_template: Optional[str] = None,
        chat: Optional[ChatFormat] = None,
        tokenizer: str = "gpt2",
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        check_at_least(1, completion_tokens=completion_tokens, prefix_tokens=prefix_tokens)
        self.set_prompt_format(prompt_template, chat)
        self.completion_tokens = completion_tokens
        self.prefix_tokens = prefix_tokens
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None

    def _examples(self, docs: list[str], split: str, salt: int) -> list[dict]:
        tok = self.tokenizer
        encoded = [tok.encode(d) for d in docs]
        kept = [(i, ids) for i, ids in enumerate(encoded) if len(ids) > 2 * self.completion_tokens]
        dropped = len(encoded) - len(kept)
        log.info("%s: kept %d documents, dropped %d not longer than 2 x completion_tokens=%d",
                 split, len(kept), dropped, self.completion_tokens)
        self.dropped[split] = dropped
        if not kept:
            longest = max(len(e) for e in encoded)
            raise ValueError(
                f"every {split} document of {self.source.describe()!r} is at most 2 x completion_tokens="
                f"{self.completion_tokens} tokens long (longest: {longest}); lower completion_tokens"
            )
        examples = []
        for i, ids in kept:
            rng = random.Random(f"{self.seed}-{salt}-{i}")
            examples.append(self.example(*cut_window(ids, self.prefix_tokens, self.completion_tokens, rng)))
        return examples

    def example(self, prefix_ids: list[int], completion_ids: list[int]) -> dict:
        """One example from a window cut in two: the prompt is the prefix rendered by `render_prompt`."""
        tok = self.tokenizer
        prefix = tok.decode(prefix_ids)
        prompt = self.render_prompt(prefix)
        return {
            "prompt": prompt,
            "prefix": prefix,
            "completion": tok.decode(completion_ids),
            "prompt_ids": prefix_ids if prompt == prefix else tok.encode(prompt),
            "completion_ids": completion_ids,
        }

    def setup(self, stage: str | None = None) -> None:
        self.load_documents()
        if self.train_set is None:
            self.dropped: dict[str, int] = {}
            self.train_set = PairDataset(self._examples(self.train_docs, "train", 0))
            self.val_set = PairDataset(self._examples(self.val_docs, "val", 1))
        self.save_tokenizer()

    def predict_dataloader(self) -> DataLoader:
        """`predict` runs on the held-out windows (their ground-truth completions ride along)."""
        return self.val_dataloader()
