"""Prompts for RL: the first k tokens of real documents, or a fixed prompt list.

Each example is `{"prompt": str, "prompt_ids": list[int], **fields}`: any extra field of a jsonl/parquet
row (e.g. a label a reward function needs) is kept and reaches the reward functions as a keyword list.
Validation prompts are held out by document, never seen in training. With `chat`, each prompt is rendered
through the tokenizer's chat template (`lightning_rlm.data.chat.ChatFormat`). Cutting documents to their
first `prompt_tokens` tokens is the point of `prompt_tokens`; how many prompts were cut is logged, and
`prompt_tokens: null` keeps whole prompts.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch.utils.data import DataLoader

from lightning_rlm.checks import check_at_least
from lightning_rlm.data.base import TextDataModule, split_documents_by_seed, split_rows_by_seed
from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.data.prefix_completion import PairDataset
from lightning_rlm.data.sources import TextSource
from lightning_rlm.data.tokenizers import build_tokenizer

log = logging.getLogger(__name__)


class PromptDataModule(TextDataModule):
    """Prompts (strings and ids) for rollouts.

    Args:
        source: documents to cut prompts from (rows keep their extra fields); or None with `prompts`.
        prompts: a fixed prompt list (used as is; split into train/val when it has several prompts).
        tokenizer: the policy's tokenizer (its model folder, or `gpt2`, ...).
        prompt_tokens: keep the first k tokens of each document (None: the whole text); shorter documents
            are dropped.
        prompt_template: optional string with `{text}` wrapping each prompt.
        chat: render each (templated) prompt through the tokenizer's chat template as a user turn.
        batch_size: prompts per step over all processes (each is sampled `num_generations` times by the method).
    """

    drop_last_train = True

    def __init__(
        self,
        source: Optional[TextSource] = None,
        prompts: Optional[list[str]] = None,
        prompt_tokens: Optional[int] = 16,
        prompt_template: Optional[str] = None,
        chat: Optional[ChatFormat] = None,
        max_val_prompts: Optional[int] = 64,
        tokenizer: str = "gpt2",
        batch_size: int = 2,
        **kwargs: Any,
    ) -> None:
        if (source is None) == (prompts is None):
            raise ValueError("PromptDataModule needs exactly one of `source` or `prompts`")
        if prompts is not None and not prompts:
            raise ValueError("`prompts` is an empty list")
        check_at_least(1, prompt_tokens=prompt_tokens)
        super().__init__(source or TextSource(path="<prompts>"), tokenizer=tokenizer, batch_size=batch_size,
                         **kwargs)
        self.set_prompt_format(prompt_template, chat)
        self.prompts = prompts
        self.prompt_tokens = prompt_tokens
        self.cut = 0  # prompts cut to prompt_tokens
        self.max_val_prompts = max_val_prompts
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.predict_set: PairDataset | None = None

    def prepare_data(self) -> None:
        pass  # the policy's tokenizer is loaded, never trained here

    def source_rows(self) -> list[dict]:
        """The rows of `source` that prompts are made from (a hook: a task's DataModule may rewrite them)."""
        return self.source.read_rows()

    def _example(self, row: dict, text_field: str) -> Optional[dict]:
        tok = self.tokenizer
        text = row[text_field]
        ids = tok.encode(text)
        if self.prompt_tokens is not None:
            if len(ids) < self.prompt_tokens:
                return None
            self.cut += len(ids) > self.prompt_tokens
            ids = ids[: self.prompt_tokens]
            text = tok.decode(ids)
        if self.prompt_template is not None or self.chat is not None:
            text = self.render_prompt(text)
            ids = tok.encode(text)
        fields = {k: v for k, v in row.items() if k != text_field}
        return {"prompt": text, "prompt_ids": ids, **fields}

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":  # every prompt, in file order, no split and no cap
            self.setup_predict()
            return
        if self.train_set is not None:
            return
        self.tokenizer = build_tokenizer(self.tokenizer_spec)
        if self.prompts is not None:
            rows, field = [{"text": p} for p in self.prompts], "text"
            if len(rows) == 1:
                log.warning("one fixed prompt: it is used for both training and validation")
                train_rows, val_rows = rows, rows
            else:
                train_rows, val_rows = split_rows_by_seed(rows, self.val_fraction, self.seed)
        else:
            rows, field = self.source_rows(), self.source.text_field
            if self.source.resolved_format() == "text":
                train_docs, val_docs = split_documents_by_seed([r[field] for r in rows], self.val_fraction,
                                                               self.seed)
                train_rows, val_rows = [{field: d} for d in train_docs], [{field: d} for d in val_docs]
            else:
                train_rows, val_rows = split_rows_by_seed(rows, self.val_fraction, self.seed)
        train = [e for r in train_rows if (e := self._example(r, field)) is not None]
        val = [e for r in val_rows if (e := self._example(r, field)) is not None]
        if self.max_val_prompts is not None:
            val = val[: self.max_val_prompts]
        if not train or not val:
            raise ValueError(
                f"no prompts of at least prompt_tokens={self.prompt_tokens} tokens in "
                f"{'the train' if not train else 'the val'} split of {self.source.describe()!r}"
            )
        log.info("prompts: %d train, %d held-out val", len(train), len(val))
        if self.cut:
            log.info("%d prompts were cut to their first prompt_tokens=%d tokens (prompt_tokens: null keeps "
                     "whole prompts)", self.cut, self.prompt_tokens)
        self.train_set, self.val_set = PairDataset(train), PairDataset(val)

    def setup_predict(self) -> None:
        """`predict_set`: every prompt of `prompts` or `source` (rows keep their fields), in order."""
        if self.predict_set is not None:
            return
        self.tokenizer = build_tokenizer(self.tokenizer_spec)
        if self.prompts is not None:
            rows, field = [{"text": p} for p in self.prompts], "text"
        else:
            rows, field = self.source.read_rows(), self.source.text_field
        examples = [e for r in rows if (e := self._example(r, field)) is not None]
        if not examples:
            raise ValueError(f"predict: no prompts of at least prompt_tokens={self.prompt_tokens} tokens in "
                             f"{self.source.describe()!r}")
        self.predict_set = PairDataset(examples)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, shuffle=False)
